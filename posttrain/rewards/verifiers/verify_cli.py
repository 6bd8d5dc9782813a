"""``posttrain verify KIND --data FILE [--out FILE]``: score a JSONL file with one verifier.

Each input line is a JSON object holding ``completion`` (a string, or a list of chat messages
whose last ``content`` is scored) and the fields the verifier reads (see
`posttrain.rewards.verifiers`). Each output line is ``{"line", "score", "components", "meta"}``
for the input line of that number, in input order; blank input lines are not rows and get no
output. Every problem in the file (bad JSON, a missing field) is reported at once, with its
``file:line``, before anything is written. ``--out`` is written to a temporary file and renamed,
so an existing output is never left half-written.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from posttrain.errors import Problem, UserError, problem
from posttrain.rewards.verifiers import Verifier, get_verifier
from posttrain.types import RewardResult

_MAX_PROBLEMS = 20  # a file with a systematic error repeats it on every line; show the first few
_ROW_EXAMPLE = '{"completion": "... \\\\boxed{42}", "answer": "42"}'


def verify_file(kind: str, data: Path, out: Path | None) -> int:
    """Score every row of ``data`` with the verifier ``kind``; write JSONL to ``out`` or stdout.

    Returns the process exit code (0). Raises UserError for an unknown kind, an unreadable file
    or malformed rows.
    """
    verifier = get_verifier(kind)
    rows = _read_rows(Path(data))
    results = _score_rows(verifier, Path(data), rows)
    lines = [_render(line, result) for (line, _, _), result in zip(rows, results)]
    _write(lines, out)
    scores = [r.score for r in results if r.score is not None]  # None = masked, not zero
    mean = sum(scores) / len(scores) if scores else 0.0
    print(f"verify {kind}: {len(results)} rows, mean score {mean:.4f}", file=sys.stderr)
    return 0


def _read_rows(data: Path) -> list[tuple[int, str, Mapping[str, Any]]]:
    """(line number, completion, row) for every non-blank line; all problems raised at once."""
    try:
        text = data.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError, PermissionError, UnicodeDecodeError) as err:
        raise UserError(problem(str(data), f"cannot read the data file: {err}",
                                "pass --data a readable UTF-8 JSONL file")) from err
    rows: list[tuple[int, str, Mapping[str, Any]]] = []
    found: list[Problem] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        row, completion, bad = _parse_line(raw, f"{data}:{number}")
        if bad is not None:
            found.append(bad)
        else:
            rows.append((number, completion, row))
    _raise_collected(found, data)
    return rows


def _parse_line(raw: str, where: str) -> tuple[Any, str, Problem | None]:
    try:
        row = json.loads(raw)
    except ValueError as err:
        return None, "", problem(where, f"not valid JSON ({err})",
                                 f"make each line one JSON object, e.g. {_ROW_EXAMPLE}")
    if not isinstance(row, dict):
        return None, "", problem(where, f"a row must be a JSON object, got {type(row).__name__}",
                                 f"make each line one JSON object, e.g. {_ROW_EXAMPLE}")
    completion = row.get("completion")
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        completion = completion[-1].get("content")  # chat messages: score the last turn
    if not isinstance(completion, str):
        return None, "", problem(where, "missing or non-string field 'completion'",
                                 "add the model output as \"completion\": \"...\"",
                                 value=row.get("completion"))
    return row, completion, None


def _score_rows(verifier: Verifier, data: Path, rows: list[tuple[int, str, Mapping[str, Any]]]
                ) -> list[RewardResult]:
    results: list[RewardResult] = []
    found: list[Problem] = []
    for number, completion, row in rows:
        try:
            results.append(verifier(completion, row))
        except UserError as err:  # a row-level problem: say which line
            found.extend(problem(f"{data}:{number}", f"{p.where}: {p.message}", p.fix) for p in err.problems)
    _raise_collected(found, data)
    return results


def _raise_collected(found: list[Problem], data: Path) -> None:
    if not found:
        return
    shown = found[:_MAX_PROBLEMS]
    if len(found) > _MAX_PROBLEMS:
        shown.append(problem(str(data), f"... and {len(found) - _MAX_PROBLEMS} more problems"))
    raise UserError(shown, title=f"{len(found)} problem(s) in {data}")


def _render(line: int, result: RewardResult) -> str:
    record = {"line": line, "score": result.score, "components": result.components, "meta": result.meta}
    return json.dumps(record, ensure_ascii=False, default=str)


def _write(lines: list[str], out: Path | None) -> None:
    body = "".join(line + "\n" for line in lines)
    if out is None:
        sys.stdout.write(body)
        sys.stdout.flush()
        return
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(body, encoding="utf-8")
    partial.replace(out)
