"""Python function synthesis scored in the code sandbox (the same verifier RL rewards use).

``humaneval`` HumanEval rows (``prompt`` = signature + docstring, ``test`` defining
              ``check(candidate)``, ``entry_point``); default file
              ``$POSTTRAIN_EVAL_DATA/humaneval/HumanEval.jsonl.gz`` (the upstream file, unchanged).
              Plain prompts are the function stub, continued by the model and cut at the Codex stop
              sequences; chat prompts ask for the whole function in a code block.
``mbpp``      MBPP rows (``text``, ``test_list``, ``test_setup_code``); default file
              ``$POSTTRAIN_EVAL_DATA/mbpp/mbpp.jsonl``. The prompt shows the task and its tests
              (Austin et al. 2021). ``options.subset: test`` (default) keeps task ids 11-510,
              the benchmark's test split, when the rows carry task ids; ``all`` keeps every row.

Metrics (``<task>`` = humaneval | mbpp): ``<task>_pass@k`` for each k in ``options.k`` (unbiased
estimator over ``options.n`` samples; greedy n = 1 gives pass@1), ``<task>_test_pass_rate`` (mean
share of a problem's tests passed), ``<task>_truncated``, ``<task>_n``. A sample whose sandbox could
not start is counted as failed and reported in ``<task>_sandbox_errors``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from posttrain.config.components import EvalTaskConfig
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
from posttrain.rewards.verifiers.code import verify_code_batch
from posttrain.types import PromptExample

MAX_NEW_TOKENS = 512
MBPP_TEST_IDS = range(11, 511)  # the benchmark's test split (1-10 are few-shot, 511+ train/validation)
CODEX_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n```")

HUMANEVAL_STYLE = PromptStyle(
    chat="Complete the following Python function. Reply with the whole function in a ```python code block."
         "\n\n```python\n{prompt}```",
    plain="{prompt}", plain_stop=CODEX_STOPS)
MBPP_STYLE = PromptStyle(
    chat="You are an expert Python programmer, and here is your task: {prompt} Your code should pass these "
         "tests:\n\n{tests}\n\nReply with the code in a ```python code block.",
    plain="You are an expert Python programmer, and here is your task: {prompt} Your code should pass these "
          "tests:\n\n{tests}\n```python\n",
    plain_stop=("```", "\nassert ", "\nprint("))
DEFAULTS = {
    "humaneval": DataDefault(layout="humaneval/HumanEval.jsonl.gz", hf="openai/openai_humaneval"),
    "mbpp": DataDefault(layout="mbpp/mbpp.jsonl", hf="google-research-datasets/mbpp", fields={"prompt": "text"}),
}


class MBPPOptions(PassAtKOptions):
    subset: Literal["test", "all"] = Field("test", description="test = task ids 11-510 (when rows have ids)")


def _mbpp_rows(examples: list[PromptExample], subset: str) -> list[PromptExample]:
    if subset == "all" or not any(isinstance(e.extra.get("task_id"), int) for e in examples):
        return examples
    return [e for e in examples if e.extra.get("task_id") in MBPP_TEST_IDS]


def _verifier_row(example: PromptExample) -> dict[str, Any]:
    """The code verifier's row: the set's fields, with HumanEval's stub as ``prompt``."""
    return {**example.extra, "prompt": example.prompt}


def score_code(name: str, ctx: EvalContext, cfg: EvalTaskConfig) -> EvalResult:
    where = f"eval({name})"
    opts = task_options(cfg, where)
    select = (lambda rows: _mbpp_rows(rows, opts.subset)) if name == "mbpp" else None
    examples: list[PromptExample] = load_examples(ctx, cfg, DEFAULTS[name], where, select=select)  # type: ignore
    style = MBPP_STYLE if name == "mbpp" else HUMANEVAL_STYLE
    values = [{"tests": "\n".join(e.extra.get("test_list") or e.extra.get("tests") or [])} for e in examples]
    prompts = [build_prompt(ctx.tokenizer, e, opts, style, v) for e, v in zip(examples, values)]
    groups = sample(ctx, cfg, prompts, opts, MAX_NEW_TOKENS)
    texts = [completion_texts(rollouts, p.stop) for rollouts, p in zip(groups, prompts)]
    flat_texts = [t for group in texts for t in group]
    flat_rows = [_verifier_row(e) for e, group in zip(examples, texts) for _ in group]
    results = iter(verify_code_batch(flat_texts, flat_rows))
    return _summarise(name, opts, examples, prompts, groups, texts, results)


def _summarise(name, opts, examples, prompts, groups, texts, results) -> EvalResult:
    records, per_k = [], {k: [] for k in opts.k}
    share, truncated, errors = [], [], 0
    for example, prompt, rollouts, group in zip(examples, prompts, groups, texts):
        verdicts = [next(results) for _ in group]
        errors += sum(r.score is None for r in verdicts)
        passed = [r.components.get("all_passed", 0.0) == 1.0 for r in verdicts]
        share += [r.components.get("pass_rate", 0.0) for r in verdicts]
        truncated += [r.truncated for r in rollouts]
        scores = {}
        for k in opts.k:
            per_k[k].append(pass_at_k(len(passed), sum(passed), k))
            scores[f"{name}_pass@{k}"] = per_k[k][-1]
        records.append({"id": record_id(example), "prompt": prompt.shown, "completions": group, "passed": passed,
                        "reasons": [r.meta.get("reason") or r.meta.get("error") for r in verdicts],
                        "truncated": [r.truncated for r in rollouts], "scores": scores})
    metrics = {f"{name}_pass@{k}": mean(values) for k, values in per_k.items()}
    metrics.update({f"{name}_test_pass_rate": mean(share), f"{name}_truncated": mean([float(t) for t in truncated]),
                    f"{name}_sandbox_errors": float(errors), f"{name}_n": float(len(examples))})
    return EvalResult(metrics, records)


def humaneval(ctx: EvalContext, cfg: EvalTaskConfig) -> EvalResult:
    return score_code("humaneval", ctx, cfg)


def mbpp(ctx: EvalContext, cfg: EvalTaskConfig) -> EvalResult:
    return score_code("mbpp", ctx, cfg)


register_task("humaneval", humaneval, options=PassAtKOptions, data=DEFAULTS["humaneval"])
register_task("mbpp", mbpp, options=MBPPOptions, data=DEFAULTS["mbpp"])
