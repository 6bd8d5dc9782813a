"""The demo world's held-out accuracy (exact worked solution, the ``demo`` verifier's check).

- ``demo_accuracy``: greedy decoding. Metrics ``demo_accuracy``, ``demo_accuracy_n``.
- ``demo_sampled_accuracy``: ``n`` samples per problem at ``temperature`` (default 4 at 1.0, the
  policy's own distribution, which is what an online RL stage optimises); the metric is the mean
  over all samples (avg@n). Metrics ``demo_sampled_accuracy``, ``demo_sampled_accuracy_n``.

Both default to the first 500 of the 2,506 held-out problems; ``limit`` changes that. The held-out
split comes in a seeded random order (``demo.world.prompt_rows``), so the first N are a random
sample of it.
"""

from __future__ import annotations

from pydantic import Field

from posttrain.config.base import StrictModel
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


class SampledOptions(StrictModel):
    n: int = Field(4, ge=1, description="samples per problem")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (greedy is demo_accuracy)")
    seed: int | None = Field(None, description="sampling seed; default: the run's seed")


def _score(name: str, ctx: EvalContext, cfg: EvalTaskConfig, params: SamplingParams) -> EvalResult:
    data = load_dataset(cfg.data or DEFAULT_DATA, where="eval.data", base_dir=ctx.base_dir, expect=("prompt",))
    examples: list[PromptExample] = data.examples[: cfg.limit or DEFAULT_LIMIT]  # type: ignore[assignment]
    prompts = [render_prompt(ctx.tokenizer, e.prompt, e.source) for e in examples]
    sampler = HFSampler(ctx.model, ctx.tokenizer, batch_size=cfg.batch_size, show_progress=ctx.show_progress)
    rollouts = sampler.generate(prompts, params)
    records, correct = [], 0
    for i, example in enumerate(examples):
        group = rollouts[i * params.n : (i + 1) * params.n]
        verdicts = [check_answer(r.text, example.answer or "", example.extra.get("problem")) for r in group]
        correct += sum(verdicts)
        records.append({"id": record_id(example), "prompt": example.prompt, "answer": example.answer,
                        "completions": [r.text for r in group], "correct": verdicts,
                        "truncated": [r.truncated for r in group],
                        "scores": {name: sum(verdicts) / len(verdicts)}})
    return EvalResult({name: correct / (len(examples) * params.n), f"{name}_n": float(len(examples))}, records)


def demo_accuracy(ctx: EvalContext, cfg: EvalTaskConfig) -> EvalResult:
    task_options(cfg, "eval(demo_accuracy)")
    params = SamplingParams(temperature=0.0, max_new_tokens=cfg.max_new_tokens or MAX_NEW_TOKENS)
    return _score("demo_accuracy", ctx, cfg, params)


def demo_sampled_accuracy(ctx: EvalContext, cfg: EvalTaskConfig) -> EvalResult:
    opts: SampledOptions = task_options(cfg, "eval(demo_sampled_accuracy)")
    params = SamplingParams(n=opts.n, temperature=opts.temperature,
                            max_new_tokens=cfg.max_new_tokens or MAX_NEW_TOKENS,
                            seed=ctx.seed if opts.seed is None else opts.seed)
    return _score("demo_sampled_accuracy", ctx, cfg, params)


register_task("demo_accuracy", demo_accuracy, data=DataDefault(builtin=DEFAULT_DATA))
register_task("demo_sampled_accuracy", demo_sampled_accuracy, options=SampledOptions,
              data=DataDefault(builtin=DEFAULT_DATA))
