"""Structured-output verifiers: JSON (+ JSON Schema), regex, exact match, multiple choice, a
tag-format reward, a length penalty and DAPO's soft overlong penalty.

Each is a pure function returning `RewardResult` (deterministic, no printing, no RNG); each has a
row adapter ``*_row(completion, row)`` that the verifier registry exposes by name. A malformed
argument the user controls (a schema that is not a schema, a bad regex, a missing row field)
raises `UserError`; a completion that does not parse scores 0.0 with ``meta["reason"]``.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from posttrain.errors import UserError, problem
from posttrain.rewards.verifiers.math import last_boxed
from posttrain.types import RewardResult

# --------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------

_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)```", re.S)
_MAX_ERRORS_SHOWN = 10
_MAX_EMBEDDED_STARTS = 1000


@dataclass(frozen=True)
class FoundJson:
    """A JSON value found in a completion; ``source`` is "fenced", "whole" or "embedded"."""

    value: Any
    source: str


def extract_json(text: str) -> FoundJson | None:
    """The completion's JSON: a fenced ```json block (any fence if none is labelled json), else
    the whole text, else the first object or array embedded in the text (trying at most
    `_MAX_EMBEDDED_STARTS` opening brackets, so prose full of braces stays cheap)."""
    fences = _FENCE_RE.findall(text)
    labelled = [body for label, body in fences if label.lower() == "json"]
    for body in labelled or [body for _, body in fences]:
        value = _loads(body)
        if value is not _NOT_JSON:
            return FoundJson(value, "fenced")
    value = _loads(text)
    if value is not _NOT_JSON:
        return FoundJson(value, "whole")
    decoder = json.JSONDecoder()
    for attempt, m in enumerate(re.finditer(r"[{\[]", text)):
        if attempt >= _MAX_EMBEDDED_STARTS:
            break
        try:
            value, _ = decoder.raw_decode(text, m.start())
        except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested too deeply
            continue
        return FoundJson(value, "embedded")
    return None


_NOT_JSON = object()


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return _NOT_JSON


@functools.lru_cache(maxsize=128)
def _validator(schema_text: str) -> Any:
    """A checked validator for a schema (cached by its canonical JSON text)."""
    import jsonschema  # imported on first use: it is not needed by most verifiers

    schema = json.loads(schema_text)
    validator_class = jsonschema.validators.validator_for(schema)
    try:
        validator_class.check_schema(schema)
    except jsonschema.SchemaError as err:
        raise UserError(problem(
            "schema", f"not a valid JSON Schema: {err.message}",
            "fix the schema (see https://json-schema.org/understanding-json-schema/)",
        )) from err
    return validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)


def verify_json(completion: str, schema: Mapping[str, Any] | bool | None = None) -> RewardResult:
    """1.0 when the completion holds JSON that (if ``schema`` is given) validates against it.

    components: ``parses``, and ``valid`` when a schema is given. meta: ``source`` (where the
    JSON was found), ``validated`` (whether a schema was checked), ``errors`` (at most 10, each
    "path: message"), ``reason`` on failure. ``format`` keywords are checked where jsonschema
    can check them without extra packages.
    """
    found = extract_json(completion)
    if found is None:
        components = {"parses": 0.0} if schema is None else {"parses": 0.0, "valid": 0.0}
        meta = {"source": None, "validated": False, "reason": "no JSON object or array found"}
        return RewardResult(0.0, components, meta)
    if schema is None:
        return RewardResult(1.0, {"parses": 1.0}, {"source": found.source, "validated": False})
    validator = _validator(json.dumps(schema, sort_keys=True))
    errors = sorted(validator.iter_errors(found.value), key=lambda e: list(map(str, e.absolute_path)))
    shown = [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]
    meta: dict[str, Any] = {"source": found.source, "validated": True}
    if errors:
        meta.update(errors=shown[:_MAX_ERRORS_SHOWN], reason=f"{len(errors)} schema violation(s)")
    score = 0.0 if errors else 1.0
    return RewardResult(score, {"parses": 1.0, "valid": score}, meta)


def verify_json_row(completion: str, row: Mapping[str, Any]) -> RewardResult:
    """The ``json`` verifier: ``row["schema"]`` is a JSON Schema (object or JSON text); null
    means "any JSON parses"."""
    schema = _require(row, "schema", "json", '"schema": {"type": "object", ...} (or null to only parse)')
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as err:
            raise UserError(problem("row.schema", f"schema text is not JSON: {err}",
                                    "give the schema as a JSON object")) from err
    if schema is not None and not isinstance(schema, (dict, bool)):
        raise UserError(problem("row.schema", "a JSON Schema must be an object or a boolean",
                                "give the schema as a JSON object", value=schema))
    return verify_json(completion, schema)


# --------------------------------------------------------------------------------------------
# Regex and exact match
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _compile(pattern: str, flags: int) -> re.Pattern[str]:
    try:
        return re.compile(pattern, flags)
    except re.error as err:
        raise UserError(problem(
            "pattern", f"invalid regular expression: {err.msg} at position {err.pos}",
            "fix the pattern (Python `re` syntax; escape literal characters such as ( ) [ ] . * + ?)",
            value=pattern,
        )) from err


def verify_regex(completion: str, pattern: str, *, flags: int = 0, strip: bool = True) -> RewardResult:
    """1.0 when the whole completion matches ``pattern`` (`re.fullmatch`), else 0.0.

    ``strip`` removes surrounding whitespace first (a trailing newline is not part of an answer).
    meta ``partial`` says whether the pattern matched somewhere (a diagnostic, never paid).
    Patterns run on Python's backtracking engine: a catastrophic pattern can be slow.
    """
    compiled = _compile(pattern, flags)
    text = completion.strip() if strip else completion
    full = compiled.fullmatch(text) is not None
    meta: dict[str, Any] = {"pattern": pattern, "full_match": full,
                            "partial": full or compiled.search(text) is not None}
    if not full:
        meta["reason"] = "pattern does not match the whole completion"
    score = 1.0 if full else 0.0
    return RewardResult(score, {"full_match": score}, meta)


def verify_regex_row(completion: str, row: Mapping[str, Any]) -> RewardResult:
    """The ``regex`` verifier: ``row["pattern"]`` (optional ``ignore_case``)."""
    pattern = _require(row, "pattern", "regex", '"pattern": "\\\\d{3}-\\\\d{4}"')
    if not isinstance(pattern, str):
        raise UserError(problem("row.pattern", "the pattern must be a string",
                                "give the regular expression as a JSON string", value=pattern))
    return verify_regex(completion, pattern, flags=re.IGNORECASE if row.get("ignore_case") else 0)


def verify_exact(completion: str, answer: str, *, ignore_case: bool = False,
                 collapse_whitespace: bool = False) -> RewardResult:
    """1.0 when the completion equals ``answer`` after stripping surrounding whitespace."""
    def clean(text: str) -> str:
        text = re.sub(r"\s+", " ", text) if collapse_whitespace else text
        text = text.strip()
        return text.casefold() if ignore_case else text

    equal = clean(completion) == clean(answer)
    meta: dict[str, Any] = {"expected": answer}
    if not equal:
        meta["reason"] = "completion differs from the answer"
    score = 1.0 if equal else 0.0
    return RewardResult(score, {"exact": score}, meta)


def verify_exact_row(completion: str, row: Mapping[str, Any]) -> RewardResult:
    """The ``exact`` verifier: ``row["answer"]`` (optional ``ignore_case``, ``collapse_whitespace``)."""
    answer = _require(row, "answer", "exact", '"answer": "<expected text>"')
    return verify_exact(completion, str(answer), ignore_case=bool(row.get("ignore_case")),
                        collapse_whitespace=bool(row.get("collapse_whitespace")))


# --------------------------------------------------------------------------------------------
# Multiple choice
# --------------------------------------------------------------------------------------------

_CHOICE_MARKER_RE = re.compile(r"\banswer\b\s*(?:is\b|:)", re.IGNORECASE)
# Applied to a short window after the marker (never to the whole text: no quadratic backtracking).
_CHOICE_AFTER_RE = re.compile(
    r"(?:\*\*)?\s*(?:(?:option|choice)\s+)?(?P<open>[(\[]?)(?P<letter>[A-Za-z])(?P<close>[)\]]?)(?P<after>.{0,2})",
    re.IGNORECASE | re.S,
)


def _choice_letter(text: str, letters: str) -> str | None:
    r"""A lone letter answer: ``B``, ``(b)``, ``\text{(B)}``, ``B.``; None otherwise."""
    text = re.sub(r"\\(?:text|textbf|mathrm)\s*\{([^{}]*)\}", r"\1", text.strip())
    m = re.fullmatch(r"[(\[]?\s*([A-Za-z])\s*[)\]]?[.:]?", text.strip().strip("$*").strip())
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    return None


def _marker_choice(text: str, letters: str) -> str | None:
    """The letter after the last "answer is"/"Answer:" marker that really names a choice."""
    for marker in reversed(list(_CHOICE_MARKER_RE.finditer(text))):
        m = _CHOICE_AFTER_RE.match(text[marker.end() : marker.end() + 80].lstrip())
        if m is None or m.group("letter").upper() not in letters:
            continue
        letter, after = m.group("letter"), m.group("after")
        bracketed = bool(m.group("open") and m.group("close"))
        if after[:1].isalpha():
            continue  # "the answer is Bob"
        if letter.islower() and not bracketed and after[:1] == " " and after[1:2].isalpha():
            continue  # "the answer is a prime": an article, not option (a)
        return letter.upper()
    return None


def extract_choice(text: str, *, letters: str = "ABCDE", strict: bool = False) -> tuple[str | None, str | None]:
    r"""(letter, rule): the last ``\boxed{}`` letter ("boxed"), the last "answer is X" marker
    ("marker"), a completion that is only a letter ("whole"), a leading "B) ..." ("leading"),
    and unless ``strict`` the last parenthesised capital letter "(C)" ("last_paren")."""
    boxed = last_boxed(text)
    if boxed is not None and _choice_letter(boxed, letters):
        return _choice_letter(boxed, letters), "boxed"
    marked = _marker_choice(text, letters)
    if marked:
        return marked, "marker"
    whole = _choice_letter(text, letters)
    if whole:
        return whole, "whole"
    leading = re.match(r"\s*\(?([A-Z])[).:]\s", text)
    if leading and leading.group(1) in letters:
        return leading.group(1), "leading"
    if not strict:
        parens = [c for c in re.findall(r"\(([A-Z])\)", text) if c in letters]
        if parens:
            return parens[-1], "last_paren"
    return None, None


def verify_choice(completion: str, answer: str, *, letters: str = "ABCDE", strict: bool = False) -> RewardResult:
    """1.0 when the completion's chosen letter equals ``answer`` ("B", "(B)", "b")."""
    gold = _choice_letter(str(answer), letters)
    if gold is None:
        raise UserError(problem("answer", f"not a choice letter among {letters}",
                                'give the correct option as a letter, e.g. "answer": "B"', value=answer))
    chosen, rule = extract_choice(completion, letters=letters, strict=strict)
    meta: dict[str, Any] = {"extracted": chosen, "extract_rule": rule, "gold": gold}
    if chosen is None:
        meta["reason"] = "no choice letter found"
    elif chosen != gold:
        meta["reason"] = "wrong choice"
    score = 1.0 if chosen == gold else 0.0
    return RewardResult(score, {"correct": score}, meta)


def verify_choice_row(completion: str, row: Mapping[str, Any]) -> RewardResult:
    """The ``choice`` verifier: ``row["answer"]`` is the letter (optional ``letters``, ``strict``)."""
    answer = _require(row, "answer", "choice", '"answer": "B"')
    return verify_choice(completion, str(answer), letters=str(row.get("letters", "ABCDE")),
                         strict=bool(row.get("strict", False)))


# --------------------------------------------------------------------------------------------
# Format reward
# --------------------------------------------------------------------------------------------


def verify_format(completion: str, *, tags: Sequence[str] = ("think", "answer"),
                  partial: bool = False) -> RewardResult:
    """Reward the ``<think>...</think><answer>...</answer>`` shape (any tags, in the given order).

    components (each 0/1): one named after each tag, exactly one ``<tag>...</tag>`` block; ``order``, all
    blocks present in the given order without overlapping; ``only_tags``, nothing but whitespace
    outside the blocks. score: 1.0 when every component is 1, else 0.0; with ``partial`` the mean
    of the components (partial credit, as in the "xml count" rewards some R1 reproductions use).
    """
    if not tags:
        raise UserError(problem("tags", "the format reward needs at least one tag",
                                'e.g. tags: ["think", "answer"]'))
    spans: list[tuple[int, int]] = []
    components: dict[str, float] = {}
    for tag in tags:
        # Count first: a search for "<tag>...</tag>" per unclosed "<tag>" would be quadratic.
        start, end = completion.find(f"<{tag}>"), completion.find(f"</{tag}>")
        single = (completion.count(f"<{tag}>") == 1 and completion.count(f"</{tag}>") == 1
                  and start < end)
        components[tag] = 1.0 if single else 0.0
        if single:
            spans.append((start, end + len(f"</{tag}>")))
    in_order = len(spans) == len(tags) and all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    components["order"] = 1.0 if in_order else 0.0
    outside = "".join(completion[a:b] for a, b in _gaps(spans, len(completion))) if in_order else "x"
    components["only_tags"] = 1.0 if in_order and not outside.strip() else 0.0
    full = all(v == 1.0 for v in components.values())
    score = 1.0 if full else (sum(components.values()) / len(components) if partial else 0.0)
    meta: dict[str, Any] = {"tags": list(tags)}
    if not full:
        meta["reason"] = "missing, repeated or misordered tags, or text outside them"
    return RewardResult(score, components, meta)


def _gaps(spans: list[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    edges = [0] + [x for span in spans for x in span] + [length]
    return list(zip(edges[::2], edges[1::2]))


def verify_format_row(completion: str, row: Mapping[str, Any]) -> RewardResult:
    """The ``format`` verifier; optional ``tags`` (default think, answer) and ``partial``."""
    tags = row.get("tags", ("think", "answer"))
    if isinstance(tags, str) or not all(isinstance(t, str) and t for t in tags):
        raise UserError(problem("row.tags", "tags must be a list of tag names",
                                'e.g. "tags": ["think", "answer"]', value=tags))
    return verify_format(completion, tags=tuple(tags), partial=bool(row.get("partial", False)))


# --------------------------------------------------------------------------------------------
# Length penalties
# --------------------------------------------------------------------------------------------


def length_penalty(length: int, *, target: int, scale: int | None = None) -> RewardResult:
    """0 up to ``target``, then ``-(length - target) / scale`` (scale defaults to target), never
    below -1. A plain linear brake on verbosity, added to a task reward."""
    if target <= 0 or (scale is not None and scale <= 0) or length < 0:
        raise UserError(problem("length_penalty", "target and scale must be positive, length >= 0",
                                "set target_length (and length_scale) to positive integers",
                                value={"length": length, "target": target, "scale": scale}))
    over = max(0, length - target)
    value = -min(1.0, over / (scale or target))
    return RewardResult(value, {"length_penalty": value}, {"length": length, "target": target})


def overlong_penalty(length: int, *, max_length: int, cache_length: int) -> RewardResult:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, eq. 13).

    With L_max = ``max_length`` and L_cache = ``cache_length``::

        R = 0                                  if length <= L_max - L_cache
            ((L_max - L_cache) - length) / L_cache   if L_max - L_cache < length <= L_max
            -1                                 if length > L_max

    so the penalty falls linearly from 0 to -1 across the last L_cache tokens. It is added to
    the task reward. As in the paper ``length`` counts response tokens.
    """
    if not 0 < cache_length <= max_length or length < 0:
        raise UserError(problem("overlong_penalty", "need 0 < cache_length <= max_length and length >= 0",
                                "set max_length and cache_length (e.g. 20480 and 4096, as in DAPO)",
                                value={"length": length, "max_length": max_length,
                                       "cache_length": cache_length}))
    expected = max_length - cache_length
    if length <= expected:
        value = 0.0
    elif length <= max_length:
        value = (expected - length) / cache_length
    else:
        value = -1.0
    meta = {"length": length, "max_length": max_length, "cache_length": cache_length}
    return RewardResult(value, {"overlong_penalty": value}, meta)


def _row_length(completion: str, row: Mapping[str, Any]) -> tuple[int, str]:
    """The completion's length: ``row["num_tokens"]`` when the caller knows it, else characters."""
    if row.get("num_tokens") is not None:
        return int(row["num_tokens"]), "tokens"
    return len(completion), "chars"


def length_penalty_row(completion: str, row: Mapping[str, Any]) -> RewardResult:
    """The ``length`` verifier: ``target_length`` (optional ``length_scale``, ``num_tokens``)."""
    target = _require(row, "target_length", "length", '"target_length": 512')
    length, unit = _row_length(completion, row)
    scale = row.get("length_scale")
    result = length_penalty(length, target=int(target), scale=None if scale is None else int(scale))
    result.meta["unit"] = unit
    return result


def overlong_penalty_row(completion: str, row: Mapping[str, Any]) -> RewardResult:
    """The ``overlong`` verifier: ``max_length`` and ``cache_length`` (optional ``num_tokens``)."""
    max_length = _require(row, "max_length", "overlong", '"max_length": 20480')
    cache_length = _require(row, "cache_length", "overlong", '"cache_length": 4096')
    length, unit = _row_length(completion, row)
    result = overlong_penalty(length, max_length=int(max_length), cache_length=int(cache_length))
    result.meta["unit"] = unit
    return result


def _require(row: Mapping[str, Any], field: str, kind: str, example: str) -> Any:
    """``row[field]``, or a UserError naming the field and how to add it."""
    if field not in row:
        raise UserError(problem(
            f"row.{field}", f"the {kind} verifier needs field {field!r} in each row",
            f"add {example} to the row",
        ))
    return row[field]
