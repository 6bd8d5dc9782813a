"""The pipeline: exactly the changed stages re-run, gates, head and rollback, status and lineage,
run selections, filter and mix."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from posttrain.cli import main
from posttrain.pipeline.head import read_head
from posttrain.pipeline.inspect import lineage, stage_rows

TINY = """      tokenizer: builtin:demo
      tiny: {hidden_size: 32, num_layers: 2, num_heads: 4, intermediate_size: 64, max_position_embeddings: 128}"""

CHAIN = f"""\
name: chain
seed: 0
stages:
  base:
    kind: sft
    model:
{TINY}
    data: {{builtin: demo.sft, args: {{n: 32}}}}
    train: {{lr: 3e-3, global_batch_size: 16, micro_batch_size: 16, max_length: 96, checkpoint_every: 1}}
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
    eval: [{{task: demo_accuracy, limit: 8, max_new_tokens: 8}}]
{{extra}}"""

STAGES = ["base", "samples", "scored", "best", "rsft"]


def write(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(CHAIN.replace("{extra}", extra))
    return path


def ran(work: Path, since: int = 0) -> list[str]:
    events = [json.loads(line) for line in (work / "ledger.jsonl").read_text().splitlines()][since:]
    return [e["stage"] for e in events if e["event"] == "started"]


def ledger_length(work: Path) -> int:
    return len((work / "ledger.jsonl").read_text().splitlines())


def run(recipe: Path, work: Path, *args: str) -> int:
    return main(["run", str(recipe), "--workdir", str(work), "--no-progress", *args])


def test_a_changed_stage_reruns_with_exactly_its_descendants(tmp_path):
    recipe, work = write(tmp_path), tmp_path / "w"
    assert run(recipe, work) == 0 and ran(work) == STAGES
    mark = ledger_length(work)
    assert run(recipe, work, "--set", "stages.rsft.train.lr=2e-3") == 0
    assert ran(work, mark) == ["rsft"]
    mark = ledger_length(work)
    assert run(recipe, work, "--set", "stages.samples.sampling.temperature=0.7") == 0
    assert ran(work, mark) == ["samples", "scored", "best", "rsft"]
    mark = ledger_length(work)
    started = time.monotonic()
    assert main(["run", str(recipe), "--workdir", str(work), "--no-progress"]) == 0
    assert ran(work, mark) == [] and time.monotonic() - started < 10


AFTER = """\
  after:
    kind: sft
    from: rsft
    data: {builtin: demo.sft, args: {n: 8}}
    train: {max_steps: 1, global_batch_size: 8, micro_batch_size: 8, max_length: 96}
"""


def gated(tmp_path: Path, rsft_gate: str, extra: str = "") -> Path:
    """The chain with a trivially true gate on base and ``rsft_gate`` on rsft (the last stage)."""
    text = write(tmp_path, extra=f"    gate: ['{rsft_gate}']\n{extra}").read_text()
    text = text.replace("  samples:", "    gate: ['demo_accuracy >= 0.0']\n  samples:", 1)
    path = tmp_path / "gated.yaml"
    path.write_text(text)
    return path


def test_failed_gate_keeps_head_on_the_last_good_model_and_rollback_is_fast(tmp_path, capsys):
    work = tmp_path / "w"
    assert run(gated(tmp_path, "demo_accuracy >= parent + 2.0"), work) == 0  # impossible: +2 on a share
    rows = {r["stage"]: r for r in stage_rows(work)}
    assert rows["base"]["status"] == "passed" and rows["rsft"]["status"] == "gate failed"
    assert rows["rsft"]["gates"][0]["bound"] == rows["base"]["metrics"]["demo_accuracy"] + 2.0
    assert read_head(work)["stage"] == "base"  # the failed stage is never promoted
    assert "gate failed" in capsys.readouterr().err
    started = time.monotonic()
    assert main(["rollback", str(work), "base"]) == 0
    assert time.monotonic() - started < 5
    assert main(["rollback", str(work), "rsft"]) == 2  # cannot promote a failed stage
    assert "failed its gates" in capsys.readouterr().err


def test_a_failed_gate_blocks_the_descendants(tmp_path):
    work = tmp_path / "w"
    assert run(gated(tmp_path, "demo_accuracy >= 2.0", extra=AFTER), work) == 0
    rows = {r["stage"]: r for r in stage_rows(work)}
    assert rows["rsft"]["status"] == "gate failed" and rows["after"]["status"] == "blocked"
    assert "after" not in ran(work) and not (work / "stages" / "after").exists()
    assert read_head(work)["stage"] == "base"
    # Running again: the failed stage is cached with its verdict and still blocks.
    assert run(gated(tmp_path, "demo_accuracy >= 2.0", extra=AFTER), work) == 0
    assert "after" not in ran(work)


def test_status_and_lineage(tmp_path, capsys):
    recipe, work = write(tmp_path), tmp_path / "w"
    assert run(recipe, work) == 0
    capsys.readouterr()
    assert main(["status", str(work)]) == 0
    out = capsys.readouterr().err
    assert all(stage in out for stage in STAGES) and "head" in out
    tree = lineage(work, "rsft")
    assert tree["stage"] == "rsft" and {p["stage"] for p in tree["parents"]} == {"base", "best"}
    best = next(p for p in tree["parents"] if p["stage"] == "best")
    chain = best["parents"][0]["parents"][0]  # best <- scored <- samples
    assert chain["stage"] == "samples"
    base = next(p for p in tree["parents"] if p["stage"] == "base")
    assert base["base_model"]["tokenizer"] == "builtin:demo" and base["data"][0]["builtin"] == "demo.sft"
    assert main(["lineage", str(work), tree["key"][:8]]) == 0
    assert "demo.sft" in capsys.readouterr().out
    page = (work / "report.html").read_text()  # written by every run
    assert all(f"<b>{stage}</b>" in page for stage in STAGES)
    assert "<svg" in page and "aria-label=\"loss\"" in page and "aria-label=\"demo_accuracy\"" in page


def test_only_from_until(tmp_path, capsys):
    recipe, work = write(tmp_path), tmp_path / "w"
    assert run(recipe, work, "--only", "samples") == 2
    assert "needs stage 'base'" in capsys.readouterr().err
    assert run(recipe, work, "--until", "scored") == 0 and ran(work) == ["base", "samples", "scored"]
    mark = ledger_length(work)
    assert run(recipe, work, "--from", "best") == 0 and ran(work, mark) == ["best", "rsft"]
    mark = ledger_length(work)
    assert run(recipe, work, "--set", "stages.rsft.train.lr=5e-4", "--only", "rsft") == 0
    assert ran(work, mark) == ["rsft"]


def _rows(work: Path, stage: str) -> list[dict]:
    return [json.loads(line) for line in next((work / "stages" / stage).glob("*/data.jsonl")).read_text().splitlines()]


def test_filter_and_mix(tmp_path):
    rows = [{"prompt": "What is 1 + 1?", "completion": "2"}, {"prompt": "What is 1 + 1?", "completion": "2"},
            {"prompt": "What is 1 + 1 please?", "completion": "2"}, {"prompt": "Tell me about 1 + 1 today", "completion": "2"},
            {"prompt": "Compute 7 + 8", "completion": "15 " * 40}, {"prompt": "bad 666", "completion": "x"}]
    (tmp_path / "raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "replay.jsonl").write_text("".join(json.dumps({"prompt": f"old {i}", "completion": "y"}) + "\n"
                                                   for i in range(10)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("""\
name: f
stages:
  clean:
    kind: filter
    data: {path: raw.jsonl}
    dedup: near
    near_threshold: 0.6
    max_chars: 100
    drop_regex: '666'
  mixed:
    kind: mix
    sources:
      - {data: {stage: clean}, weight: 3}
      - {data: {path: replay.jsonl}, weight: 1}
    size: 8
""")
    assert run(recipe, tmp_path / "w") == 0
    clean = _rows(tmp_path / "w", "clean")
    assert [r["prompt"] for r in clean] == ["What is 1 + 1?", "Tell me about 1 + 1 today"]
    manifest = json.loads(next((tmp_path / "w" / "stages" / "clean").glob("*/manifest.json")).read_text())
    assert manifest["info"]["dropped"] == {"exact_duplicate": 1, "near_duplicate": 1, "too_long": 1,
                                           "drop_regex_matched": 1}
    mixed = _rows(tmp_path / "w", "mixed")
    sources = [r["provenance"]["mix"]["source"] for r in mixed]
    assert len(mixed) == 8 and sources.count(0) == 6 and sources.count(1) == 2
    info = json.loads(next((tmp_path / "w" / "stages" / "mixed").glob("*/manifest.json")).read_text())["info"]
    assert info["repeated_rows"] == {"0": 4, "1": 0}  # 6 picks from 2 clean rows repeat 4


@pytest.mark.parametrize(("recipe", "expected"), [
    ("  a: {kind: sft, from: b, data: {builtin: demo.sft}}\n  b: {kind: sft, from: a, data: {builtin: demo.sft}}\n",
     "cycle"),
    ("  a: {kind: sft, from: nope, data: {builtin: demo.sft}}\n", "stages.a.from: no stage named 'nope'"),
    ("  a: {kind: sftt, data: {builtin: demo.sft}}\n", "stages.a.kind: unknown stage kind 'sftt'"),
    (f"  a:\n    kind: sft\n    model:\n{TINY}\n    data: {{builtin: demo.sft}}\n"
     "  b: {kind: score, data: {stage: a}, rewards: [{name: demo}]}\n",
     "stages.b.data.stage: stage 'a' produces a model, not a dataset"),
    ("  d: {kind: select, data: {builtin: demo.sft}}\n  a: {kind: sft, from: d, data: {builtin: demo.sft}}\n",
     "stages.a.from: stage 'd' produces a dataset, not a model"),
    (f"  a:\n    kind: sft\n    model:\n{TINY}\n    data: {{builtin: demo.sft}}\n    eval: [{{task: demo_accuracy}}]\n"
     "    gate: ['gsm8k_accuracy >= 0.5']\n", "which no eval of this stage produces"),
    (f"  a:\n    kind: sft\n    model:\n{TINY}\n    data: {{builtin: demo.sft}}\n    gate: ['demo_accuracy >> 0.5']\n",
     "stages.a.gate.0"),
    (f"  a:\n    kind: sft\n    model:\n{TINY}\n    data: {{builtin: demo.sft}}\n    eval: [{{task: demo_accuracy}}]\n"
     "    gate: ['demo_accuracy >= parent - 0.1']\n", "compares with the parent, but the stage has no 'from'"),
    (f"  a:\n    kind: sft\n    model:\n{TINY}\n    data: {{builtin: demo.sft}}\n"
     "  b: {kind: sft, from: a, data: {builtin: demo.sft}, eval: [{task: demo_accuracy}],"
     " gate: ['demo_accuracy >= parent']}\n", "whose evals do not produce 'demo_accuracy'"),
    ("  s: {kind: score, from: x, data: {builtin: demo.sft}, rewards: [{name: demo}]}\n", "uses no model"),
    ("  s: {kind: score, data: {builtin: demo.sft}, rewards: []}\n", "stages.s.rewards"),
    ("  s: {kind: select, data: {builtin: demo.sft}, mode: best_of_n, pairs: all_pairs}\n",
     "'pairs' has no effect with mode: best_of_n"),
    ("  s: {kind: filter, data: {builtin: demo.sft}, drop_regex: '(unclosed'}\n", "is not a valid regex"),
    ("  m: {kind: mix, sources: [{data: {stage: ghost}}]}\n", "no stage named 'ghost'"),
])
def test_broken_recipes_exit_2_with_the_yaml_path(tmp_path, capsys, recipe, expected):
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\nstages:\n" + recipe)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err, err


def test_training_rows_that_overlap_an_eval_set_are_reported_failed_or_dropped(tmp_path, capsys):
    from posttrain.demo.world import prompt_rows

    leaked = prompt_rows("test", {})[0]["prompt"][0]["content"]  # a held-out eval question
    rows = [{"prompt": [{"role": "user", "content": leaked}], "completion": "leak"}] + [
        {"prompt": [{"role": "user", "content": f"Say {i} twice."}], "completion": f"{i} {i}"} for i in range(15)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def recipe(policy: str) -> Path:
        path = tmp_path / f"{policy}.yaml"
        path.write_text(f"name: c\non_contamination: {policy}\nstages:\n  sft:\n    kind: sft\n    model:\n{TINY}\n"
                        "    data: {path: train.jsonl}\n    train: {max_steps: 1, global_batch_size: 8, "
                        "micro_batch_size: 8, max_length: 96}\n"
                        "    eval: [{task: demo_accuracy, limit: 4, max_new_tokens: 4}]\n")
        return path

    assert run(recipe("fail"), tmp_path / "fail") == 2
    err = capsys.readouterr().err
    assert "train.jsonl:1" in err and "on_contamination" in err and not (tmp_path / "fail" / "stages").exists()
    assert run(recipe("drop"), tmp_path / "drop") == 0
    info = json.loads(next((tmp_path / "drop" / "stages" / "sft").glob("*/manifest.json")).read_text())["info"]
    assert info["contamination"]["dropped"] == 1 and info["render"]["rows"] == 15
    assert run(recipe("report"), tmp_path / "report") == 0
    manifest = json.loads(next((tmp_path / "report" / "stages" / "sft").glob("*/manifest.json")).read_text())
    assert manifest["info"]["render"]["rows"] == 16
    assert any(a["name"] == "contamination" for a in manifest["alarms"])
