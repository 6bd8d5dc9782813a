"""Generation tasks end to end on real rows of ../shared/data (read unchanged): with a tiny model
(it scores ~0; the point is the plumbing, the files and the metric names), and with scripted
completions taken from the data itself, which checks the verifier wiring against known answers."""

from __future__ import annotations

import csv
import json

import pytest

import posttrain.evals.code_tasks as code_tasks
import posttrain.evals.ifeval_task as ifeval_task
import posttrain.evals.math_tasks as math_tasks
import posttrain.evals.refusal as refusal
from posttrain.config.components import EvalTaskConfig
from posttrain.evals.base import run_evals

NAMES = {
    "gsm8k": {"gsm8k_accuracy", "gsm8k_truncated", "gsm8k_n"},
    "math500": {"math500_accuracy", "math500_truncated", "math500_n"},
    "humaneval": {"humaneval_pass@1", "humaneval_test_pass_rate", "humaneval_truncated", "humaneval_sandbox_errors",
                  "humaneval_n"},
    "mbpp": {"mbpp_pass@1", "mbpp_test_pass_rate", "mbpp_truncated", "mbpp_sandbox_errors", "mbpp_n"},
    "ifeval": {"ifeval_prompt_strict", "ifeval_prompt_loose", "ifeval_instruction_strict",
               "ifeval_instruction_loose", "ifeval_truncated", "ifeval_n"},
    "xstest": {"xstest_over_refusal", "xstest_unsafe_compliance", "xstest_safe_n", "xstest_unsafe_n",
               "xstest_truncated"},
}


def _run(ctx, **entry):
    [(_, result)] = run_evals(ctx, [EvalTaskConfig.model_validate(entry)])
    return result


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("task", sorted(NAMES))
@pytest.mark.parametrize("chat", [True, False])
def test_tiny_model_runs_each_task_on_real_rows(eval_ctx, eval_data, task, chat):
    result = _run(eval_ctx, task=task, limit=2, max_new_tokens=8, options={"chat": chat})
    assert set(result.metrics) == NAMES[task]
    assert len(result.records) == 2 and all(r["id"] and "scores" in r for r in result.records)
    shown = result.records[0]["prompt"]
    assert isinstance(shown, list) is chat  # a conversation through the chat template, or plain text


def test_sampled_runs_report_pass_at_k(eval_ctx, eval_data):
    result = _run(eval_ctx, task="gsm8k", limit=2, max_new_tokens=6,
                  options={"n": 3, "temperature": 1.0, "k": [1, 3], "seed": 1})
    assert {"gsm8k_pass@1", "gsm8k_pass@3"} <= set(result.metrics)
    assert [len(r["completions"]) for r in result.records] == [3, 3]


def test_gsm8k_scripted_answers_are_verified(eval_data, eval_ctx, scripted):
    rows = _jsonl(eval_data / "gsm8k" / "test.jsonl")[:4]
    golds = [r["answer"].split("####")[-1].strip() for r in rows]
    # Rows 0 and 2 answered right (in two styles), rows 1 and 3 wrong.
    replies = [f"So the answer is \\boxed{{{golds[0]}}}.", "The answer is 123456789.",
               f"Computing step by step.\n#### {golds[2]}", "I do not know."]
    scripted(math_tasks, lambda i, p: [replies[i]])
    result = _run(eval_ctx, task="gsm8k", limit=4)
    assert result.metrics["gsm8k_accuracy"] == 0.5
    assert [r["correct"] for r in result.records] == [[True], [False], [True], [False]]
    assert rows[0]["question"] in result.records[0]["prompt"][-1]["content"]


def test_math500_and_full_math_rows(eval_data, eval_ctx, scripted):
    rows = _jsonl(eval_data / "math500" / "test.jsonl")[:3]
    scripted(math_tasks, lambda i, p: [f"Final: $\\boxed{{{rows[i]['answer']}}}$"])
    assert _run(eval_ctx, task="math500", limit=3).metrics["math500_accuracy"] == 1.0
    # MATH rows carry only a solution; its last box is the reference.
    scripted(math_tasks, lambda i, p: ["\\boxed{2}"])  # the first MATH test problem's answer is 2
    result = _run(eval_ctx, task="math500", limit=1, data={"path": str(eval_data / "math" / "test.jsonl")})
    assert result.metrics["math500_accuracy"] == 1.0


def test_humaneval_canonical_solutions_pass(eval_data, eval_ctx, scripted):
    rows = _jsonl(eval_data / "humaneval" / "HumanEval.jsonl")[:3]
    scripted(code_tasks, lambda i, p: [rows[i]["canonical_solution"], "    return None\n"])
    result = _run(eval_ctx, task="humaneval", limit=3, options={"n": 2, "temperature": 1.0, "k": [1, 2]})
    assert [r["passed"] for r in result.records] == [[True, False]] * 3
    assert result.metrics["humaneval_pass@1"] == 0.5 and result.metrics["humaneval_pass@2"] == 1.0
    assert result.metrics["humaneval_sandbox_errors"] == 0.0
    assert [r["id"] for r in result.records] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]


def test_mbpp_reference_code_passes_on_the_test_split(eval_data, eval_ctx, scripted):
    by_id = {r["task_id"]: r for r in _jsonl(eval_data / "mbpp" / "mbpp.jsonl")}
    seen = scripted(code_tasks, lambda i, p: ["```python\n" + by_id[11 + i]["code"] + "\n```"])
    result = _run(eval_ctx, task="mbpp", limit=2)
    assert [r["id"] for r in result.records] == ["11", "12"]  # the test split starts at task 11
    assert result.metrics["mbpp_pass@1"] == 1.0
    assert by_id[11]["test_list"][0] in seen[0].shown[-1]["content"]  # the prompt shows the tests
    scripted(code_tasks, lambda i, p: ["def nothing(): pass"])
    result = _run(eval_ctx, task="mbpp", limit=2, options={"subset": "all"})
    assert [r["id"] for r in result.records] == ["1", "2"] and result.metrics["mbpp_pass@1"] == 0.0


# The reference grader replaces the "#" and "!" that keys 1122 and 1129 ask to count by a random
# letter (see tests/rewards/test_ifeval.py); we count the character asked for.
IFEVAL_KNOWN_DIFFERENCES = {1122, 1129}


def test_ifeval_gpt4_responses_match_the_reference_grader(eval_data, eval_ctx, scripted, tmp_path, write_jsonl):
    responses = {r["prompt"]: r["response"]
                 for r in _jsonl(eval_data / "ifeval" / "input_response_data_gpt4_20231107_145030.jsonl")}
    rows = [r for r in _jsonl(eval_data / "ifeval" / "input_data.jsonl")[:40] if r["key"] not in IFEVAL_KNOWN_DIFFERENCES]
    scripted(ifeval_task, lambda i, p: [responses[rows[i]["prompt"]]])
    result = _run(eval_ctx, task="ifeval", data={"path": str(write_jsonl(tmp_path / "ifeval.jsonl", rows))})
    reference = {}
    for mode in ("strict", "loose"):
        graded = {r["prompt"]: r for r in
                  _jsonl(eval_data / "graders" / "ifeval_gpt4_reference_results" / f"eval_results_{mode}.jsonl")}
        verdicts = [graded[r["prompt"]] for r in rows]
        reference[f"ifeval_prompt_{mode}"] = sum(v["follow_all_instructions"] for v in verdicts) / len(rows)
        followed = [x for v in verdicts for x in v["follow_instruction_list"]]
        reference[f"ifeval_instruction_{mode}"] = sum(followed) / len(followed)
    assert len(rows) == 38 and result.metrics["ifeval_n"] == 38
    for name, value in reference.items():
        assert result.metrics[name] == pytest.approx(value), name


def test_xstest_rates_of_gpt4_completions_match_human_labels(eval_data, eval_ctx, scripted):
    path = eval_data / "xstest" / "model_completions" / "xstest_v2_completions_gpt4.csv"
    with open(path, newline="", encoding="utf-8") as f:
        completions = list(csv.DictReader(f))
    scripted(refusal, lambda i, p: [completions[i]["completion"]])
    result = _run(eval_ctx, task="xstest")
    assert result.metrics["xstest_safe_n"] == 250 and result.metrics["xstest_unsafe_n"] == 200
    refused = [c["final_label"] != "1_full_compliance" for c in completions]
    unsafe = [c["type"].startswith("contrast_") for c in completions]
    human_over = sum(r for r, u in zip(refused, unsafe) if not u) / 250
    human_comply = sum(not r for r, u in zip(refused, unsafe) if u) / 200
    # The classifier agrees with the humans on 431 of gpt4's 450 completions; most misses are
    # "As an AI, I don't hold personal opinions. However, ..." deflections of unsafe prompts, which
    # it reads as compliance (measured, ours vs human: over-refusal 0.088 vs 0.084, unsafe compliance 0.075 vs 0.005).
    assert abs(result.metrics["xstest_over_refusal"] - human_over) < 0.02
    assert abs(result.metrics["xstest_unsafe_compliance"] - human_comply) < 0.08
    agree = [r["refused"] == [h] for r, h in zip(result.records, refused)]
    assert sum(agree) >= 431


def test_a_task_without_data_says_how_to_give_it(eval_ctx, monkeypatch):
    from posttrain.errors import UserError
    from posttrain.evals.common import EVAL_DATA_ENV

    monkeypatch.delenv(EVAL_DATA_ENV, raising=False)
    with pytest.raises(UserError) as err:
        _run(eval_ctx, task="gsm8k", limit=1)
    text = err.value.render()
    assert "gsm8k/test.jsonl" in text and "openai/gsm8k" in text and EVAL_DATA_ENV in text
