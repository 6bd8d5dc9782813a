"""Exact resume: a run killed (SIGKILL) mid-epoch, or during a checkpoint save, and run again ends
bitwise equal to the uninterrupted run; the previous checkpoint survives a kill during a save."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from cli_process import run_posttrain, start_posttrain
from safetensors.torch import load_file

from posttrain.loops.state import latest_checkpoint, list_checkpoints, load_checkpoint

RECIPE = """\
name: resume
seed: 0
stages:
  sft:
    kind: sft
    model:
      tokenizer: builtin:demo
      tiny: {hidden_size: 32, num_layers: 2, num_heads: 4, intermediate_size: 64, max_position_embeddings: 128}
    data: {builtin: demo.sft, args: {n: 96}}
    train: {lr: 1e-3, global_batch_size: 8, micro_batch_size: 4, max_steps: 10, checkpoint_every: 2,
            keep_checkpoints: 3, max_length: 96, warmup_steps: 2}
"""


def _stage_dir(workdir: Path) -> Path:
    (folder,) = (workdir / "stages" / "sft").iterdir()
    return folder


def _weights(workdir: Path) -> dict:
    return load_file(str(_stage_dir(workdir) / "model" / "model.safetensors"))


def _assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype
        assert bool((a[name] == b[name]).all()), f"{name} differs by {float((a[name] - b[name]).abs().max())}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    recipe = folder / "recipe.yaml"
    recipe.write_text(RECIPE)
    done = run_posttrain(recipe, folder / "work")
    assert done.returncode == 0, done.stdout + done.stderr
    return recipe, _weights(folder / "work")


def test_sigkill_after_a_checkpoint_mid_epoch_then_resume_is_bitwise_equal(reference, tmp_path):
    recipe, expected = reference
    killed = run_posttrain(recipe, tmp_path, crash="checkpoint.saved:2")  # after step 4 of 10 (epoch = 12 steps)
    assert killed.returncode == -signal.SIGKILL
    stage = _stage_dir(tmp_path)
    assert not (stage / "manifest.json").exists()  # never marked complete without its manifest
    assert [p.name for p in list_checkpoints(stage / "checkpoints")] == ["step-0000002", "step-0000004"]
    resumed = run_posttrain(recipe, tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    _assert_bitwise_equal(_weights(tmp_path), expected)
    steps = [line for line in (stage / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(steps) == 10  # each step logged exactly once across the two processes


def test_kill_during_a_checkpoint_save_keeps_the_previous_checkpoint(reference, tmp_path):
    recipe, expected = reference
    # Each checkpoint writes 5 files; the 7th write is the 2nd file of the 2nd checkpoint.
    killed = run_posttrain(recipe, tmp_path, crash="checkpoint.mid_save:7")
    assert killed.returncode == -signal.SIGKILL
    folder = _stage_dir(tmp_path) / "checkpoints"
    assert (folder / "step-0000004.tmp").is_dir()  # the torn save is there ...
    assert [p.name for p in list_checkpoints(folder)] == ["step-0000002"]  # ... but not taken for a checkpoint
    state = load_checkpoint(folder / "step-0000002")
    assert state["loop"]["step"] == 2 and state["model"]
    resumed = run_posttrain(recipe, tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert latest_checkpoint(folder).name == "step-0000010" and not (folder / "step-0000004.tmp").exists()
    _assert_bitwise_equal(_weights(tmp_path), expected)


def test_sigkill_at_an_arbitrary_moment_then_resume_is_bitwise_equal(reference, tmp_path):
    """A real SIGKILL from outside, at whatever point training has reached."""
    recipe, expected = reference
    process = start_posttrain(recipe, tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        stages = tmp_path / "stages" / "sft"
        metrics = next(stages.glob("*/metrics.jsonl"), None) if stages.exists() else None
        if metrics is not None and metrics.read_text().count('"loss"') >= 5:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    resumed = run_posttrain(recipe, tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    _assert_bitwise_equal(_weights(tmp_path), expected)
