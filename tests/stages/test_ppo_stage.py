"""The ppo stage on the online loop: an end-to-end run with its critic metrics and saved critic,
exact resume (policy and critic), critic warm-up, a critic seeded from a reward model, and
config mistakes reported with their YAML paths."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from cli_process import run_posttrain
from safetensors.torch import load_file
from tiny_recipes import tiny_sft_base

from posttrain.cli import main
from posttrain.models.heads import RewardModel, load_reward_model, save_reward_model

BASE = tiny_sft_base("rl", n=64, lr="3e-3")
RL = """\
  rl:
    kind: ppo
    from: base
    data: {{builtin: demo.prompts, args: {{n: 32}}}}
    rewards: [{{name: math}}, {{name: length, target_length: 5, length_scale: 200, weight: 0.5}}]
    sampling: {{n: 2, max_new_tokens: 16}}
{extra}    train: {{lr: 1e-3, max_steps: {steps}, prompts_per_step: 4, micro_batch_size: 4, ppo_epochs: 2, minibatches: 2,
             checkpoint_every: 1}}
"""


def _recipe(tmp_path: Path, *, steps: int = 3, extra: str = "") -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(BASE + RL.format(steps=steps, extra=extra))
    return path


def _artifact(work: Path, stage: str = "rl") -> Path:
    return next(p.parent for p in (work / "stages" / stage).glob("*/manifest.json"))


def _metrics(work: Path) -> list[dict]:
    path = _artifact(work) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _weights(work: Path, stage: str = "rl") -> dict:
    return load_file(str(_artifact(work, stage) / "model" / "model.safetensors"))


def _critic(work: Path) -> dict:
    return load_file(str(_artifact(work) / "critic" / "model" / "model.safetensors"))


def _run_cli(recipe: Path, work: Path) -> int:
    return main(["run", str(recipe), "--workdir", str(work), "--no-progress"])


def test_ppo_runs_with_kl_in_reward_and_saves_its_critic(tmp_path):
    assert _run_cli(_recipe(tmp_path, extra="    kl: {beta: 0.05}\n    critic: {lr: 1e-3}\n"), tmp_path / "w") == 0
    steps = [m for m in _metrics(tmp_path / "w") if "reward_mean" in m]
    assert len(steps) == 3
    for m in steps:
        for key in ("value_loss", "explained_variance", "value_clip_frac", "returns_mean", "critic_grad_norm",
                    "loss", "ratio_max", "logprob_gap_max", "kl", "zero_variance_share"):
            assert key in m, key
        assert m["value_loss"] > 0 and 0 <= m["value_clip_frac"] <= 1
        assert m["zero_variance_share"] == 0.0  # the batch's rewards differ
    assert steps[0]["kl"] == 0.0 and steps[-1]["kl"] != 0  # starts at the reference (k1 may be < 0)
    assert any(m["ratio_max"] != 1.0 for m in steps)  # later passes are off-policy
    critic, _ = load_reward_model(_artifact(tmp_path / "w") / "critic")
    assert critic.kind == "value" and critic.head_names == ["value"]
    assert critic.values(torch.tensor([[1, 2, 3]]), torch.tensor([[0, 1, 2]])).shape == (1, 3)


@pytest.mark.slow  # three CLI processes: 24-34 s on the contended 2-core machine
def test_ppo_killed_and_resumed_is_bitwise_equal_policy_and_critic(tmp_path):
    recipe = _recipe(tmp_path, steps=3, extra="    kl: {beta: 0.05, target: 0.001}\n    critic_warmup_steps: 1\n")
    assert run_posttrain(recipe, tmp_path / "straight").returncode == 0
    # checkpoint.saved fires once for the base stage (end) and then after each rl step.
    killed = run_posttrain(recipe, tmp_path / "resumed", crash="checkpoint.saved:3")
    assert killed.returncode == -signal.SIGKILL
    assert run_posttrain(recipe, tmp_path / "resumed").returncode == 0
    for load in (_weights, _critic):
        a, b = load(tmp_path / "straight"), load(tmp_path / "resumed")
        assert all(bool((a[k] == b[k]).all()) for k in a)
    keys = ("kl_beta", "value_loss", "explained_variance")
    straight = [[m[k] for k in keys] for m in _metrics(tmp_path / "straight") if "reward_mean" in m]
    assert straight == [[m[k] for k in keys] for m in _metrics(tmp_path / "resumed") if "reward_mean" in m]


def test_critic_warmup_leaves_the_policy_untouched(tmp_path):
    assert _run_cli(_recipe(tmp_path, steps=2, extra="    critic_warmup_steps: 2\n"), tmp_path / "w") == 0
    base, policy = _weights(tmp_path / "w", "base"), _weights(tmp_path / "w")
    assert all(bool((base[k] == policy[k]).all()) for k in base)
    steps = [m for m in _metrics(tmp_path / "w") if "reward_mean" in m]
    assert all("value_loss" in m and "ratio_max" not in m and "grad_norm" not in m for m in steps)
    # The critic did train: its backbone left the starting weights.
    critic = _critic(tmp_path / "w")
    assert any(not torch.equal(critic[k], base[k]) for k in base if k in critic)


def test_critic_seeded_from_a_reward_model_folder(tmp_path, demo_tokenizer, tiny_model):
    """critic.path: the saved reward model's backbone and head become the critic (kind value)."""
    rm = RewardModel(tiny_model(demo_tokenizer, seed=3), ("reward",), kind="reward", init_seed=7)
    save_reward_model(rm, demo_tokenizer, tmp_path / "rm")
    extra = f"    critic: {{path: {tmp_path / 'rm'}, lr: 1e-12}}\n    critic_warmup_steps: 1\n"
    assert _run_cli(_recipe(tmp_path, steps=1, extra=extra), tmp_path / "w") == 0
    critic, _ = load_reward_model(_artifact(tmp_path / "w") / "critic")
    assert critic.kind == "value"
    torch.testing.assert_close(critic.score.weight, rm.score.weight, atol=1e-6, rtol=0)
    start = dict(rm.backbone.named_parameters())
    for name, weight in critic.backbone.named_parameters():
        torch.testing.assert_close(weight, start[name], atol=1e-6, rtol=0)


def test_critic_from_a_reward_model_stage_of_the_recipe(tmp_path):
    """critic.from: the reward_model stage runs first and its artifact seeds the critic."""
    rm_stage = ("  rm:\n    kind: reward_model\n    from: base\n    data: {builtin: demo.pairs, args: {n: 8}}\n"
                "    train: {lr: 1e-3, global_batch_size: 8, micro_batch_size: 8, max_length: 96, checkpoint_every: 0}\n")
    text = _recipe(tmp_path, steps=1, extra="    critic: {from: rm, lr: 1e-12}\n    critic_warmup_steps: 1\n").read_text()
    (tmp_path / "recipe.yaml").write_text(text.replace("  rl:\n", rm_stage + "  rl:\n"))
    assert _run_cli(tmp_path / "recipe.yaml", tmp_path / "w") == 0
    rm, _ = load_reward_model(_artifact(tmp_path / "w", "rm"))
    critic, _ = load_reward_model(_artifact(tmp_path / "w") / "critic")
    torch.testing.assert_close(critic.score.weight, rm.score.weight, atol=1e-6, rtol=0)


def test_reward_from_a_reward_model_stage_of_the_recipe(tmp_path):
    """rewards: [{name: reward_model, from: rm}]: the RM stage runs first and scores the rollouts."""
    rm_stage = ("  rm:\n    kind: reward_model\n    from: base\n    data: {builtin: demo.pairs, args: {n: 8}}\n"
                "    train: {lr: 1e-3, global_batch_size: 8, micro_batch_size: 8, max_length: 96, checkpoint_every: 0}\n")
    text = _recipe(tmp_path, steps=1).read_text().replace(
        "rewards: [{name: math}, {name: length, target_length: 5, length_scale: 200, weight: 0.5}]",
        "rewards: [{name: reward_model, from: rm}]")
    (tmp_path / "recipe.yaml").write_text(text.replace("  rl:\n", rm_stage + "  rl:\n"))
    assert _run_cli(tmp_path / "recipe.yaml", tmp_path / "w") == 0
    [step] = [m for m in _metrics(tmp_path / "w") if "reward_mean" in m]
    assert step["reward/reward_model"] == pytest.approx(step["reward_mean"]) and step["reward_std"] > 0
    manifest = json.loads((_artifact(tmp_path / "w") / "manifest.json").read_text())
    assert _artifact(tmp_path / "w", "rm").name in json.dumps(manifest["parents"])


def test_config_mistakes_name_their_yaml_paths(tmp_path, capsys):
    extra = ("    critic: {from: base, lr: 1e-4, vf_coef: 0.5}\n    critic_warmup_steps: 9\n    value_clip: 0\n"
             "    kl: {placement: everywhere}\n    loss: {name: ppo_clip, epsilon: 0.2}\n")
    assert main(["validate", str(_recipe(tmp_path, extra=extra))]) == 2
    err = capsys.readouterr().err
    assert "stages.rl.critic.vf_coef" in err and "unknown key" in err
    assert "stages.rl.value_clip" in err
    assert "stages.rl.kl.placement" in err
    extra = "    critic: {from: base, path: somewhere}\n    critic_warmup_steps: 9\n"
    assert main(["validate", str(_recipe(tmp_path, extra=extra))]) == 2
    err = capsys.readouterr().err
    assert "stages.rl.critic" in err and "critic.from or critic.path, not both" in err
    # Whole-stage checks run once every field is valid.
    assert main(["validate", str(_recipe(tmp_path, extra="    critic_warmup_steps: 9\n"))]) == 2
    err = capsys.readouterr().err
    assert "stages.rl" in err and "critic_warmup_steps 9 > train.max_steps 3" in err
    assert main(["validate", str(_recipe(tmp_path, extra="    critic: {from: base}\n"))]) == 2
    err = capsys.readouterr().err
    assert "stages.rl.critic.from" in err and "produces a model, not a reward_model" in err
    assert main(["validate", str(_recipe(tmp_path, extra="    loss: {name: ppo_clip, epsilon: 0.2}\n"))]) == 2
    err = capsys.readouterr().err
    assert "stages.rl.loss.epsilon" in err and "has no parameter" in err
    extra = f"    critic: {{path: {tmp_path / 'nowhere'}}}\n"
    assert _run_cli(_recipe(tmp_path, extra=extra), tmp_path / "w") == 2
    assert "stages.rl.critic.path" in capsys.readouterr().err
