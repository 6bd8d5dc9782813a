"""Code verifier: run a completion against its tests in the sandbox and pay the share of tests
that the trusted harness saw pass (or all-or-nothing).

Row fields (one of the two test styles):

- MBPP style: ``tests`` (list of statements, usually ``assert f(x) == y``; MBPP's own name
  ``test_list`` is accepted too), optional ``setup`` (``test_setup_code``), run in the program's
  namespace after the program, and optional ``entry_point`` (the function under test; inferred
  from the first test when absent, which matters only when it shadows a builtin, e.g. ``sum``).
- HumanEval style: ``test`` (source defining ``check(candidate)``), ``entry_point``, and
  optional ``prompt``. A completion that does not itself define ``entry_point`` continues the
  prompt (HumanEval's convention: program = prompt + completion); one that does is run after the
  prompt, so the prompt's imports and helpers stay available and its stub is redefined.
- ``all_or_nothing`` (optional bool) when the verifier is called through the registry.

The completion's code is its first fenced ``python`` block (``py``, ``python3`` too), else its
first unlabelled fence, else the whole text.

How the verdicts stay honest (details in sandbox.py and docs/sandbox.md): the tests run in a
harness process that never executes the completion; the completion's functions are proxies whose
calls return plain values decoded into exact builtin types, so exit codes, printed or written
fake verdicts, monkeypatching and objects that claim to equal everything cannot pass a test.
Names the tests use resolve, in order, to the prompt's definitions and the builtins (trusted),
to standard-library modules imported by the harness (trusted), and only then to the program.

Score: ``passed / total`` (``all_or_nothing``: 1.0 only if every test passed). A program that
does not load (syntax error, exception at top level) scores 0.0 with ``meta["reason"]``; a
sandbox that cannot start scores None (masked), with ``meta["error"]``.
"""

from __future__ import annotations

import ast
import builtins
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from posttrain.errors import UserError, problem
from posttrain.rewards.verifiers.sandbox import (
    SandboxLimits,
    SandboxRequest,
    SandboxResult,
    SandboxUnavailable,
    run_program,
    run_programs,
)
from posttrain.types import RewardResult

_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
_PYTHON_LABELS = ("python", "py", "python3")
_TAIL_CHARS = 1000


def extract_code(completion: str) -> str:
    """The completion's program: the first ```python block, else the first unlabelled fence,
    else the whole text. An unclosed fence runs to the end of the text."""
    fences = _FENCE_RE.findall(completion)
    for label, body in fences:
        if label.lower() in _PYTHON_LABELS:
            return body
    for label, body in fences:
        if not label:
            return body
    return completion


def build_request(completion: str, row: Mapping[str, Any]) -> SandboxRequest:
    """The sandbox request for one completion and its row; raises UserError on a bad row."""
    code = extract_code(completion)
    tests = row.get("tests", row.get("test_list"))
    setup = str(row.get("setup", row.get("test_setup_code")) or "")
    if tests is not None:
        if isinstance(tests, str) or not isinstance(tests, Sequence) or not tests:
            raise UserError(problem("row.tests", "must be a non-empty list of test statements",
                                    'e.g. ["assert f(1) == 2"]', value=tests))
        tests = tuple(str(test) for test in tests)
        entry_point = row.get("entry_point") or infer_entry_point(tests)
        return SandboxRequest(program=code, tests=tests, entry_point=entry_point, setup=setup)
    if row.get("test") is None or not row.get("entry_point"):
        raise UserError(problem(
            "row", "a code row needs `tests` (a list of asserts) or `test` + `entry_point` (HumanEval)",
            "add the tests to the row", value=sorted(row)))
    prompt = str(row.get("prompt") or "")
    entry_point = str(row["entry_point"])
    return SandboxRequest(program=humaneval_program(code, prompt, entry_point), check=str(row["test"]),
                          entry_point=entry_point, setup=setup, prelude=prompt)


def humaneval_program(code: str, prompt: str, entry_point: str) -> str:
    """prompt + completion, HumanEval's convention, unless the completion defines the function
    itself; then the prompt comes first, for its imports and helpers, and its stub is replaced."""
    if not prompt:
        return code
    if _defines(code, entry_point):
        return prompt.rstrip("\n") + "\n\n\n" + code
    return prompt + code


def _defines(code: str, name: str) -> bool:
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return False  # an indented body that continues the prompt does not parse alone
    return any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name
               for node in tree.body)


def infer_entry_point(tests: Sequence[str]) -> str | None:
    """The function under test: the first function the first parsable test calls by name that
    is neither a builtin nor a standard-library module, else the first one it calls."""
    for test in tests:
        try:
            tree = ast.parse(test)
        except SyntaxError:
            continue
        called = [node.func.id for node in ast.walk(tree)
                  if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)]
        if not called:
            continue
        for name in called:
            if not hasattr(builtins, name) and name not in sys.stdlib_module_names:
                return name
        return called[0]
    return None


def verify_code(completion: str, row: Mapping[str, Any], *, all_or_nothing: bool = False,
                limits: SandboxLimits | None = None) -> RewardResult:
    """Score one completion against the row's tests (see the module docstring)."""
    request = build_request(completion, row)
    try:
        result = run_program(request, limits)
    except SandboxUnavailable as err:
        raise _unavailable(err) from err
    return score_result(result, all_or_nothing=all_or_nothing)


def verify_code_batch(completions: Sequence[str], rows: Sequence[Mapping[str, Any]], *,
                      all_or_nothing: bool = False, limits: SandboxLimits | None = None,
                      max_workers: int | None = None) -> list[RewardResult]:
    """Score many completions, at most ``max_workers`` sandboxes at a time (default: CPUs)."""
    if len(completions) != len(rows):
        raise ValueError(f"{len(completions)} completions but {len(rows)} rows")
    requests = [build_request(completion, row) for completion, row in zip(completions, rows)]
    try:
        results = run_programs(requests, limits, max_workers=max_workers)
    except SandboxUnavailable as err:
        raise _unavailable(err) from err
    return [score_result(result, all_or_nothing=all_or_nothing) for result in results]


def verify_code_row(completion: str, row: Mapping[str, Any]) -> RewardResult:
    """The registry's entry: ``all_or_nothing`` may come from the row."""
    return verify_code(completion, row, all_or_nothing=bool(row.get("all_or_nothing", False)))


def score_result(result: SandboxResult, *, all_or_nothing: bool = False) -> RewardResult:
    """A RewardResult from what the harness saw; never pays for what it did not see."""
    meta = _meta(result)
    if result.error is not None:
        return RewardResult(score=None, meta={**meta, "error": result.error})
    total, passed = len(result.passed), sum(result.passed)
    share = passed / total if total else 0.0
    everything = 1.0 if total and passed == total else 0.0
    reason = _reason(result, passed, total)
    if reason:
        meta["reason"] = reason
    return RewardResult(
        score=everything if all_or_nothing else share,
        components={"pass_rate": share, "all_passed": everything},
        meta=meta,
    )


def _meta(result: SandboxResult) -> dict[str, Any]:
    return {
        "tests": [{"passed": ok, "error": error} for ok, error in zip(result.passed, result.errors)],
        "passed": sum(result.passed),
        "total": len(result.passed),
        "limit": result.limit,
        "isolation": result.isolation,
        "isolation_level": result.level,
        "isolation_features": list(result.features),
        "load_error": result.load_error,
        "worker_exit": result.worker_exit,
        "stderr_tail": result.stderr_tail[-_TAIL_CHARS:],
        "output_bytes": result.output_bytes,
        "wall_s": round(result.wall_s, 4),
        "run_id": result.run_id,
    }


def _reason(result: SandboxResult, passed: int, total: int) -> str | None:
    if result.limit:
        return f"the {result.limit} limit was reached"
    if not result.loaded:
        error = (result.load_error or "").strip().splitlines()
        return "the program does not load" + (f": {error[-1]}" if error else "")
    if passed < total:
        return f"{total - passed} of {total} tests failed"
    return None


def _unavailable(err: SandboxUnavailable) -> UserError:
    return UserError(problem("code verifier sandbox", str(err),
                             "use SandboxLimits(isolation='auto'), or run where namespaces are allowed"))


def register(registry: Any) -> None:
    """Add this verifier to the verifier registry as "code"."""
    registry.add("code", verify_code_row)
