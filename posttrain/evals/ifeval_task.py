"""``ifeval``: verifiable instruction following (Zhou et al. 2023), through the IFEval verifier.

Rows: IFEval's ``input_data.jsonl`` (``prompt``, ``instruction_id_list``, ``kwargs``) or the
``google/IFEval`` rows; default file ``$POSTTRAIN_EVAL_DATA/ifeval/input_data.jsonl``. The prompt
is sent as it is (no template), as in the paper.

Metrics, as the paper reports them (section 3): ``ifeval_prompt_strict`` / ``ifeval_prompt_loose``
(share of prompts whose every instruction is followed) and ``ifeval_instruction_strict`` /
``ifeval_instruction_loose`` (share of all instructions followed, pooled over prompts), plus
``ifeval_truncated`` and ``ifeval_n``. With n samples per prompt every sample counts once.
"""

from __future__ import annotations

from posttrain.config.components import EvalTaskConfig
from posttrain.evals.base import EvalContext, EvalResult, register_task, task_options
from posttrain.evals.common import (
    DataDefault,
    PromptStyle,
    SamplingOptions,
    build_prompt,
    completion_texts,
    load_examples,
    mean,
    record_id,
    sample,
)
from posttrain.rewards.verifiers.ifeval import verify_ifeval
from posttrain.types import PromptExample

MAX_NEW_TOKENS = 1024
DEFAULT = DataDefault(layout="ifeval/input_data.jsonl", hf="google/IFEval")
STYLE = PromptStyle()


def ifeval(ctx: EvalContext, cfg: EvalTaskConfig) -> EvalResult:
    opts: SamplingOptions = task_options(cfg, "eval(ifeval)")
    examples: list[PromptExample] = load_examples(ctx, cfg, DEFAULT, "eval(ifeval)")  # type: ignore[assignment]
    prompts = [build_prompt(ctx.tokenizer, e, opts, STYLE) for e in examples]
    groups = sample(ctx, cfg, prompts, opts, MAX_NEW_TOKENS)
    records = []
    prompt_level = {"strict": [], "loose": []}
    followed = {"strict": 0, "loose": 0}
    instructions, truncated = 0, []
    for example, prompt, rollouts in zip(examples, prompts, groups):
        row = {**example.extra, "prompt": example.prompt}
        texts = completion_texts(rollouts, prompt.stop)
        results = [verify_ifeval(text, row) for text in texts]
        scores: dict[str, float] = {}
        weights: dict[str, float] = {}
        for mode in ("strict", "loose"):
            verdicts = [r.meta[f"followed_{mode}"] for r in results]
            prompt_level[mode] += [float(all(v)) for v in verdicts]
            followed[mode] += sum(sum(v) for v in verdicts)
            scores[f"ifeval_prompt_{mode}"] = mean([float(all(v)) for v in verdicts])
            # Instruction level pools instructions over prompts: the record's share, weighted by count.
            count = sum(len(v) for v in verdicts)
            scores[f"ifeval_instruction_{mode}"] = sum(sum(v) for v in verdicts) / count
            weights[f"ifeval_instruction_{mode}"] = float(count)
        instructions += sum(len(r.meta["followed_strict"]) for r in results)
        truncated += [r.truncated for r in rollouts]
        records.append({"id": record_id(example), "prompt": prompt.shown, "completions": texts,
                        "instruction_ids": results[0].meta["instruction_ids"],
                        "followed_strict": [r.meta["followed_strict"] for r in results],
                        "followed_loose": [r.meta["followed_loose"] for r in results],
                        "scores": scores, "weights": weights})
    metrics = {f"ifeval_prompt_{m}": mean(prompt_level[m]) for m in ("strict", "loose")}
    metrics.update({f"ifeval_instruction_{m}": followed[m] / max(instructions, 1) for m in ("strict", "loose")})
    metrics.update({"ifeval_truncated": mean([float(t) for t in truncated]), "ifeval_n": float(len(examples))})
    return EvalResult(metrics, records)


register_task("ifeval", ifeval, options=SamplingOptions, data=DEFAULT)
