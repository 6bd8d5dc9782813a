"""The grpo stage on the online loop: on-policy sanity, micro-batch invariance, exact resume, the
health stops and alarms."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from cli_process import run_posttrain
from safetensors.torch import load_file
from tiny_recipes import tiny_sft_base

from posttrain.cli import main

BASE = tiny_sft_base("rl", n=64, lr="3e-3")
RL = """\
  rl:
    kind: grpo
    from: base
    data: {{builtin: demo.prompts, args: {{n: 32}}}}
    rewards: [{rewards}]
    sampling: {{n: 4, max_new_tokens: {tokens}}}
{extra}    train: {{lr: 1e-3, max_steps: {steps}, prompts_per_step: 4, micro_batch_size: {micro}, checkpoint_every: 1}}
"""
# math pays nothing to this untrained model; a small length term gives every group reward variance
REWARDS = "{name: math}, {name: length, target_length: 5, length_scale: 200, weight: 0.5}"


def _recipe(tmp_path: Path, *, rewards=REWARDS, tokens=24, steps=3, micro=16, extra="") -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(BASE + RL.format(rewards=rewards, tokens=tokens, steps=steps, micro=micro, extra=extra))
    return path


def _metrics(work: Path) -> list[dict]:
    path = next((work / "stages" / "rl").glob("*/metrics.jsonl"))
    return [json.loads(line) for line in path.read_text().splitlines()]


def _weights(work: Path) -> dict:
    return load_file(str(next((work / "stages" / "rl").glob("*/model/model.safetensors"))))


def test_on_policy_ratio_is_exactly_one_and_sampler_matches_trainer(tmp_path):
    assert main(["run", str(_recipe(tmp_path)), "--workdir", str(tmp_path / "w"), "--no-progress"]) == 0
    steps = [m for m in _metrics(tmp_path / "w") if "reward_mean" in m]
    assert len(steps) == 3
    for m in steps:
        assert m["ratio_max"] == 1.0 and m["ratio_min"] == 1.0 and m["clip_frac"] == 0.0
        assert m["logprob_gap_max"] < 1e-4  # the sampler's logprobs are the trainer's
        assert m["zero_variance_share"] < 1.0 and m["grad_norm"] > 0


def test_one_and_four_micro_batches_give_the_same_update(tmp_path):
    assert main(["run", str(_recipe(tmp_path, micro=16)), "--workdir", str(tmp_path / "a"), "--no-progress"]) == 0
    assert main(["run", str(_recipe(tmp_path, micro=4)), "--workdir", str(tmp_path / "b"), "--no-progress"]) == 0
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def test_off_policy_epochs_clip_and_adaptive_kl_run(tmp_path):
    extra = ("    loss: {name: clip_higher, eps_high: 0.28}\n    aggregation: seq-mean-token-mean\n"
             "    kl: {beta: 0.05, target: 0.001}\n    tis_cap: 2.0\n")
    recipe = _recipe(tmp_path, extra=extra).read_text().replace("prompts_per_step: 4,",
                                                                "prompts_per_step: 4, ppo_epochs: 2, minibatches: 2,")
    (tmp_path / "recipe.yaml").write_text(recipe)
    assert main(["run", str(tmp_path / "recipe.yaml"), "--workdir", str(tmp_path / "w"), "--no-progress"]) == 0
    steps = [m for m in _metrics(tmp_path / "w") if "reward_mean" in m]
    assert any(m["ratio_max"] != 1.0 for m in steps)  # later passes are off-policy
    assert all("is_weight_mean" in m and "kl" in m for m in steps)
    betas = [m["kl_beta"] for m in steps]
    assert betas[0] == 0.05 and betas[-1] != 0.05  # the adaptive controller moved beta


def test_online_run_killed_and_resumed_is_bitwise_equal(tmp_path):
    extra = "    kl: {beta: 0.05, target: 0.001}\n"
    recipe = _recipe(tmp_path, steps=4, extra=extra)
    assert run_posttrain(recipe, tmp_path / "straight").returncode == 0
    # checkpoint.saved fires once for the base stage (end) and then after each rl step.
    killed = run_posttrain(recipe, tmp_path / "resumed", crash="checkpoint.saved:3")
    assert killed.returncode == -signal.SIGKILL
    assert run_posttrain(recipe, tmp_path / "resumed").returncode == 0
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert all(bool((a[k] == b[k]).all()) for k in a)
    betas = [m["kl_beta"] for m in _metrics(tmp_path / "resumed") if "kl_beta" in m]
    assert betas == [m["kl_beta"] for m in _metrics(tmp_path / "straight") if "kl_beta" in m]


def test_all_truncated_stops_the_run_naming_the_setting(tmp_path, capsys):
    extra = "    health: {stop_after: 2}\n"
    code = main(["run", str(_recipe(tmp_path, tokens=3, steps=6, extra=extra)), "--workdir", str(tmp_path / "w"),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "hit the length limit for 2 steps in a row" in err and "sampling.max_new_tokens" in err


def test_constant_reward_stops_the_run(tmp_path, capsys):
    extra = "    health: {stop_after: 2}\n"
    code = main(["run", str(_recipe(tmp_path, rewards="{name: math}", steps=6, extra=extra)), "--workdir",
                 str(tmp_path / "w"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "identical rewards for 2 steps in a row" in err and "dynamic_sampling" in err


def test_a_reward_that_pays_for_length_raises_length_and_kl_alarms(tmp_path):
    """Reward hacking smoke test: the length penalty with a negative weight pays for length."""
    rewards = "{name: length, target_length: 1, length_scale: 64, weight: -1.0}"
    extra = "    kl: {beta: 0.001}\n    health: {window: 3, length_growth: 0.2, kl: 0.02}\n"
    # A base that has learned to stop (so there is room to grow), then a policy paid for length.
    recipe = _recipe(tmp_path, rewards=rewards, tokens=64, steps=10, extra=extra).read_text().replace(
        "lr: 1e-3, max_steps", "lr: 2e-2, max_steps").replace("args: {n: 64}}", "args: {n: 512}}")
    (tmp_path / "recipe.yaml").write_text(recipe)
    assert main(["run", str(tmp_path / "recipe.yaml"), "--workdir", str(tmp_path / "w"), "--no-progress"]) == 0
    alarms = [m["message"] for m in _metrics(tmp_path / "w") if m.get("alarm") == "health"]
    assert any("response length grew" in a for a in alarms), alarms
    assert any("KL to the reference" in a for a in alarms), alarms


def test_the_stage_closes_its_rollout_engine_when_it_ends_and_when_it_fails(tmp_path, monkeypatch, capsys):
    from posttrain.rollout.hf import HFSampler

    closed = []
    monkeypatch.setattr(HFSampler, "close", lambda self: closed.append(self))
    work = str(tmp_path / "w")
    extra = "    health: {stop_after: 2}\n"
    assert main(["run", str(_recipe(tmp_path, tokens=3, steps=6, extra=extra)), "--workdir", work,
                 "--no-progress"]) == 2  # stopped by the health check after 2 steps
    assert len(closed) == 1
    assert main(["run", str(_recipe(tmp_path, steps=1)), "--workdir", work, "--no-progress"]) == 0
    assert len(closed) == 2 and closed[0] is not closed[1]
