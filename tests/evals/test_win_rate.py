"""Win-rate: the interval covers the true rate in simulation; the tie and position-bias policy;
the task end to end with a stub reward scorer and with a causal-LM judge."""

from __future__ import annotations

import random

import pytest

import posttrain.evals.win_rate as win_rate_module
from posttrain.config.components import EvalTaskConfig
from posttrain.errors import UserError
from posttrain.evals.base import run_evals
from posttrain.evals.stats import wilson_interval, win_rate_interval

PROMPTS = {"builtin": "demo.prompts", "split": "test"}


@pytest.mark.parametrize(("p_win", "p_tie"), [(0.5, 0.0), (0.8, 0.0), (0.95, 0.0), (0.4, 0.3), (0.1, 0.6)])
def test_interval_covers_the_true_rate_about_95_percent_of_the_time(p_win, p_tie):
    rng = random.Random(hash((p_win, p_tie)) % 1000)
    true_rate, n, runs = p_win + 0.5 * p_tie, 100, 1000
    covered = 0
    for _ in range(runs):
        scores = [1.0 if u < p_win else 0.5 if u < p_win + p_tie else 0.0 for u in (rng.random() for _ in range(n))]
        low, high = win_rate_interval(scores, 0.95)
        covered += low <= true_rate <= high
    # 1000 runs: the share's standard error is ~0.007; 0.925..0.975 is about +-3.5 of them.
    assert 0.925 <= covered / runs <= 0.975, covered / runs


def test_without_ties_the_interval_is_wilson():
    scores = [1.0] * 30 + [0.0] * 20
    low, high = win_rate_interval(scores)
    assert (low, high) == pytest.approx(wilson_interval(30, 50), abs=0.01)
    assert low < 0.6 < high


def _entry(**options) -> EvalTaskConfig:
    return EvalTaskConfig(task="win_rate", data=PROMPTS, limit=6, max_new_tokens=6, options=options)


def test_against_itself_every_prompt_is_a_tie(eval_ctx, saved_model, stubs_importable):
    """Same weights, greedy: identical responses. A reward model scores them equally; an LM judge
    sees the same text in both orders, so whatever it prefers flips with the order."""
    baseline = str(saved_model(0))  # the eval_ctx model is the seed-0 tiny model too
    for judge in ({"reward_model": f"{stubs_importable}:by_length"}, {"judge_model": baseline}):
        [(_, result)] = run_evals(eval_ctx, [_entry(baseline=baseline, **judge)])
        assert all(r["response"] == r["baseline_response"] for r in result.records)
        assert result.metrics["win_rate"] == 0.5 and result.metrics["win_rate_ties"] == 1.0
        assert result.metrics["win_rate_low"] < 0.5 < result.metrics["win_rate_high"]


def test_reward_scorer_verdicts_follow_the_scores(eval_ctx, saved_model, stubs_importable):
    [(_, result)] = run_evals(eval_ctx, [_entry(baseline=str(saved_model(1)),
                                                reward_model=f"{stubs_importable}:by_length")])
    for r in result.records:
        mine, theirs = len(r["response"]), len(r["baseline_response"])
        assert r["verdict"] == (1.0 if mine > theirs else 0.0 if mine < theirs else 0.5)
    assert result.metrics["win_rate"] == pytest.approx(sum(r["verdict"] for r in result.records) / 6)
    assert set(result.metrics) == {"win_rate", "win_rate_low", "win_rate_high", "win_rate_ties", "win_rate_n"}


class _FakeJudge:
    """P(A) per judge prompt from a rule over the prompt text."""

    def __init__(self, rule):
        self.rule = rule

    def first_label_probability(self, questions, labels):
        assert labels == ("A", "B")
        return [self.rule(q) for q in questions]


def _policy_first(question: str) -> bool:
    return "Response A:\nPOLICY" in question


@pytest.mark.parametrize(("rule", "expected"), [
    (lambda q: 0.9, 0.5),  # always "A": pure position bias, the verdict flips with the order -> tie
    (lambda q: 0.1, 0.5),  # always "B": the same
    (lambda q: 0.8 if _policy_first(q) else 0.2, 1.0),  # prefers the policy's text in both orders
    (lambda q: 0.2 if _policy_first(q) else 0.8, 0.0),  # prefers the baseline's text in both orders
    (lambda q: 0.5, 0.5),  # indifferent
    (lambda q: 0.8 if _policy_first(q) else 0.5, 0.5),  # prefers the policy in one order only
])
def test_both_orders_cancel_position_bias(monkeypatch, eval_ctx, rule, expected):
    monkeypatch.setattr(win_rate_module, "load_judge", lambda *a, **k: _FakeJudge(rule))
    opts = win_rate_module.WinRateOptions(judge_model="unused", baseline="unused")
    scores, seen = win_rate_module.judge_both_orders(eval_ctx, opts, ["q1", "q2"], ["POLICY"] * 2, ["BASE"] * 2,
                                                      "eval")
    assert scores == [expected, expected]
    assert seen[0]["p_policy_as_a"] == rule("Response A:\nPOLICY")


def test_needs_a_baseline_and_exactly_one_judge(eval_ctx, stubs_importable):
    with pytest.raises(UserError, match="set exactly one of judge_model or reward_model"):
        run_evals(eval_ctx, [_entry()])
    with pytest.raises(UserError, match="no baseline"):
        run_evals(eval_ctx, [_entry(reward_model=f"{stubs_importable}:by_length")])


def test_a_reward_model_folder_is_a_scorer(tmp_path, demo_tokenizer, tiny_lm):
    import torch
    from transformers import LlamaForSequenceClassification

    from posttrain.evals.judge import ResponseScorer, load_scorer

    config = tiny_lm.config.__class__.from_dict({**tiny_lm.config.to_dict(), "num_labels": 1})
    with torch.random.fork_rng():
        torch.manual_seed(0)
        LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    demo_tokenizer.save_pretrained(tmp_path / "rm")
    scorer = load_scorer(str(tmp_path / "rm"), where="reward_model")
    assert isinstance(scorer, ResponseScorer)
    scores = scorer(["What is 2 + 2?"] * 3, ["4", "It is 4.", "five"])
    assert len(scores) == 3 and len(set(scores)) == 3
    assert scorer(["What is 2 + 2?"], ["It is 4."]) == pytest.approx(scores[1:2], abs=1e-5)  # padding is inert
    with pytest.raises(UserError, match="neither a reward-model folder"):
        load_scorer(str(tmp_path / "nothing"), where="reward_model")
