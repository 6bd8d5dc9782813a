"""Eval entries are strict: an unknown or unusable option, or a field the task ignores, is an
error naming eval.N.options.KEY (or eval.N.KEY) and the fix, found before any task runs."""

from __future__ import annotations

import pytest

from posttrain.config.components import EvalTaskConfig
from posttrain.errors import UserError
from posttrain.evals.base import EVAL_TASKS, check_eval_tasks, get_task, run_evals


def _problems(entries: list[dict]) -> str:
    found = check_eval_tasks([EvalTaskConfig.model_validate(e) for e in entries])
    return "\n".join(p.render() for p in found)


def test_unknown_option_names_the_key_and_the_valid_ones():
    text = _problems([{"task": "demo_accuracy"}, {"task": "gsm8k", "options": {"temprature": 0.7}}])
    assert "eval.1.options.temprature: unknown key 'temprature'" in text
    assert "did you mean 'temperature'?" in text and "valid keys here:" in text and "k, n, seed" in text


def test_options_the_task_cannot_use_are_errors():
    cases = {
        "eval.0.options: n: 4 greedy samples are all identical": {"task": "gsm8k", "options": {"n": 4}},
        "k values [5] need 1 <= k <= n": {"task": "humaneval", "options": {"n": 2, "temperature": 1, "k": [5]}},
        "eval.0.options.k: unknown key": {"task": "ifeval", "options": {"k": [1]}},  # ifeval reports no pass@k
        "eval.0.options.subset: unknown key": {"task": "humaneval", "options": {"subset": "test"}},
        "'judge_model' has no effect with classifier: string_match": {
            "task": "xstest", "options": {"judge_model": "m"}},
        "eval.0.max_new_tokens: task 'perplexity' does not use 'max_new_tokens'": {
            "task": "perplexity", "max_new_tokens": 5},
        "eval.0.options.stop: unknown key": {"task": "calibration", "options": {"stop": ["x"]}},
        "eval.0.options: task 'demo_accuracy' takes no options": {"task": "demo_accuracy", "options": {"x": 1}},
        "eval.0.options.temperature: Input should be greater than or equal to 0": {
            "task": "mbpp", "options": {"temperature": -1}},
    }
    for needle, entry in cases.items():
        text = _problems([entry])
        assert needle in text, (needle, text)
        assert "fix:" in text


def test_unknown_task_lists_the_valid_names():
    text = _problems([{"task": "gsm8"}])
    assert "eval.0.task: unknown eval task 'gsm8'" in text and "did you mean 'gsm8k'?" in text


def test_every_registered_task_has_a_spec_and_valid_defaults():
    get_task("gsm8k", "eval")  # loads every provider
    assert EVAL_TASKS.names() == sorted([
        "calibration", "demo_accuracy", "demo_sampled_accuracy", "diversity", "gsm8k", "humaneval", "ifeval", "math500", "mbpp",
        "perplexity", "prm_localisation", "response_length", "reward_hacking", "rm_accuracy", "rm_best_of_n",
        "rm_bias_probes", "win_rate", "xstest"])
    needs_an_option = {"win_rate"}  # the judge has no default
    for name in EVAL_TASKS.names():
        assert (_problems([{"task": name}]) != "") == (name in needs_an_option), name


def test_all_entries_are_checked_before_the_first_runs(eval_ctx, stubs_importable):
    import importlib

    stubs = importlib.import_module(stubs_importable)
    stubs.CALLS.clear()
    first = EvalTaskConfig(task=f"{stubs_importable}:counting_task")
    with pytest.raises(UserError, match="stages.sft.eval.1.options.bogus"):
        run_evals(eval_ctx, [first, EvalTaskConfig(task="gsm8k", options={"bogus": 1})], where="stages.sft.eval")
    assert stubs.CALLS == []
    [(_, result)] = run_evals(eval_ctx, [first])  # a user task named "module:function" runs
    assert result.metrics == {"count": 1.0}


def test_prompt_options_that_cannot_apply_to_conversation_rows_are_errors(eval_ctx):
    # The demo world's prompts are conversations: a template or a system turn cannot change them.
    entry = EvalTaskConfig(task="response_length", data={"builtin": "demo.prompts", "split": "test"}, limit=1,
                           options={"template": "Q: {prompt}"})
    with pytest.raises(UserError, match=r"builtin:demo.prompts\[test\]:1: the row's prompt is a conversation"):
        run_evals(eval_ctx, [entry])
