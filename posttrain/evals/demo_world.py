"""``demo_accuracy``: greedy exact-match accuracy on the demo world's held-out problems.

Metrics: ``demo_accuracy``, ``demo_accuracy_n``. No options; the prompts are the world's own.
"""

from __future__ import annotations

from posttrain.config.components import DataConfig, EvalTaskConfig
from posttrain.data.formats import load_dataset
from posttrain.data.render import render_prompt
from posttrain.demo.world import check_answer
from posttrain.evals.base import EvalContext, EvalResult, register_task, task_options
from posttrain.evals.common import DataDefault, record_id
from posttrain.rollout.hf import HFSampler, SamplingParams
from posttrain.types import PromptExample

DEFAULT_DATA = DataConfig(builtin="demo.prompts", split="test")
DEFAULT_LIMIT = 500
MAX_NEW_TOKENS = 32


def demo_accuracy(ctx: EvalContext, cfg: EvalTaskConfig) -> EvalResult:
    task_options(cfg, "eval(demo_accuracy)")
    data = load_dataset(cfg.data or DEFAULT_DATA, where="eval.data", base_dir=ctx.base_dir, expect=("prompt",))
    examples: list[PromptExample] = data.examples[: cfg.limit or DEFAULT_LIMIT]  # type: ignore[assignment]
    prompts = [render_prompt(ctx.tokenizer, e.prompt, e.source) for e in examples]
    sampler = HFSampler(ctx.model, ctx.tokenizer, batch_size=cfg.batch_size, show_progress=ctx.show_progress)
    params = SamplingParams(temperature=0.0, max_new_tokens=cfg.max_new_tokens or MAX_NEW_TOKENS)
    rollouts = sampler.generate(prompts, params)
    records, correct = [], 0
    for example, rollout in zip(examples, rollouts):
        ok = check_answer(rollout.text, example.answer or "", example.extra.get("problem"))
        correct += ok
        records.append({"id": record_id(example), "prompt": example.prompt, "answer": example.answer,
                        "completion": rollout.text, "correct": ok, "truncated": rollout.truncated,
                        "scores": {"demo_accuracy": float(ok)}})
    n = len(examples)
    return EvalResult({"demo_accuracy": correct / n, "demo_accuracy_n": float(n)}, records)


register_task("demo_accuracy", demo_accuracy, data=DataDefault(builtin=DEFAULT_DATA))
