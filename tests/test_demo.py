"""``make demo`` end to end: the packaged recipe on the tiny arithmetic world, as a user runs it.

Slow (several minutes on 2 cores): the base model is pretrained from scratch. Asserts what the
demo promises: the SFT model's held-out accuracy is far above the base's, GRPO and PPO each raise
held-out accuracy (greedy and sampled) above the light SFT they start from, every later stage is
either promoted or stopped by its gate (the head never regresses), and a second run is all cache
hits in seconds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from posttrain.cli import main
from posttrain.pipeline.head import read_head
from posttrain.pipeline.inspect import stage_rows


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> tuple[Path, float]:
    work = tmp_path_factory.mktemp("demo") / "runs" / "demo"
    started = time.monotonic()
    assert main(["demo", "--workdir", str(work), "--no-progress"]) == 0
    return work, time.monotonic() - started


@pytest.mark.slow
def test_demo_sft_far_above_base_and_head_never_regresses(demo_run, capsys):
    work, seconds = demo_run
    rows = {r["stage"]: r for r in stage_rows(work)}
    accuracy = {name: r["metrics"].get("demo_accuracy") for name, r in rows.items()
                if r["metrics"].get("demo_accuracy") is not None}
    print(f"demo accuracies {accuracy} in {seconds:.0f} s")
    assert accuracy["base"] < 0.1 and accuracy["sft"] > accuracy["base"] + 0.3
    head = read_head(work)
    assert head is not None and head["stage"] in accuracy
    # The promoted model is at least as good as SFT (gates stop regressions).
    assert accuracy[head["stage"]] >= accuracy["sft"] - 0.02
    for name, row in rows.items():
        assert row["status"] in ("passed", "gate failed", "blocked"), (name, row["status"])


@pytest.mark.slow
def test_demo_grpo_and_ppo_raise_held_out_accuracy(demo_run):
    """Online RL from the light SFT, rewarded by the verifier, within the recipe's fixed budget
    (60 rollout steps of 256 rollouts each): both metrics rise, by at least the gates' margins."""
    work, _ = demo_run
    rows = {r["stage"]: r for r in stage_rows(work)}
    start = rows["cold_sft"]["metrics"]
    for name in ("grpo", "ppo"):
        got = rows[name]["metrics"]
        print(f"{name}: greedy {start['demo_accuracy']:.3f} -> {got['demo_accuracy']:.3f}, sampled "
              f"{start['demo_sampled_accuracy']:.3f} -> {got['demo_sampled_accuracy']:.3f}")
        assert rows[name]["status"] == "passed", (name, rows[name]["status"])
        assert got["demo_accuracy"] > start["demo_accuracy"], name
        assert got["demo_sampled_accuracy"] >= start["demo_sampled_accuracy"] + 0.05, name


@pytest.mark.slow
def test_demo_rerun_is_cached_in_seconds(demo_run):
    work, _ = demo_run
    events = len((work / "ledger.jsonl").read_text().splitlines())
    started = time.monotonic()
    assert main(["demo", "--workdir", str(work), "--no-progress"]) == 0
    assert time.monotonic() - started < 10
    new = [json.loads(line) for line in (work / "ledger.jsonl").read_text().splitlines()[events:]]
    assert {e["event"] for e in new} <= {"cached", "blocked", "head"}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(p.name for p in (Path(__file__).parents[1] / "recipes").glob("*.yaml")))
def test_shipped_recipes_run_on_the_demo_world(demo_run, tmp_path, recipe):
    """Each composition starts from the demo's promoted model (``model: {path: ../runs/demo}``)
    and runs end to end at reduced sizes."""
    import yaml

    work, _ = demo_run
    path = Path(__file__).parents[1] / "recipes" / recipe
    spec = yaml.safe_load(path.read_text())
    overrides = []
    for name, stage in spec["stages"].items():
        if (stage.get("model") or {}).get("path") == "../runs/demo":
            overrides.append(f"stages.{name}.model.path={work}")
        data = stage.get("data") or {}
        if data.get("builtin") in ("demo.prompts", "demo.sft"):
            overrides.append(f"stages.{name}.data.args.n={96 if data['builtin'] == 'demo.prompts' else 256}")
        if stage["kind"] == "grpo":
            overrides.append(f"stages.{name}.train.max_steps=3")
        for i, _ in enumerate(stage.get("eval", [])):
            overrides.append(f"stages.{name}.eval.{i}.limit=50")
    args = ["run", str(path), "--workdir", str(tmp_path / "w"), "--no-progress"]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 0
    statuses = {r["stage"]: r["status"] for r in stage_rows(tmp_path / "w")}
    assert set(statuses.values()) <= {"passed", "gate failed", "blocked"}, statuses
    assert read_head(tmp_path / "w") is not None
