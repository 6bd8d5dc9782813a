"""The offline loop's invariants: accumulation equals the full batch, the non-finite guard, the
schedule, and the step plan."""

from __future__ import annotations

import math
import random

import pytest
import torch

from posttrain.config import TrainConfig
from posttrain.data.batching import SEQ_MEAN_TOKEN_MEAN, TOKEN_MEAN, make_rows
from posttrain.data.render import render_example
from posttrain.loops.distributed import DistInfo
from posttrain.loops.offline import StepPlan, TrainingAborted, lr_factor, resolve_train, run_offline
from posttrain.stages.sft import lm_job
from posttrain.types import ChatExample, RowSource

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _examples(tokenizer, n: int, seed: int = 0):
    """Variable-length conversations (prompts padded with 0-9 filler words)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        turns = [{"role": "user", "content": f"What is {a} + {b}?" + " now" * rng.randint(0, 9)},
                 {"role": "assistant", "content": f"{a} + {b} = {a + b}" + "." * rng.randint(0, 5)}]
        out.append(render_example(tokenizer, ChatExample(turns, RowSource("x", i + 1)), "assistant"))
    return out


def _train(tokenizer, tiny_model, out_dir, *, aggregation=TOKEN_MEAN, packing=False, **train):
    settings = {"lr": 1e-3, "global_batch_size": 8, "micro_batch_size": 8, "max_steps": 3, "max_length": 128,
                "checkpoint_every": 0, "warmup_steps": 1, **train}
    cfg = TrainConfig(**settings)
    model = tiny_model(tokenizer)
    rows = make_rows(_examples(tokenizer, 24), packing=packing, max_length=cfg.max_length)
    resolved = resolve_train(cfg, len(rows), 1, seed=0)
    job = lm_job("t", model, rows, tokenizer.pad_token_id, aggregation, cfg, resolved, out_dir, CPU, False)
    result = run_offline(job)
    return model, result


def _max_diff(a, b) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("aggregation", [TOKEN_MEAN, SEQ_MEAN_TOKEN_MEAN])
def test_accumulation_4x2_equals_micro_batch_8(demo_tokenizer, tiny_model, tmp_path, aggregation):
    whole, r1 = _train(demo_tokenizer, tiny_model, tmp_path / "a", aggregation=aggregation)
    split, r2 = _train(demo_tokenizer, tiny_model, tmp_path / "b", aggregation=aggregation, micro_batch_size=2)
    fresh = tiny_model(demo_tokenizer)
    assert _max_diff(whole, fresh) > 1e-3  # training moved the weights
    assert _max_diff(whole, split) < 1e-5
    assert r1.final_metrics["loss"] == pytest.approx(r2.final_metrics["loss"], rel=1e-5)


def test_packed_training_equals_unpacked_training(demo_tokenizer, tiny_model, tmp_path):
    """Packing changes the batch layout only: the same rows per step give the same update."""
    plain, _ = _train(demo_tokenizer, tiny_model, tmp_path / "a", global_batch_size=24, micro_batch_size=24)
    packed, _ = _train(demo_tokenizer, tiny_model, tmp_path / "b", global_batch_size=24, micro_batch_size=24,
                       packing=True, max_length=512)
    # With global batch = all rows, both runs see every example in every step.
    assert _max_diff(plain, packed) < 1e-5


def test_non_finite_steps_are_skipped_then_abort(demo_tokenizer, tiny_model, tmp_path):
    cfg = TrainConfig(lr=1e-3, global_batch_size=8, micro_batch_size=8, max_steps=4, checkpoint_every=0,
                      max_bad_steps=2)
    model = tiny_model(demo_tokenizer)
    rows = make_rows(_examples(demo_tokenizer, 16), packing=False, max_length=128)
    resolved = resolve_train(cfg, len(rows), 1, seed=0)
    job = lm_job("t", model, rows, demo_tokenizer.pad_token_id, TOKEN_MEAN, cfg, resolved, tmp_path, CPU, False)
    calls = {"n": 0}
    healthy = job.objective

    def sometimes_nan(m, batch, normaliser):
        calls["n"] += 1
        loss, stats = healthy(m, batch, normaliser)
        if calls["n"] == 2:  # the second step
            return loss * float("nan"), {**stats, "loss": float("nan")}
        return loss, stats

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    job.objective = sometimes_nan
    result = run_offline(job)
    assert [a["name"] for a in result.alarms] == ["non_finite"] and result.alarms[0]["step"] == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())

    def always_nan(m, batch, normaliser):
        loss, stats = healthy(m, batch, normaliser)
        return loss * float("nan"), {**stats, "loss": float("nan")}

    job = lm_job("t", tiny_model(demo_tokenizer), rows, demo_tokenizer.pad_token_id, TOKEN_MEAN, cfg, resolved,
                 tmp_path / "abort", CPU, False)
    job.objective = always_nan
    with pytest.raises(TrainingAborted) as info:
        run_offline(job)
    assert "2 non-finite steps in a row" in info.value.render() and "train.lr" in info.value.render()


def test_schedule_warmup_then_cosine_to_floor():
    cfg = TrainConfig(lr=1.0, warmup_steps=2, min_lr_ratio=0.1, max_steps=10)
    resolved = resolve_train(cfg, 100, 1, 0)
    factors = [lr_factor(s, cfg, resolved.warmup_steps, resolved.total_steps) for s in range(10)]
    assert factors[:2] == [0.5, 1.0]
    assert factors[2] == 1.0 and all(a >= b for a, b in zip(factors[2:], factors[3:]))
    # halfway through the decay: floor + (1 - floor) * (1 + cos(pi/2)) / 2
    assert lr_factor(6, cfg, 2, 10) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    linear = TrainConfig(lr=1.0, schedule="linear", max_steps=4)
    assert [lr_factor(s, linear, 0, 4) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]


def test_step_plan_covers_each_epoch_exactly_once_and_splits_for_processes():
    cfg = TrainConfig(global_batch_size=4, micro_batch_size=1, epochs=2)
    resolved = resolve_train(cfg, 10, 2, seed=5)
    plan = StepPlan(list(range(10)), cfg, resolved)
    assert resolved.total_steps == 5 and resolved.accumulation == 2
    stream = [i for s in range(resolved.total_steps) for i in plan.step_rows(s)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    for step in range(resolved.total_steps):
        mine = plan.micro_batches(step, 0) + plan.micro_batches(step, 1)
        assert sorted(i for mb in mine for i in mb) == sorted(plan.step_rows(step))
    assert StepPlan(list(range(10)), cfg, resolved).step_rows(3) == plan.step_rows(3)  # deterministic
