"""Two processes under torchrun (gloo, CPU) equal one process with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from posttrain.config import TinyModelConfig
from posttrain.models.tiny import build_tiny_llama

RECIPE = """\
name: ddp
seed: 0
stages:
  sft:
    kind: sft
    model:
      tokenizer: builtin:demo
      tiny: {hidden_size: 32, num_layers: 2, num_heads: 4, intermediate_size: 64, max_position_embeddings: 128}
    data: {builtin: demo.sft, args: {n: 64}}
    train: {lr: 1e-3, global_batch_size: 8, micro_batch_size: 2, max_steps: 4, checkpoint_every: 0,
            max_length: 96, warmup_steps: 1}
"""


def _weights(workdir: Path) -> dict:
    (folder,) = (workdir / "stages" / "sft").iterdir()
    return load_file(str(folder / "model" / "model.safetensors"))


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, demo_tokenizer):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun, "torchrun comes with torch"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    env = {**os.environ, "POSTTRAIN_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "posttrain.cli", "run", str(recipe), "--workdir",
                          str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29517", "-m", "posttrain.cli", "run",
                          str(recipe), "--workdir", str(tmp_path / "two")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    manifests = [json.loads(next((tmp_path / w / "stages" / "sft").glob("*/manifest.json")).read_text())
                 for w in ("one", "two")]
    assert [m["info"]["resolved"]["world_size"] for m in manifests] == [1, 2]
    assert [m["info"]["resolved"]["accumulation"] for m in manifests] == [4, 2]
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    init = build_tiny_llama(TinyModelConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                                            max_position_embeddings=128), demo_tokenizer).state_dict()
    assert max(float((a[k] - init[k]).abs().max()) for k in a) > 1e-3  # training moved the weights
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-5, worst


RL_RECIPE = """\
name: ddp-rl
seed: 0
stages:
  rl:
    kind: grpo
    model:
      tokenizer: builtin:demo
      tiny: {hidden_size: 32, num_layers: 2, num_heads: 4, intermediate_size: 64, max_position_embeddings: 128}
    data: {builtin: demo.prompts, args: {n: 16}}
    rewards: [{name: math}, {name: length, target_length: 5, length_scale: 200, weight: 0.5}]
    sampling: {n: 4, max_new_tokens: 16}
    advantage: {name: reinforce_pp}
    kl: {beta: 0.01}
    train: {lr: 1e-3, max_steps: 3, prompts_per_step: 4, micro_batch_size: 4, checkpoint_every: 0}
"""


# PPO: the critic's values, GAE whitening, explained variance and value loss must be global too.
PPO_RECIPE = RL_RECIPE.replace("kind: grpo", "kind: ppo").replace(
    "advantage: {name: reinforce_pp}", "critic: {lr: 1e-3}\n    critic_warmup_steps: 1").replace(
    "micro_batch_size: 4,", "micro_batch_size: 4, ppo_epochs: 2, minibatches: 2,")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["grpo", "ppo"])
def test_online_two_processes_equal_one(tmp_path, kind):
    """Batch-normalised advantages (reinforce_pp; ppo's whitened GAE) and the KL term make this a
    real check that rewards, advantages and normalisers are global."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RL_RECIPE if kind == "grpo" else PPO_RECIPE)
    env = {**os.environ, "POSTTRAIN_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "posttrain.cli", "run", str(recipe), "--workdir",
                          str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29518", "-m", "posttrain.cli", "run",
                          str(recipe), "--workdir", str(tmp_path / "two")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    saved = ["model"] + (["critic/model"] if kind == "ppo" else [])
    for folder in saved:
        load = lambda w: load_file(str(next((tmp_path / w / "stages" / "rl").glob(f"*/{folder}/model.safetensors"))))  # noqa: E731,B023
        a, b = load("one"), load("two")
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5, folder
    rewards = [[json.loads(line).get("reward_mean") for line in next((tmp_path / w / "stages" / "rl").glob(
        "*/metrics.jsonl")).read_text().splitlines()] for w in ("one", "two")]
    assert rewards[0] == rewards[1]  # the same completions were sampled
