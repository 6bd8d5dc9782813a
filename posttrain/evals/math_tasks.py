"""Math word problems scored by the math verifier (the same one RL rewards use).

``gsm8k``   GSM8K (``question``, ``answer`` = worked solution ending ``#### 18``); default file
            ``$POSTTRAIN_EVAL_DATA/gsm8k/test.jsonl``, or ``data: {hf: openai/gsm8k}``.
``math500`` MATH-500 (``problem``, ``answer``); rows of the full MATH test set, which carry only a
            ``solution``, work too (its last ``\\boxed{}`` is the answer). Default file
            ``$POSTTRAIN_EVAL_DATA/math500/test.jsonl``.

Metrics (``<task>`` = gsm8k | math500): ``<task>_accuracy`` (mean correctness over every sample:
greedy accuracy, or the pass@1 estimate with n samples), ``<task>_pass@k`` for each k in
``options.k`` when ``options.n > 1`` (unbiased estimator), ``<task>_truncated`` (share of samples
that hit max_new_tokens), ``<task>_n`` (problems). Records: one per problem with the extracted
answers and per-sample verdicts.
"""

from __future__ import annotations

from posttrain.config.components import EvalTaskConfig
from posttrain.errors import UserError, problem
from posttrain.evals.base import EvalContext, EvalResult, register_task, task_options
from posttrain.evals.common import (
    DataDefault,
    PassAtKOptions,
    PromptStyle,
    build_prompt,
    completion_texts,
    load_examples,
    mean,
    record_id,
    sample,
)
from posttrain.evals.stats import pass_at_k
from posttrain.rewards.verifiers import get_verifier
from posttrain.types import PromptExample

MAX_NEW_TOKENS = 512
_BOXED = "Please reason step by step, and put your final answer within \\boxed{}."
STYLE = PromptStyle(chat="{prompt}\n" + _BOXED, plain="Question: {prompt}\nAnswer:",
                    plain_stop=("\n\nQuestion:", "\nQuestion:"))
DEFAULTS = {
    "gsm8k": DataDefault(layout="gsm8k/test.jsonl", hf="openai/gsm8k", fields={"prompt": "question"}),
    "math500": DataDefault(layout="math500/test.jsonl", hf="HuggingFaceH4/MATH-500", fields={"prompt": "problem"}),
}


def gold_answer(example: PromptExample, where: str) -> str:
    """The reference: ``answer`` (GSM8K's ``#### x`` tail is taken by the verifier), else the last
    box of ``solution`` (MATH)."""
    gold = example.answer if example.answer is not None else example.extra.get("solution")
    if gold is None or not str(gold).strip():
        raise UserError(problem(f"{example.source}", "no reference answer ('answer' or 'solution')",
                                f"add an answer to every row, or map a column with {where}.data.fields"))
    return str(gold)


def score_math(name: str, ctx: EvalContext, cfg: EvalTaskConfig) -> EvalResult:
    where = f"eval({name})"
    opts: PassAtKOptions = task_options(cfg, where)
    examples: list[PromptExample] = load_examples(ctx, cfg, DEFAULTS[name], where)  # type: ignore[assignment]
    golds = [gold_answer(e, where) for e in examples]
    prompts = [build_prompt(ctx.tokenizer, e, opts, STYLE) for e in examples]
    groups = sample(ctx, cfg, prompts, opts, MAX_NEW_TOKENS)
    verify = get_verifier("math")
    records, per_k = [], {k: [] for k in opts.k}
    correct_all, truncated = [], []
    for example, gold, prompt, rollouts in zip(examples, golds, prompts, groups):
        texts = completion_texts(rollouts, prompt.stop)
        results = [verify(text, {"answer": gold}) for text in texts]
        verdicts = [r.score == 1.0 for r in results]
        correct_all += verdicts
        truncated += [r.truncated for r in rollouts]
        scores = {f"{name}_accuracy": mean([float(v) for v in verdicts])}
        for k in opts.k:
            per_k[k].append(pass_at_k(len(verdicts), sum(verdicts), k))
            if opts.n > 1:
                scores[f"{name}_pass@{k}"] = per_k[k][-1]
        records.append({"id": record_id(example), "prompt": prompt.shown, "answer": gold, "completions": texts,
                        "extracted": [r.meta.get("extracted") for r in results], "correct": verdicts,
                        "truncated": [r.truncated for r in rollouts], "scores": scores})
    metrics = {f"{name}_accuracy": mean([float(v) for v in correct_all]),
               f"{name}_truncated": mean([float(t) for t in truncated]), f"{name}_n": float(len(examples))}
    if opts.n > 1:
        metrics.update({f"{name}_pass@{k}": mean(values) for k, values in per_k.items()})
    return EvalResult(metrics, records)


def gsm8k(ctx: EvalContext, cfg: EvalTaskConfig) -> EvalResult:
    return score_math("gsm8k", ctx, cfg)


def math500(ctx: EvalContext, cfg: EvalTaskConfig) -> EvalResult:
    return score_math("math500", ctx, cfg)


register_task("gsm8k", gsm8k, options=PassAtKOptions, data=DEFAULTS["gsm8k"])
register_task("math500", math500, options=PassAtKOptions, data=DEFAULTS["math500"])
