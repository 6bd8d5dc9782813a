"""Contamination scan: planted overlaps are all found, disjoint sets give none, the policies, the
hook the pipeline calls before training, and the real overlaps of GSM8K train against test."""

from __future__ import annotations

import random
import time

import pytest

from posttrain.config.components import EvalTaskConfig
from posttrain.data.contamination import (
    ScanSettings,
    TextRow,
    apply_policy,
    normalize,
    row_from_dict,
    scan,
)
from posttrain.data.formats import read_file
from posttrain.errors import UserError
from posttrain.evals.contamination import guard_training_data
from posttrain.types import ChatExample, Message, RowSource

VOCAB = [f"w{i}" for i in range(800)]


def _sentence(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(VOCAB) for _ in range(n)]


def _rows(name: str, texts: list[str], answers: list[str] | None = None) -> list[TextRow]:
    answers = answers or [""] * len(texts)
    return [TextRow(RowSource(name, i + 1), t, t + "\n" + a) for i, (t, a) in enumerate(zip(texts, answers))]


@pytest.fixture(scope="module")
def synthetic():
    rng = random.Random(0)
    evals = [" ".join(_sentence(rng, rng.randint(14, 40))) for _ in range(300)]
    evals[20] = " ".join(_sentence(rng, 12))  # short prompts: matched whole or as near duplicates
    evals[21] = " ".join(_sentence(rng, 10))
    train = [" ".join(_sentence(rng, rng.randint(14, 40))) for _ in range(1500)]
    answers = [" ".join(_sentence(rng, 30)) for _ in range(1500)]
    return evals, train, answers


def test_normalize_ignores_case_punctuation_and_spacing():
    assert normalize("  The CAT,  sat!\n(on the mat)") == ["the", "cat", "sat", "on", "the", "mat"]
    assert normalize("Café") == normalize("CAFÉ")


def test_disjoint_sets_have_no_overlap(synthetic):
    evals, train, answers = synthetic
    report = scan(_rows("train", train, answers), {"eval": _rows("eval", evals)})
    assert report.overlaps == []
    assert report.train_rows == 1500 and report.eval_rows == {"eval": 300}


def test_every_planted_overlap_is_found(synthetic):
    evals, train, answers = synthetic
    train, answers = list(train), list(answers)
    words7 = evals[7].split()
    short_near = evals[20].split()
    plants = {
        # (train line, eval line, kind)
        (11, 4, "exact"): evals[3].upper().replace(" ", " ,  ") + "?",
        (12, 8, "ngram"): "preface words here " + " ".join(words7[2:2 + 13]) + " and a different ending",
        (13, 21, "near"): " ".join(short_near[:-1] + ["changed"]),  # 12 words, the last one changed
        (14, 22, "ngram"): "some context " + evals[21] + " more context after it for good measure",
    }
    for (line, _, _), text in plants.items():
        train[line - 1] = text
    answers[200] = "the answer quotes the question: " + evals[50]  # eval row 51 inside a response
    plants[(201, 51, "ngram")] = None
    report = scan(_rows("train", train, answers), {"eval": _rows("eval", evals)})
    found = {(o.train.line, o.eval.line, o.kind) for o in report.overlaps}
    assert found == set(plants), found
    near = next(o for o in report.overlaps if o.kind == "near")
    assert near.jaccard == pytest.approx(9 / 11)  # 10 shingles each, 9 shared
    assert report.counts() == {"pairs": 5, "train_rows": 5, "eval_rows": 5, "exact": 1, "near": 1, "ngram": 3}
    assert "train:11 ~ eval:4 [eval] same prompt" in report.summary()


def test_ngram_length_is_a_setting(synthetic):
    evals, _, _ = synthetic
    words = evals[7].split()
    train = _rows("train", ["x " + " ".join(words[:9]) + " y"])
    assert scan(train, {"eval": _rows("eval", evals)}).overlaps == []
    assert len(scan(train, {"eval": _rows("eval", evals)}, ScanSettings(ngram=8)).overlaps) == 1


def test_policies(synthetic):
    evals, train, _ = synthetic
    rows = _rows("train", train[:50] + [evals[0]])
    report = scan(rows, {"eval": _rows("eval", evals)})
    sources = [r.source for r in rows]
    assert apply_policy(report, rows, sources, "report", where="data") == rows
    assert apply_policy(report, rows, sources, "drop", where="data") == rows[:50]
    with pytest.raises(UserError) as err:
        apply_policy(report, rows, sources, "fail", where="stages.sft.data")
    assert "train:51" in err.value.render() and "eval:1" in err.value.render() and "fix:" in err.value.render()


def _chat(text: str, line: int) -> ChatExample:
    return ChatExample([Message(role="user", content=text), Message(role="assistant", content="ok")],
                       RowSource("sft.jsonl", line))


def test_hook_scans_a_training_stage_against_the_recipes_eval_sets(tmp_path, monkeypatch):
    from posttrain.evals.common import EVAL_DATA_ENV

    monkeypatch.delenv(EVAL_DATA_ENV, raising=False)
    from posttrain.demo.world import prompt_rows, sft_rows

    held_out = prompt_rows("test", {})[5]["prompt"][0]["content"]
    examples = [_chat(r["messages"][0]["content"], i + 1) for i, r in enumerate(sft_rows("train", {"n": 300}))]
    tasks = [EvalTaskConfig(task="demo_accuracy"), EvalTaskConfig(task="gsm8k")]
    kept, report = guard_training_data(examples, tasks, where="stages.sft.data")
    assert report.overlaps == [] and kept == examples  # the demo world's splits are disjoint
    assert report.skipped and report.skipped[0].startswith("gsm8k: task 'gsm8k' has no data")
    leaked = [*examples, _chat(held_out, 301)]
    kept, report = guard_training_data(leaked, tasks, on_contamination="drop", report_path=tmp_path / "r.jsonl")
    assert kept == examples and [str(o.train) for o in report.overlaps] == ["sft.jsonl:301"]
    assert (tmp_path / "r.jsonl").read_text().count("\n") == 1
    with pytest.raises(UserError, match="sft.jsonl:301"):
        guard_training_data(leaked, tasks, on_contamination="fail", where="stages.sft.data")


def test_gsm8k_train_against_test_real_overlaps(shared_data):
    """GSM8K's train and test splits share no question, but four train problems reuse a test
    problem's template with other numbers and names (13-gram overlap); none is a near duplicate."""
    folder = shared_data / "gsm8k"
    start = time.monotonic()
    train = [row_from_dict(r, s) for r, s in read_file(folder / "train.jsonl", where="train")]
    test = [row_from_dict(r, s) for r, s in read_file(folder / "test.jsonl", where="test")]
    report = scan(train, {"gsm8k_test": test})
    elapsed = time.monotonic() - start
    pairs = {(o.train.line, o.eval.line, o.kind) for o in report.overlaps}
    assert pairs == {(21, 633, "ngram"), (407, 582, "ngram"), (1315, 603, "ngram"), (5163, 603, "ngram")}
    assert report.counts()["exact"] == 0 and report.counts()["near"] == 0
    assert elapsed < 30, f"scan took {elapsed:.1f}s"
