"""SIGKILL at different moments of a multi-stage run, then ``posttrain run`` again: the same
artifact keys and contents as an uninterrupted run, and no stage ever complete without its
manifest."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cli_process import run_posttrain, start_posttrain
from safetensors.torch import load_file

TINY = """      tokenizer: builtin:demo
      tiny: {hidden_size: 32, num_layers: 2, num_heads: 4, intermediate_size: 64, max_position_embeddings: 128}"""
RECIPE = f"""\
name: crash
seed: 0
stages:
  base:
    kind: sft
    model:
{TINY}
    data: {{builtin: demo.sft, args: {{n: 64}}}}
    train: {{lr: 3e-3, global_batch_size: 16, micro_batch_size: 8, max_length: 96, checkpoint_every: 1}}
    eval: [{{task: demo_accuracy, limit: 8, max_new_tokens: 8}}]
  samples:
    kind: generate
    from: base
    data: {{builtin: demo.prompts, args: {{n: 6}}}}
    sampling: {{n: 2, max_new_tokens: 8}}
  scored:
    kind: score
    data: {{stage: samples}}
    rewards: [{{name: demo}}, {{name: length, target_length: 3, length_scale: 100, weight: 0.1}}]
  best:
    kind: select
    data: {{stage: scored}}
    mode: best_of_n
  rsft:
    kind: sft
    from: base
    data: {{stage: best}}
    train: {{lr: 1e-3, global_batch_size: 2, micro_batch_size: 2, max_length: 96, checkpoint_every: 1}}
"""


def _state(work: Path) -> dict[str, dict]:
    """Per stage: its complete artifact's key and content (weights, or rows without timestamps)."""
    out = {}
    for stage_dir in sorted((work / "stages").iterdir()):
        complete = [f for f in stage_dir.iterdir() if (f / "manifest.json").exists()]
        assert len(complete) == 1, f"{stage_dir.name}: {len(complete)} complete artifacts"
        folder = complete[0]
        entry: dict = {"key": folder.name}
        if (folder / "model" / "model.safetensors").exists():
            entry["weights"] = {k: v.tolist() for k, v in load_file(str(folder / "model" / "model.safetensors")).items()}
        if (folder / "data.jsonl").exists():
            rows = [json.loads(line) for line in (folder / "data.jsonl").read_text().splitlines()]
            entry["rows"] = [{k: v for k, v in r.items() if k != "provenance"} for r in rows]
        metrics = json.loads((folder / "manifest.json").read_text())["metrics"]
        entry["metrics"] = {k: v for k, v in metrics.items() if not k.endswith(("seconds", "_s"))}
        out[stage_dir.name] = entry
    return out


def _no_complete_without_manifest(work: Path) -> None:
    """A killed run leaves folders without a manifest; none may look complete."""
    for stage_dir in (work / "stages").iterdir() if (work / "stages").exists() else []:
        for folder in stage_dir.iterdir():
            if not (folder / "manifest.json").exists():
                assert not (folder / "data.jsonl.tmp").exists() or not (folder / "data.jsonl").exists()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    recipe = folder / "recipe.yaml"
    recipe.write_text(RECIPE)
    done = run_posttrain(recipe, folder / "work")
    assert done.returncode == 0, done.stderr
    return recipe, _state(folder / "work")


@pytest.mark.slow
@pytest.mark.parametrize("crash", [
    "checkpoint.mid_save:3",  # inside base's second checkpoint save
    "checkpoint.saved:2",  # between base's training steps
    "model.saved:1",  # base's weights saved, its evals and manifest not yet
    "data.before_rename:2",  # scored's data written, not yet renamed into place
    "manifest.before_write:3",  # scored finished, its manifest not written
    "checkpoint.saved:6",  # inside rsft's training
])
def test_sigkill_then_rerun_gives_the_uninterrupted_result(reference, tmp_path, crash):
    recipe, expected = reference
    killed = run_posttrain(recipe, tmp_path / "work", crash)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    _no_complete_without_manifest(tmp_path / "work")
    resumed = run_posttrain(recipe, tmp_path / "work")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _state(tmp_path / "work") == expected


@pytest.mark.slow
def test_external_sigkill_while_a_later_stage_runs(reference, tmp_path):
    recipe, expected = reference
    process = start_posttrain(recipe, tmp_path / "work", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list((tmp_path / "work" / "stages").glob("samples/*")):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    _no_complete_without_manifest(tmp_path / "work")
    resumed = run_posttrain(recipe, tmp_path / "work")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _state(tmp_path / "work") == expected


@pytest.mark.slow
def test_the_same_recipe_in_other_directories_gives_the_same_bytes(tmp_path):
    """The resume tests compare runs in different directories: nothing of ours may depend on the
    path. (Without MKL pinned to its AVX2 code, see cli_process, about one run in four here got
    weights 4e-5 apart.)"""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.split("  samples:")[0])
    weights = []
    for name in ("a", "bb", "ccc", "dddd", "eeeee"):
        done = run_posttrain(recipe, tmp_path / name / "work")
        assert done.returncode == 0, done.stderr[-2000:]
        weights.append(next((tmp_path / name / "work" / "stages" / "base").glob("*/model/model.safetensors")).read_bytes())
    assert all(w == weights[0] for w in weights[1:])
