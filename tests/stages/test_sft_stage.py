"""The sft stage end to end through the CLI: caching, LoRA, data show, and a real improvement."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from posttrain.cli import main

RECIPE = """\
name: tiny
seed: 0
stages:
  base:
    kind: pretrain
    model:
      tokenizer: builtin:demo
      tiny: {{hidden_size: 32, num_layers: 2, num_heads: 4, intermediate_size: 64, max_position_embeddings: 128}}
    data: {{builtin: demo.pretrain, args: {{docs: 64, per_doc: 2}}}}
    train: {{lr: 3e-3, global_batch_size: 16, micro_batch_size: 16, max_length: 128, checkpoint_every: 0}}
  sft:
    kind: sft
    from: base
    data: {{builtin: demo.sft, args: {{n: 64}}}}
    train: {{lr: 1e-3, global_batch_size: 16, micro_batch_size: 8, max_length: 96, checkpoint_every: 0}}
{extra}"""


def _write(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(extra=extra))
    return path


def _ledger(workdir: Path) -> list[dict]:
    """Stage events (head moves are recorded too; they are not what these tests count)."""
    events = [json.loads(line) for line in (workdir / "ledger.jsonl").read_text().splitlines()]
    return [e for e in events if e["event"] != "head"]


def test_second_run_is_cached_and_a_changed_stage_reruns_alone(tmp_path, capsys):
    recipe, work = _write(tmp_path), tmp_path / "work"
    assert main(["run", str(recipe), "--workdir", str(work), "--no-progress"]) == 0
    first = [(e["stage"], e["event"]) for e in _ledger(work)]
    assert first == [("base", "started"), ("base", "completed"), ("sft", "started"), ("sft", "completed")]
    assert main(["run", str(recipe), "--workdir", str(work), "--no-progress"]) == 0
    assert [(e["stage"], e["event"]) for e in _ledger(work)][4:] == [("base", "cached"), ("sft", "cached")]
    assert main(["run", str(recipe), "--workdir", str(work), "--no-progress", "--set",
                 "stages.sft.train.lr=2e-3"]) == 0
    assert [(e["stage"], e["event"]) for e in _ledger(work)][6:] == [
        ("base", "cached"), ("sft", "started"), ("sft", "completed")]
    # Logging-only settings do not change what a stage produces, so they do not invalidate it.
    assert main(["run", str(recipe), "--workdir", str(work), "--no-progress", "--set",
                 "stages.sft.train.lr=2e-3", "--set", "stages.sft.train.log_every=5"]) == 0
    assert [e["event"] for e in _ledger(work)][9:] == ["cached", "cached"]
    manifest = json.loads(next((work / "stages" / "sft").glob("*/manifest.json")).read_text())
    assert manifest["parents"] == {"base": next((work / "stages" / "base").iterdir()).name}
    assert "sft" in capsys.readouterr().err


def test_lora_stage_trains_an_adapter_and_leaves_the_base_untouched(tmp_path):
    recipe = _write(tmp_path, "    model: {lora: {r: 4, alpha: 8}}\n")
    work = tmp_path / "work"
    assert main(["run", str(recipe), "--workdir", str(work), "--no-progress"]) == 0
    sft = next((work / "stages" / "sft").iterdir())
    assert (sft / "adapter" / "adapter_model.safetensors").exists() and not (sft / "model").exists()
    adapter = load_file(str(sft / "adapter" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)  # it trained
    manifest = json.loads((sft / "manifest.json").read_text())
    assert manifest["model_base"] == str(next((work / "stages" / "base").iterdir()))


def test_gradient_checkpointing_gives_the_same_model(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    recipe = _write(tmp_path)
    assert main(["run", str(recipe), "--workdir", str(a), "--no-progress"]) == 0
    assert main(["run", str(recipe), "--workdir", str(b), "--no-progress", "--set",
                 "stages.sft.train.gradient_checkpointing=true"]) == 0
    wa = load_file(str(next((a / "stages" / "sft").iterdir()) / "model" / "model.safetensors"))
    wb = load_file(str(next((b / "stages" / "sft").iterdir()) / "model" / "model.safetensors"))
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5


def test_data_show_marks_the_trained_tokens(tmp_path, capsys):
    assert main(["data", "show", str(_write(tmp_path)), "--stage", "sft", "--n", "2"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("<|im_start|>")]
    assert len(lines) == 2
    # The assistant's answer and its end-of-turn token are inside the marks, the question is not.
    assert all("<|im_end|>]]" in line and "assistant\\n[[" in line for line in lines)
    assert all("[[<|im_start|>user" not in line for line in lines)
