"""Data stages: generate -> score -> select, datasets as artifacts, provenance on every row."""

from __future__ import annotations

import json
from pathlib import Path

from posttrain.cli import main

MODEL = """      tokenizer: builtin:demo
      tiny: {hidden_size: 32, num_layers: 2, num_heads: 4, intermediate_size: 64, max_position_embeddings: 128}"""


def _rows(work: Path, stage: str) -> list[dict]:
    (path,) = (work / "stages" / stage).glob("*/data.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def _scored(tmp_path: Path) -> Path:
    """Two prompts with four scored completions each (hand-made: the expected selections are
    read off this table)."""
    rows = []
    table = {0: [("a0", 1.0, "stop"), ("a1", 0.0, "stop"), ("a2", 1.0, "stop"), ("a3 long", 0.5, "stop")],
             1: [("b0", 0.0, "stop"), ("b1", 0.0, "stop"), ("b2 truncated", 1.0, "length"), ("b3", 0.2, "stop")]}
    for group, completions in table.items():
        for sample, (text, score, finish) in enumerate(completions):
            rows.append({"prompt": f"question {group}", "completion": text, "score": score, "group": group,
                         "sample": sample, "finish_reason": finish, "provenance": {"generate": {"model": "m"}}})
    path = tmp_path / "scored.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _select(tmp_path: Path, name: str, block: str) -> list[dict]:
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(f"name: sel\nstages:\n  {name}:\n    kind: select\n    data: {{path: scored.jsonl}}\n{block}")
    assert main(["run", str(recipe), "--workdir", str(tmp_path / name), "--no-progress"]) == 0
    return _rows(tmp_path / name, name)


def test_select_best_of_n_top_k_and_pairs(tmp_path):
    _scored(tmp_path)
    best = _select(tmp_path, "best", "    mode: best_of_n\n    min_score: 1.0\n")
    # group 0: a0 and a2 tie at 1.0 -> the first in score order; group 1: b2 (1.0) is the best.
    assert [(r["prompt"], r["completion"]) for r in best] == [("question 0", "a0"), ("question 1", "b2 truncated")]
    assert all("select" in r["provenance"] and "generate" in r["provenance"] for r in best)
    top = _select(tmp_path, "top", "    mode: top_k\n    k: 2\n")
    assert [r["completion"] for r in top] == ["a0", "a2", "b2 truncated", "b3"]
    pairs = _select(tmp_path, "pairs", "    mode: pairs\n")
    # group 0: best a0 (1.0) vs worst a1 (0.0); group 1: the best is truncated -> dropped.
    assert [(r["chosen"], r["rejected"], r["margin"]) for r in pairs] == [("a0", "a1", 1.0)]
    every = _select(tmp_path, "every", "    mode: pairs\n    pairs: all_pairs\n    drop_truncated_chosen: false\n")
    # ties (a0/a2, b0/b1) never pair; 5 pairs in group 0, 5 in group 1.
    assert len(every) == 10 and all(r["margin"] > 0 for r in every)
    assert ("a0", "a2") not in {(r["chosen"], r["rejected"]) for r in every}


def test_select_settings_that_do_not_apply_are_errors(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: s\nstages:\n  s:\n    kind: select\n    data: {path: x.jsonl}\n    mode: best_of_n\n"
                      "    min_margin: 0.5\n")
    assert main(["validate", str(recipe)]) == 2
    assert "'min_margin' has no effect with mode: best_of_n" in capsys.readouterr().err


def test_generate_score_select_feed_a_preference_and_an_sft_stage(tmp_path):
    """The plumbing end to end: every stage's output is the next one's input, keyed by content."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""\
name: loop
stages:
  base:
    kind: sft
    model:
{MODEL}
    data: {{builtin: demo.sft, args: {{n: 32}}}}
    train: {{lr: 1e-3, global_batch_size: 16, micro_batch_size: 16, max_length: 96, checkpoint_every: 0}}
  samples:
    kind: generate
    from: base
    data: {{builtin: demo.prompts, args: {{n: 6}}}}
    sampling: {{n: 3, max_new_tokens: 12, temperature: 1.0}}
  scored:
    kind: score
    data: {{stage: samples}}
    rewards: [{{name: math}}, {{name: length, target_length: 5, length_scale: 200, weight: 0.1}}]
  pairs:
    kind: select
    data: {{stage: scored}}
    mode: pairs
    drop_truncated_chosen: false
  dpo:
    kind: preference
    from: base
    data: {{stage: pairs}}
    train: {{lr: 1e-3, global_batch_size: 2, micro_batch_size: 2, max_length: 96, checkpoint_every: 0}}
""")
    assert main(["run", str(recipe), "--workdir", str(tmp_path / "w"), "--no-progress"]) == 0
    samples = _rows(tmp_path / "w", "samples")
    assert len(samples) == 18 and {r["sample"] for r in samples} == {0, 1, 2}
    base_key = next((tmp_path / "w" / "stages" / "base").iterdir()).name
    assert all(r["provenance"]["generate"]["model"] == base_key and "answer" in r for r in samples)
    scored = _rows(tmp_path / "w", "scored")
    assert all(set(r["rewards"]) == {"math", "length"} for r in scored)
    assert all(abs(r["score"] - (r["rewards"]["math"] + 0.1 * r["rewards"]["length"])) < 1e-9 for r in scored)
    manifest = json.loads(next((tmp_path / "w" / "stages" / "dpo").glob("*/manifest.json")).read_text())
    assert set(manifest["parents"]) == {"base", "pairs"}
    # Re-running is all cache hits.
    assert main(["run", str(recipe), "--workdir", str(tmp_path / "w"), "--no-progress"]) == 0
    ledger = [json.loads(line) for line in (tmp_path / "w" / "ledger.jsonl").read_text().splitlines()]
    assert [e["event"] for e in ledger[-5:]] == ["cached"] * 5
