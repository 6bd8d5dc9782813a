"""`posttrain eval`, `posttrain eval --compare` and `posttrain data contamination` through the CLI:
they work end to end, and bad input exits 2 with a message naming the argument or key and the fix."""

from __future__ import annotations

import json

import pytest

from posttrain.cli import main
from posttrain.evals.base import EvalResult
from posttrain.evals.results import compare_results, load_results, write_results


def _code(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _fails(capsys, *args: str, needles: tuple[str, ...]) -> str:
    code, _, err = _code(capsys, *args)
    assert code == 2, err
    assert "Traceback" not in err and "fix:" in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_eval_writes_records_and_metrics_then_compare_reads_them(capsys, tmp_path, saved_model):
    runs = {}
    for seed in (0, 1):
        out = tmp_path / f"eval{seed}"
        code, printed, err = _code(capsys, "eval", saved_model(seed), "--tasks", "demo_accuracy,calibration",
                                   "--limit", "6", "--set", "demo_accuracy.max_new_tokens=4", "--out", out,
                                   "--no-progress")
        assert code == 0, err
        assert "demo_accuracy:" in printed and "calibration_ece" in printed
        metrics = json.loads((out / "metrics.json").read_text())
        assert {"demo_accuracy", "calibration_ece"} <= set(metrics)
        assert len((out / "demo_accuracy.jsonl").read_text().splitlines()) == 6
        runs[seed] = out
    code, printed, err = _code(capsys, "eval", "--compare", runs[0], runs[1])
    assert code == 0, err
    assert "demo_accuracy" in printed and "calibration_brier" in printed
    assert "mcnemar" in printed and "paired bootstrap" in printed


def test_eval_defaults_to_the_model_folders_eval_folder(capsys, tmp_path, saved_model):
    import shutil

    model = tmp_path / "artifact"
    shutil.copytree(saved_model(0), model / "model")  # a stage artifact: <folder>/model/
    code, _, err = _code(capsys, "eval", model, "--tasks", "demo_accuracy", "--limit", "2", "--no-progress")
    assert code == 0, err
    assert (model / "eval" / "metrics.json").exists()


def test_compare_uses_mcnemar_on_aligned_binary_scores(tmp_path):
    def run(folder, outcomes):
        records = [{"id": f"q{i}", "scores": {"acc": float(x)}} for i, x in enumerate(outcomes)]
        write_results(folder, [("task", EvalResult({"acc": sum(outcomes) / len(outcomes)}, records))])
        return load_results(folder, "x")

    a = run(tmp_path / "a", [0] * 6 + [1] * 4)
    b = run(tmp_path / "b", [1] * 6 + [1] * 4)  # six discordant pairs, all in B's favour
    [row] = compare_results(a, b)
    assert row.test == "mcnemar" and row.paired == 10
    assert row.delta == pytest.approx(0.6) and row.p_value == pytest.approx(2 / 64)
    assert row.significant


def test_compare_bad_input(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    _fails(capsys, "eval", "--compare", tmp_path / "empty", tmp_path, needles=("--compare A", "no eval results"))
    _fails(capsys, "eval", tmp_path, "--compare", tmp_path, tmp_path, needles=("--compare",))


@pytest.mark.parametrize(("args", "needles"), [
    (["--tasks", "demo_accuracy"], ("MODEL", "is not a model folder")),
    (["--tasks", "gsm8"], ("eval.0.task", "did you mean 'gsm8k'?")),
    (["--tasks", "gsm8k", "--set", "gsm8k.options.tempreature=1"], ("eval.0.options.tempreature", "temperature")),
    (["--tasks", "gsm8k", "--set", "ifeval.limit=3"], ("--set ifeval.limit=3", "TASK.KEY=VALUE")),
    (["--tasks", "perplexity", "--set", "perplexity.max_new_tokens=3"], ("eval.0.max_new_tokens",)),
    ([], ("--tasks", "no eval tasks")),
])
def test_eval_bad_input_exits_2_before_loading_anything(capsys, tmp_path, args, needles):
    _fails(capsys, "eval", tmp_path / "nope", *args, needles=needles)


def test_eval_config_file_entries(capsys, tmp_path, saved_model):
    config = tmp_path / "tasks.yaml"
    config.write_text("- {task: demo_accuracy, limit: 2, max_new_tokens: 3}\n- {task: calibration, limit: 2}\n")
    code, printed, err = _code(capsys, "eval", saved_model(0), "--config", config, "--out", tmp_path / "o",
                               "--no-progress")
    assert code == 0, err
    assert "calibration:" in printed
    config.write_text("- {task: calibration, limit: 2, options: {bins: 0}}\n")
    _fails(capsys, "eval", saved_model(0), "--config", config, needles=("eval.0.options.bins",))


@pytest.fixture
def contamination_files(tmp_path, write_jsonl):
    evals = [{"question": f"Question number {i}: how many apples does a farmer with {i} trees and "
                          f"{i + 3} baskets collect on a sunny day in late autumn?", "answer": str(i)}
             for i in range(20)]
    train = [{"prompt": f"Write a short poem about the colour {c} and the sea at night, in four lines.",
              "completion": "..."} for c in ("red", "blue", "green", "grey", "gold")]
    train.append({"prompt": "Please solve: " + evals[7]["question"], "completion": "7"})
    return write_jsonl(tmp_path / "train.jsonl", train), write_jsonl(tmp_path / "eval.jsonl", evals)


def test_contamination_report_drop_and_fail(capsys, tmp_path, contamination_files):
    train, evals = contamination_files
    code, printed, err = _code(capsys, "data", "contamination", train, "--against", evals,
                               "--report", tmp_path / "pairs.jsonl")
    assert code == 0, err
    assert f"{train}:6 ~ {evals}:8" in printed and "1 overlapping pairs" in printed
    assert json.loads((tmp_path / "pairs.jsonl").read_text())["train"] == f"{train}:6"
    code, printed, _ = _code(capsys, "data", "contamination", train, "--against", evals,
                             "--on-contamination", "drop", "--out", tmp_path / "clean.jsonl")
    assert code == 0 and "kept 5 of 6 rows" in printed
    assert (tmp_path / "clean.jsonl").read_bytes() == b"".join(train.read_bytes().splitlines(keepends=True)[:5])
    code, _, err = _code(capsys, "data", "contamination", train, "--against", evals, "--on-contamination", "fail")
    assert code == 1 and "1 training rows overlap" in err


def test_contamination_against_a_task_name(capsys, eval_data, tmp_path, write_jsonl):
    rows = [json.loads(line) for line in (eval_data / "gsm8k" / "test.jsonl").read_text().splitlines()[:3]]
    train = write_jsonl(tmp_path / "t.jsonl", [{"prompt": r["question"], "completion": "x"} for r in rows])
    code, printed, err = _code(capsys, "data", "contamination", train, "--against", "gsm8k")
    assert code == 0, err
    assert "3 overlapping pairs (3 exact" in printed


@pytest.mark.parametrize(("extra", "needles"), [
    (["--against", "nowhere.jsonl"], ("--against nowhere.jsonl", "no such file")),
    (["--against", "EVAL", "--on-contamination", "drop"], ("--out", "needs --out")),
    (["--against", "EVAL", "--near", "1.5"], ("--near",)),
    (["--against", "EVAL", "--out", "x.jsonl"], ("--out", "only written with")),
])
def test_contamination_bad_input(capsys, contamination_files, extra, needles):
    train, evals = contamination_files
    extra = [str(evals) if a == "EVAL" else a for a in extra]
    _fails(capsys, "data", "contamination", train, *extra, needles=needles)


def test_contamination_missing_train_file(capsys, tmp_path, contamination_files):
    _, evals = contamination_files
    _fails(capsys, "data", "contamination", tmp_path / "missing.jsonl", "--against", evals,
           needles=("TRAIN", "does not exist"))
