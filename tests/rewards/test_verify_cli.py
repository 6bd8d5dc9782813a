"""``posttrain verify KIND --data FILE [--out FILE]`` end to end through `verify_file`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.errors import UserError
from posttrain.rewards.verifiers.verify_cli import verify_file

ROWS = [
    {"completion": "so the answer is $\\boxed{\\frac{1}{2}}$", "answer": "0.5"},
    {"completion": "I get 7.", "answer": "8"},
    {"completion": "no idea", "answer": "3"},
    {"completion": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "\\boxed{4}"}],
     "answer": "4"},
]


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_scores_each_line_in_order_to_a_file(tmp_path: Path) -> None:
    data = _write_jsonl(tmp_path / "in.jsonl", [json.dumps(r) for r in ROWS[:2]] + [""]
                        + [json.dumps(r) for r in ROWS[2:]])
    out = tmp_path / "sub" / "scores.jsonl"
    assert verify_file("math", data, out) == 0
    records = _read_jsonl(out)
    assert [r["line"] for r in records] == [1, 2, 4, 5]  # the blank line 3 is not a row
    assert [r["score"] for r in records] == [1.0, 0.0, 0.0, 1.0]
    assert records[0]["components"] == {"correct": 1.0}
    assert records[0]["meta"]["match"] == "numeric"
    assert records[1]["meta"]["extract_rule"] == "last_number"
    assert "reason" in records[2]["meta"]
    assert not (tmp_path / "sub" / "scores.jsonl.partial").exists()


def test_writes_to_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"completion": '{"a": 1}', "schema": {"type": "object", "required": ["a"]}},
            {"completion": "not json", "schema": None}]
    data = _write_jsonl(tmp_path / "in.jsonl", [json.dumps(r) for r in rows])
    assert verify_file("json", data, None) == 0
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["score"] for r in records] == [1.0, 0.0]
    assert "2 rows" in captured.err


def test_malformed_lines_name_file_and_line(tmp_path: Path) -> None:
    data = _write_jsonl(tmp_path / "bad.jsonl", [
        json.dumps(ROWS[0]), "{not json", json.dumps([1, 2]), json.dumps({"answer": "1"}),
    ])
    with pytest.raises(UserError) as caught:
        verify_file("math", data, tmp_path / "out.jsonl")
    message = str(caught.value)
    assert f"{data}:2: not valid JSON" in message
    assert f"{data}:3: a row must be a JSON object" in message
    assert f"{data}:4: missing or non-string field 'completion'" in message
    assert "fix:" in message
    assert not (tmp_path / "out.jsonl").exists()  # nothing written when the input is bad


def test_missing_verifier_field_names_file_line_and_field(tmp_path: Path) -> None:
    data = _write_jsonl(tmp_path / "in.jsonl", [json.dumps({"completion": "x"})])
    with pytest.raises(UserError, match=rf"{data}:1: row.pattern: .*'pattern'"):
        verify_file("regex", data, None)


def test_unknown_kind_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown verifier 'maht'"):
        verify_file("maht", tmp_path / "x.jsonl", None)
    with pytest.raises(UserError, match="cannot read the data file"):
        verify_file("math", tmp_path / "absent.jsonl", None)
