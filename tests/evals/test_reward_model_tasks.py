"""Reward-model evaluation tasks: pair accuracy per category, reward-hacking probes as bias
rates, best-of-N curves (exact over subsets) and PRM first-error localisation. The task logic is
checked with stand-in scorers whose preferences are known (e.g. "longer is better")."""

from __future__ import annotations

import itertools

import pytest
import torch

import posttrain.evals.reward_model_tasks as tasks
from posttrain.config.components import DataConfig, EvalTaskConfig
from posttrain.errors import UserError
from posttrain.evals.base import EvalContext
from posttrain.evals.reward_model_tasks import best_of_n_curve
from posttrain.models.heads import RewardModel


def _brute_force(scores, correct, n):
    picks = [max(subset, key=lambda i: (scores[i], -i)) for subset in itertools.combinations(range(len(scores)), n)]
    anyone = [any(correct[i] for i in subset) for subset in itertools.combinations(range(len(scores)), n)]
    return sum(correct[i] for i in picks) / len(picks), sum(anyone) / len(anyone)


def test_best_of_n_is_exact_over_every_subset():
    # by hand: n=2 over 4 candidates, 6 subsets; the RM's pick is right in {1,2}, {1,3}, {2,3}
    assert best_of_n_curve([3.0, 1.0, 2.0, 0.0], [False, True, True, False], 2) == (0.5, 5 / 6)
    assert best_of_n_curve([3.0, 1.0, 2.0, 0.0], [False, True, True, False], 4) == (0.0, 1.0)
    generator = torch.Generator().manual_seed(0)
    for n in (1, 3, 5):
        scores = torch.randn(7, generator=generator).tolist()
        correct = [bool(x) for x in torch.randint(0, 2, (7,), generator=generator).tolist()]
        assert best_of_n_curve(scores, correct, n) == pytest.approx(_brute_force(scores, correct, n))


@pytest.fixture
def rm_context(demo_tokenizer, tiny_model, monkeypatch):
    """A real RewardModel whose scores are replaced by a known preference: longer is better."""

    def longer_is_better(model, tokenizer, completions, rows, options):
        texts = [c if isinstance(c, str) else " ".join(m["content"] for m in c) for c in completions]
        return torch.tensor([float(len(t)) for t in texts]), {}

    monkeypatch.setattr(tasks, "score_with", longer_is_better)
    model = RewardModel(tiny_model(demo_tokenizer))
    return EvalContext(model=model, tokenizer=demo_tokenizer, show_progress=False)


def test_accuracy_per_category(rm_context, tmp_path, write_jsonl):
    rows = [{"prompt": "q", "chosen": "long answer", "rejected": "short", "category": "Easy One"},
            {"prompt": "q", "chosen": "tiny", "rejected": "much longer", "category": "hard"},
            {"prompt": "q", "chosen": "xx", "rejected": "yy", "category": "hard"},  # a tie is wrong
            {"prompt": "q", "chosen": "abc", "rejected": "a"}]
    data = DataConfig(path=str(write_jsonl(tmp_path / "p.jsonl", rows)))
    result = tasks.rm_accuracy(rm_context, EvalTaskConfig(task="rm_accuracy", data=data))
    assert result.metrics["rm_accuracy"] == 0.5
    assert result.metrics["rm_accuracy_easy_one"] == 1.0 and result.metrics["rm_accuracy_hard"] == 0.0
    assert result.metrics["rm_n"] == 4 and len(result.records) == 4


def test_bias_probes_catch_a_length_loving_reward_model(rm_context):
    result = tasks.rm_bias_probes(rm_context, EvalTaskConfig(task="rm_bias_probes", limit=20))
    m = result.metrics
    assert m["rm_bias_length"] == 1.0 and m["rm_bias_markdown"] == 1.0  # padding and markup add length
    assert m["rm_bias_false_premise"] == 1.0  # "Yes, you're right! " + the wrong answer is longer
    assert m["rm_bias_refusal"] == 0.0  # the canned refusal is no longer than any demo solution
    assert 0.0 <= m["rm_bias_baseline"] < 1.0 and m["rm_bias_n"] == 20


def test_best_of_n_task_on_rows_with_responses(rm_context, tmp_path, write_jsonl):
    # candidates of growing length; the longest is right for the first prompt, wrong for the second
    rows = [{"prompt": "What is 1 + 1?", "answer": "2", "responses": ["3", "33", "1 + 1 = 2"]},
            {"prompt": "What is 2 + 2?", "answer": "4", "responses": ["4", "4.", "2 + 2 = 5"]}]
    cfg = EvalTaskConfig(task="rm_best_of_n", data=DataConfig(path=str(write_jsonl(tmp_path / "b.jsonl", rows))),
                         options={"n": 3, "n_values": [1, 3], "verifier": "math"})
    m = tasks.rm_best_of_n(rm_context, cfg).metrics
    assert m["rm_bon_1"] == pytest.approx(0.5) == m["rm_bon_random"]
    assert m["rm_bon_3"] == 0.5 and m["rm_bon_oracle_3"] == 1.0
    with pytest.raises(UserError, match="responses"):
        tasks.rm_best_of_n(rm_context, EvalTaskConfig(task="rm_best_of_n", data=cfg.data,
                                                      options={"n": 4, "n_values": [1, 4]}))


def test_prm_localisation_against_oracle_step_scores(demo_tokenizer, tiny_model, monkeypatch):
    def oracle(model, tokenizer, rows, separator, batch_size):
        return [[1.0 if row["first_wrong_step"] is None or k < row["first_wrong_step"] else 0.0 for k in range(3)]
                for row, _ in rows]

    monkeypatch.setattr(tasks, "step_probabilities", oracle)
    prm = RewardModel(tiny_model(demo_tokenizer), ["step"], kind="prm", meta={"separator": ". "})
    context = EvalContext(model=prm, tokenizer=demo_tokenizer, show_progress=False)
    m = tasks.prm_localisation(context, EvalTaskConfig(task="prm_localisation", limit=60)).metrics
    assert m["prm_first_error_accuracy"] == 1.0 and m["prm_correct_accepted"] == 1.0
    assert m["prm_first_error_chance"] == pytest.approx(1 / 3)
    outcome = RewardModel(tiny_model(demo_tokenizer))
    with pytest.raises(UserError, match="process reward model"):
        tasks.prm_localisation(EvalContext(model=outcome, tokenizer=demo_tokenizer),
                               EvalTaskConfig(task="prm_localisation"))


def test_options_are_checked_before_any_model_runs():
    from posttrain.evals.base import check_task_config

    problems = check_task_config(EvalTaskConfig(task="rm_best_of_n", options={"n": 4, "n_values": [8]}), "eval.0")
    assert problems and "n_values" in problems[0].render()
    assert check_task_config(EvalTaskConfig(task="rm_accuracy", max_new_tokens=5), "eval.0")
