"""``win_rate``: how often the model's response beats its parent checkpoint's on the same prompts.

Both models answer every prompt (``options`` sampling settings; greedy by default). The baseline
is ``options.baseline`` (a model folder), else the parent checkpoint the pipeline passes in
(``EvalContext.parent``). The data is any prompt set (prompt, prompt+completion, messages or
preference rows; their prompts are used); there is no default.

Judges (exactly one):

- ``judge_model``: a causal LM (`LMJudge`) shown the prompt and both responses, asked "A or B".
  Each prompt is judged in both orders, to cancel position bias. Policy in first place:
  prefers the policy when P(A) > 0.5; in second place: when P(A) < 0.5. Tie policy: the policy
  wins (1) when both orders prefer it, loses (0) when both prefer the baseline, and a prompt whose
  verdict flips with the order (or where the judge is exactly indifferent) is a tie (0.5).
  ``win_rate_ties`` is then the share of position-inconsistent verdicts.
- ``reward_model``: a `ResponseScorer` (``"package.module:object"`` or a reward-model folder)
  scores each response alone, so order does not arise: win if the policy's score is higher,
  tie (0.5) if equal.

Metrics: ``win_rate`` (mean of the per-prompt scores), ``win_rate_low`` / ``win_rate_high`` (a
``options.confidence`` interval: Wilson on an effective sample size that accounts for ties, see
`win_rate_interval`; simulated coverage is checked by the tests), ``win_rate_ties``,
``win_rate_n``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field, model_validator

from posttrain.config.components import EvalTaskConfig
from posttrain.errors import UserError, problem
from posttrain.evals.base import EvalContext, EvalResult, register_task, task_options
from posttrain.evals.common import (
    PromptStyle,
    SamplingOptions,
    build_prompt,
    completion_texts,
    load_examples,
    load_model_folder,
    mean,
    model_device,
    record_id,
    sample,
)
from posttrain.evals.judge import PAIRWISE_PROMPT, as_text, load_judge, load_scorer
from posttrain.evals.stats import win_rate_interval
from posttrain.types import Example, Text

MAX_NEW_TOKENS = 256
STYLE = PromptStyle()


class WinRateOptions(SamplingOptions):
    baseline: str | None = Field(None, description="the baseline model folder; default: the parent checkpoint")
    judge_model: str | None = Field(None, description="a causal LM folder that judges A against B")
    reward_model: str | None = Field(None, description="'package.module:object' scorer or a reward-model folder")
    confidence: float = Field(0.95, gt=0, lt=1, description="coverage of the win-rate interval")

    @model_validator(mode="after")
    def _one_judge(self) -> WinRateOptions:
        if bool(self.judge_model) == bool(self.reward_model):
            raise ValueError("set exactly one of judge_model or reward_model; fix: name the judge")
        if self.n != 1:
            raise ValueError("win_rate compares one response per prompt; fix: remove n")
        return self


def _responses(ctx: EvalContext, cfg: EvalTaskConfig, examples: list[Example], opts: WinRateOptions
               ) -> tuple[list[Text], list[str]]:
    """What the model was asked, and its one response per prompt."""
    prompts = [build_prompt(ctx.tokenizer, e, opts, STYLE) for e in examples]
    groups = sample(ctx, cfg, prompts, opts, MAX_NEW_TOKENS)
    return [p.shown for p in prompts], [completion_texts(rollouts, p.stop)[0] for rollouts, p in zip(groups, prompts)]


def _baseline_responses(ctx: EvalContext, cfg: EvalTaskConfig, examples: list[Example], opts: WinRateOptions,
                        where: str) -> list[str]:
    folder = opts.baseline or (str(ctx.parent) if ctx.parent else None)
    if folder is None:
        raise UserError(problem(f"{where}.options.baseline", "no baseline: this model has no parent checkpoint",
                                "set options.baseline to the model folder to compare against"))
    path = Path(folder).expanduser()
    if not path.is_absolute() and ctx.base_dir is not None:
        path = ctx.base_dir / path
    model, tokenizer = load_model_folder(path, where=f"{where}.options.baseline", device=model_device(ctx.model))
    baseline_ctx = EvalContext(model=model, tokenizer=tokenizer, base_dir=ctx.base_dir,
                               show_progress=ctx.show_progress, seed=ctx.seed)
    _, responses = _responses(baseline_ctx, cfg, examples, opts)
    del model, baseline_ctx  # free the baseline before the judge loads
    return responses


def judge_both_orders(ctx: EvalContext, opts: WinRateOptions, prompts: list[Text], policy: list[str],
                      baseline: list[str], where: str) -> tuple[list[float], list[dict[str, float]]]:
    """Per-prompt scores (1 win, 0.5 tie, 0 loss) and what the judge saw, per the module's policy."""
    device = model_device(ctx.model)
    if opts.reward_model:
        scorer = load_scorer(opts.reward_model, where=f"{where}.options.reward_model", base_dir=ctx.base_dir,
                             device=device)
        mine, theirs = scorer(prompts, policy), scorer(prompts, baseline)
        scores = [1.0 if a > b else 0.0 if a < b else 0.5 for a, b in zip(mine, theirs)]
        return scores, [{"policy_score": a, "baseline_score": b} for a, b in zip(mine, theirs)]
    judge = load_judge(opts.judge_model or "", where=f"{where}.options.judge_model", base_dir=ctx.base_dir,
                       device=device)
    first = [PAIRWISE_PROMPT.format(prompt=as_text(p), a=a, b=b) for p, a, b in zip(prompts, policy, baseline)]
    second = [PAIRWISE_PROMPT.format(prompt=as_text(p), a=b, b=a) for p, a, b in zip(prompts, policy, baseline)]
    p_first = judge.first_label_probability(first, ("A", "B"))
    p_second = judge.first_label_probability(second, ("A", "B"))
    scores = []
    for a, b in zip(p_first, p_second):
        # +1: this order prefers the policy, -1: the baseline, 0: indifferent (P = 0.5 exactly).
        first_order, second_order = _sign(a - 0.5), _sign(0.5 - b)
        scores.append(1.0 if first_order == second_order == 1 else 0.0 if first_order == second_order == -1 else 0.5)
    return scores, [{"p_policy_as_a": a, "p_policy_as_b": 1 - b} for a, b in zip(p_first, p_second)]


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


@torch.no_grad()
def win_rate(ctx: EvalContext, cfg: EvalTaskConfig) -> EvalResult:
    where = "eval(win_rate)"
    opts: WinRateOptions = task_options(cfg, where)
    examples = load_examples(ctx, cfg, None, where, force_prompt=False)
    prompts, policy = _responses(ctx, cfg, examples, opts)
    baseline = _baseline_responses(ctx, cfg, examples, opts, where)
    scores, seen = judge_both_orders(ctx, opts, prompts, policy, baseline, where)
    low, high = win_rate_interval(scores, opts.confidence)
    records = [{"id": record_id(e), "prompt": p, "response": a, "baseline_response": b, "verdict": s,
                "judge": j, "scores": {"win_rate": s}}
               for e, p, a, b, s, j in zip(examples, prompts, policy, baseline, scores, seen)]
    metrics = {"win_rate": mean(scores), "win_rate_low": low, "win_rate_high": high,
               "win_rate_ties": mean([float(s == 0.5) for s in scores]), "win_rate_n": float(len(scores))}
    return EvalResult(metrics, records)


register_task("win_rate", win_rate, options=WinRateOptions)
