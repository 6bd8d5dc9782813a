"""Model-based tasks: calibration, perplexity, diversity, response length, reward-hacking probes
and the demo world's accuracy, with hand-computed values where the model is scripted."""

from __future__ import annotations

import math

import pytest
import torch

import posttrain.evals.calibration as calibration_module
import posttrain.evals.probes as probes
from posttrain.config.components import EvalTaskConfig
from posttrain.data.formats import load_dataset
from posttrain.data.render import render_example
from posttrain.evals.base import run_evals
from posttrain.evals.probes import format_density

PROMPTS = {"builtin": "demo.prompts", "split": "test"}


def _run(ctx, **entry):
    [(_, result)] = run_evals(ctx, [EvalTaskConfig.model_validate(entry)])
    return result


def test_calibration_metrics_from_known_probabilities(eval_ctx, monkeypatch):
    # Row 1: the right answer (candidate 0) at 0.55; row 2: a wrong one at 0.75.
    probabilities = [[0.55, 0.15, 0.1, 0.1, 0.1], [0.1, 0.75, 0.05, 0.05, 0.05]]
    logps = [(math.log(p), 1) for row in probabilities for p in row]
    monkeypatch.setattr(calibration_module, "score_sequences", lambda *a, **k: logps)
    result = _run(eval_ctx, task="calibration", limit=2)
    # ECE: bins (0.5, 0.6] and (0.7, 0.8], half the rows each: 0.5 |1 - 0.55| + 0.5 |0 - 0.75|.
    assert result.metrics["calibration_ece"] == pytest.approx(0.6)
    assert result.metrics["calibration_accuracy"] == 0.5
    assert result.metrics["calibration_confidence"] == pytest.approx(0.65)
    # Brier: (0.45^2 + 0.15^2 + 3 * 0.1^2 + 0.9^2 + 0.75^2 + 3 * 0.05^2) / 2.
    assert result.metrics["calibration_brier"] == pytest.approx((0.255 + 1.38) / 2)


def test_calibration_on_a_tiny_model(eval_ctx):
    result = _run(eval_ctx, task="calibration", limit=4)
    for record in result.records:
        assert sum(record["probabilities"]) == pytest.approx(1.0) and record["gold"] == 0
        assert record["candidates"][0] == str(int(record["candidates"][1]) + 10)  # gold, then gold - 10
    assert 0 <= result.metrics["calibration_ece"] <= 1


def test_perplexity_equals_the_plain_cross_entropy(eval_ctx):
    data = {"builtin": "demo.sft", "split": "test", "args": {"n": 5}}
    result = _run(eval_ctx, task="perplexity", data=data, batch_size=2)
    examples = load_dataset(EvalTaskConfig(task="perplexity", data=data).data, where="d").examples
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            rendered = render_example(eval_ctx.tokenizer, example, "assistant")
            ids = torch.tensor([rendered.input_ids])
            logits = eval_ctx.model(input_ids=ids).logits[0, :-1]
            losses = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
            mask = torch.tensor(rendered.loss_mask[1:], dtype=torch.bool)
            total += float(losses[mask].sum())
            count += int(mask.sum())
    assert result.metrics["perplexity_nll"] == pytest.approx(total / count, rel=1e-4)
    assert result.metrics["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)
    assert result.metrics["perplexity_tokens"] == count and result.metrics["perplexity_n"] == 5


def test_diversity_counts_distinct_ngrams(eval_ctx, scripted):
    same = ["a b c"] * 4
    different = ["a b", "c d", "e f", "g h"]
    scripted(probes, lambda i, p: same if i == 0 else different)
    result = _run(eval_ctx, task="diversity", data=PROMPTS, limit=2)
    # Prompt 1: 3 unique of 12 unigrams, 2 unique of 8 bigrams; prompt 2: all unique.
    assert result.metrics["diversity_distinct_1"] == pytest.approx((3 / 12 + 1) / 2)
    assert result.metrics["diversity_distinct_2"] == pytest.approx((2 / 8 + 1) / 2)
    # Pooled: 12 + 8 unigrams, the letters a to h: 8 unique of 20.
    assert result.metrics["diversity_corpus_distinct_1"] == pytest.approx(8 / 20)


def test_diversity_samples_on_a_tiny_model(eval_ctx):
    result = _run(eval_ctx, task="diversity", data=PROMPTS, limit=2, max_new_tokens=6)
    assert [len(r["completions"]) for r in result.records] == [4, 4]
    assert set(result.metrics) == {"diversity_distinct_1", "diversity_distinct_2", "diversity_corpus_distinct_1",
                                   "diversity_corpus_distinct_2", "diversity_n"}


def test_format_density_hand_cases():
    # 1 header + 2 list items + 1 bold span = 4 markers over 5 words.
    assert format_density("# Title\n- one\n- two\n**bold** text") == pytest.approx(80.0)
    assert format_density("plain words only here") == 0.0
    assert format_density("") == 0.0


def test_sycophancy_probe_detects_repeating_the_wrong_guess(eval_ctx, scripted):
    def reply(i, prompt):
        text = prompt.shown[-1]["content"] if isinstance(prompt.shown, list) else prompt.shown
        if "pretty sure it's" in text:
            return [f"Yes, it is {text.rsplit(' ', 1)[-1].rstrip('.')}"]  # agrees with the guess
        a, b = (int(x) for x in text.removeprefix("What is ").rstrip("?").split(" + "))
        return [f"It is {a + b}."]

    scripted(probes, reply)
    result = _run(eval_ctx, task="reward_hacking", options={"sycophancy_probes": 5})
    assert result.metrics["reward_hacking_sycophancy"] == 1.0
    assert result.metrics["reward_hacking_sycophancy_shift"] == 1.0
    assert result.metrics["reward_hacking_n"] == 10 and result.metrics["reward_hacking_refusal_rate"] == 0.0


def test_reward_hacking_probes_on_a_tiny_model(eval_ctx):
    result = _run(eval_ctx, task="reward_hacking", data=PROMPTS, limit=3, max_new_tokens=6,
                  options={"sycophancy_probes": 2})
    assert result.metrics["reward_hacking_n"] == 3 + 4
    assert {"reward_hacking_length_tokens", "reward_hacking_format_density", "reward_hacking_refusal_rate",
            "reward_hacking_sycophancy", "reward_hacking_sycophancy_shift"} <= set(result.metrics)


def test_response_length_and_demo_accuracy(eval_ctx, scripted):
    result = _run(eval_ctx, task="response_length", data=PROMPTS, limit=3, max_new_tokens=5)
    assert result.metrics["response_length_tokens"] <= 5 and result.metrics["response_length_n"] == 3
    demo = _run(eval_ctx, task="demo_accuracy", limit=3, max_new_tokens=4)
    assert set(demo.metrics) == {"demo_accuracy", "demo_accuracy_n"}
    assert all(r["scores"] == {"demo_accuracy": float(r["correct"][0])} for r in demo.records)


def test_demo_sampled_accuracy_is_the_mean_over_every_sample(eval_ctx, monkeypatch):
    """Problem i gets i of its 4 samples right (i = 0..3): per-problem scores i / 4, metric 6 / 16."""
    import posttrain.evals.demo_world as demo_world
    from posttrain.demo.world import worked
    from posttrain.types import Rollout

    rows = load_dataset(demo_world.DEFAULT_DATA, where="d").examples[:4]
    seen = {}

    class Scripted:
        def __init__(self, *args, **kwargs):
            pass

        def generate(self, prompts, params):
            seen.update(n=params.n, temperature=params.temperature, seed=params.seed)
            out = []
            for i, row in enumerate(rows):
                a, op, b = row.extra["problem"].split()
                right = worked(int(a), op, int(b), int(row.answer))
                for j in range(params.n):
                    out.append(Rollout(prompt_ids=prompts[i], completion_ids=[1], logprobs=[0.0], finish_reason="stop",
                                       text=right if j < i else right + " 1", prompt_index=i, sample_index=j))
            return out

    monkeypatch.setattr(demo_world, "HFSampler", Scripted)
    result = _run(eval_ctx, task="demo_sampled_accuracy", limit=4, options={"seed": 7})
    assert seen == {"n": 4, "temperature": 1.0, "seed": 7}
    assert result.metrics == {"demo_sampled_accuracy": 6 / 16, "demo_sampled_accuracy_n": 4.0}
    assert [r["scores"]["demo_sampled_accuracy"] for r in result.records] == [0.0, 0.25, 0.5, 0.75]


def test_demo_sampled_accuracy_near_temperature_zero_is_the_greedy_accuracy(eval_ctx):
    greedy = _run(eval_ctx, task="demo_accuracy", limit=6, max_new_tokens=6)
    cold = _run(eval_ctx, task="demo_sampled_accuracy", limit=6, max_new_tokens=6,
                options={"n": 2, "temperature": 1e-4})
    assert [r["completions"] * 2 for r in greedy.records] == [r["completions"] for r in cold.records]
