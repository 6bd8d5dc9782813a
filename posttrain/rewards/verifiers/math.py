r"""Math answer verifier: extract the final answer, normalise it, decide equivalence.

Used as an RL reward and as the math eval (one code path, STYLE 8). Three steps, each a small
pure function:

1. Extraction (`extract_answer`): the last ``\boxed{...}`` / ``\fbox{...}`` (nested braces
   matched); else the last answer marker ("the final answer is", "the answer is", "Answer:",
   "####"); else, unless ``strict``, whichever comes last of the last math span (``$...$``,
   ``\(...\)``; currency-looking spans skipped) and the last number. Nothing found = a parse
   failure: score 0.0 with ``meta["reason"]``, never a payout.
2. Normalisation (`normalize_answer`): math delimiters, ``\left``/``\right``, spacing commands,
   ``\dfrac``/``\tfrac``, ``\frac12``, ``\sqrt2``, units and ``\text{...}``, ``\$``, degrees,
   percent signs, thousands separators, ``x = 5`` -> ``5``, ``(B)`` -> ``B``.
3. Equivalence (`answers_equal`), first hit wins and is reported in ``meta["match"]``:
   ``string``    the normalised strings are equal (whitespace, ``x^{2}``/``x^2``, ``2.50``/``2.5``);
   ``numeric``   both are plain numbers (``0.75``, ``3/4``, ``\frac{3}{4}``) and equal as fractions;
   ``symbolic``  our LaTeX -> sympy converter parses both and ``simplify(a - b) == 0`` (a cheap
                 numeric evaluation first rejects clearly different values without simplify);
   ``tolerance`` both evaluate to numbers (or agree at fixed sample points for expressions with
                 variables) within ``rel_tol`` (default 1e-6, relative; an absolute floor of 1e-12
                 near zero). Two integers are never "close": ``1000000 != 1000001``.
   Answers with parts are compared part by part: tuples and intervals in order with the same
   brackets; sets ``\{...\}``, bare comma lists and ``a \pm b`` as unordered collections;
   ``\cup`` unions interval by interval; matrices entry by entry (a one-column matrix equals the
   tuple of its entries); equations ``lhs = rhs`` when ``lhs - rhs`` agree up to a constant factor.

Policies worth knowing:

- Percent: the sign is a unit and is dropped, so ``50\%`` == ``50``. When exactly one side
  carried a percent sign its value / 100 is also accepted (``50\%`` == ``0.5``), since "what
  percent" questions are answered both ways; without a sign ``50`` != ``0.5``.
- Units: trailing ``\text{...}``/``\mbox{...}`` and trailing plain words after a number are
  dropped (``5.4 \text{ cents}``, ``12 dollars``, ``30^\circ``); ``\text{east}`` alone is a word
  answer, compared case-insensitively and never symbolically.
- Mixed numbers: an integer followed by ``\frac{p}{q}`` of integers is their sum
  (``1\frac{4}{5}`` = 9/5), as in MATH answers.
- ``i`` is the imaginary unit and ``e`` Euler's number; other letters are plain symbols.
- Plain-text math works too: ``sqrt(2)``, ``2pi``, ``x**2``.
- Base subscripts (``204_5``) are compared as strings only.

Hard timeout (sympy can hang). The symbolic step runs through `_run_bounded`:

- in the main thread, with no interval timer already running, under ``signal.setitimer``
  (SIGALRM): cheap, no extra process; the previous handler is restored afterwards;
- elsewhere (worker threads, a caller's own alarm in use, no SIGALRM on the platform) in a
  fresh worker process (``fork`` where available, else ``spawn``) that is killed at the timeout.

A signal cannot interrupt one long C-level operation (``9**(9**(9**9))`` is a single bignum
power), so the converter also refuses to build any number of more than `MAX_DIGITS` digits
(powers, factorials, binomials) and reports "too large" instead.
"""

from __future__ import annotations

import math
import multiprocessing
import re
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from posttrain.errors import UserError, problem
from posttrain.types import RewardResult

DEFAULT_TIMEOUT_S = 3.0
DEFAULT_REL_TOL = 1e-6
ABS_TOL = 1e-12  # near zero a relative tolerance means nothing
MAX_DIGITS = 10_000  # refuse to build numbers bigger than this (C-level bignum ops ignore signals)

_MATCH_STRENGTH = ("string", "numeric", "symbolic", "tolerance")


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
_MARKER_RE = re.compile(r"\banswer\b\s*(?:is\b|:)|####", re.IGNORECASE)
_NUMBER_RE = re.compile(
    r"-?\\[dt]?frac\{\d+\}\{\d+\}"
    r"|(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?"
    r"|(?<![\w.])-?\.\d+"
)
_HOPE_RE = re.compile(r"I hope it is correct\.?\s*$", re.IGNORECASE)


def match_brace(text: str, open_index: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_index``; escaped braces are skipped."""
    depth = 0
    i = open_index
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    r"""Content of the last top-level ``\boxed{...}`` / ``\fbox{...}`` (or ``\boxed 5``).

    A truncated (unbalanced) box is skipped, so an earlier complete one still counts; a box
    nested in another is part of the outer one's content. One pass over the text (a stack of
    open braces), so a long run of unclosed boxes costs linear time, not quadratic.
    """
    boxes = _box_spans(text)
    best: tuple[int, int, int] | None = None
    for box in sorted(boxes):
        if best is None or box[0] >= best[2]:  # not inside the previous top-level box
            best = box
    return None if best is None else text[best[1] : best[2]]


def _box_spans(text: str) -> list[tuple[int, int, int]]:
    """(command start, content start, content end) of every complete box."""
    braced: dict[int, int] = {}  # index of a box's "{" -> index of its command
    spans: list[tuple[int, int, int]] = []
    for m in _BOXED_RE.finditer(text):
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            braced[i] = m.start()
            continue
        bare = re.match(r"[^\s$]+", text[i : i + 200]) if i > m.end() else None  # "\boxed 5"
        if bare:
            spans.append((m.start(), i, i + len(bare.group(0).rstrip(".,"))))
    stack: list[int] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            stack.append(i)
        elif char == "}" and stack:
            opened = stack.pop()
            if opened in braced:
                spans.append((braced[opened], opened + 1, i))
        i += 1
    return spans


def _after_marker(text: str) -> str | None:
    """The answer written after the last marker that is followed by something."""
    for m in reversed(list(_MARKER_RE.finditer(text))):
        candidate = _marker_span(text[m.end() : m.end() + 2000])  # bounded: many markers stay linear
        if candidate:
            return candidate
    return None


def _marker_span(rest: str) -> str:
    rest = rest.lstrip(" \t:*_")
    if rest.startswith("\n"):  # "Answer:\n42"
        rest = rest.lstrip()
    line = _HOPE_RE.sub("", rest.split("\n", 1)[0]).rstrip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if line.startswith(left):
            end = line.find(right, len(left))
            if end >= 0:
                return line[len(left) : end].strip()
            line = line[len(left) :]  # "$26. I hope..." : a price, not an opened math span
            break
    sentence_end = re.search(r"\.(?:\s|$)", line)  # a full stop, not a decimal point
    if sentence_end:
        line = line[: sentence_end.start()]
    return line.strip().rstrip(".,;*_ ").strip()


_MATH_SPAN_RE = re.compile(
    r"\$\$(.+?)\$\$|\\\[(.+?)\\\]|\\\((.+?)\\\)|(?<!\\)\$([^$\n]+?)(?<!\\)\$", re.S
)


def _last_math_span(text: str) -> tuple[str, int] | None:
    """The last ``$...$`` / ``$$...$$`` / ``\\(...\\)`` / ``\\[...\\]`` that looks like an answer,
    with its end offset.

    Currency is not math: a single-dollar span that starts or ends with a space or an operator
    ("$204 + $160") or holds an English word ("$5 and $3") is skipped.
    """
    for m in reversed(list(_MATH_SPAN_RE.finditer(text))):
        span = next(g for g in m.groups() if g is not None)
        bare = _TEXT_WRAP_RE.sub("", span)
        if not span.strip() or re.search(r"(?<![\\A-Za-z])[A-Za-z]{3,}", bare):
            continue
        if m.group(4) is not None and (span != span.strip() or span[-1] in "+-*/=,"):
            continue
        return span.strip(), m.end()
    return None


def _last_number(text: str) -> tuple[str, int] | None:
    matches = list(_NUMBER_RE.finditer(text))
    return (matches[-1].group(0), matches[-1].start()) if matches else None


def _fallback(text: str) -> tuple[str | None, str | None]:
    """Whichever comes last: the last math span or the last number."""
    span, number = _last_math_span(text), _last_number(text)
    if span is not None and (number is None or number[1] < span[1]):
        return span[0], "math_span"
    if number is not None:
        return number[0], "last_number"
    return None, None


def extract_answer(text: str, *, strict: bool = False) -> tuple[str | None, str | None]:
    """(answer, rule) from a completion; rule is "boxed", "marker", "math_span" or "last_number".

    ``strict`` turns the two fallbacks off (the last math span, then the last number): only an
    explicit box or answer marker counts.
    """
    boxed = last_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip(), "boxed"
    marked = _after_marker(text)
    if marked:
        return marked, "marker"
    if not strict:
        return _fallback(text)
    return None, None


def extract_gold_answer(solution: str) -> str | None:
    r"""The reference answer of a GSM8K solution (after ``####``) or a MATH solution (last box)."""
    if "####" in solution:
        tail = solution.rsplit("####", 1)[1].strip()
        return tail.replace(",", "") or None
    boxed = last_boxed(solution)
    return boxed.strip() if boxed and boxed.strip() else None


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------

_SPACING_RE = re.compile(
    r"\\left\.|\\right\.|\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big|displaystyle|textstyle)(?![a-zA-Z])"
    r"|\\[!,;:>]|(?<!\\)\\ |\\q?quad(?![a-zA-Z])|~"
)
_DEGREE_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ(?![a-zA-Z])|°|\\degree(?![a-zA-Z])")
_TEXT_CMDS = r"(?:text|textrm|textbf|textit|textnormal|mbox|mathrm|mathbf|mathit|boldsymbol)"
_TRAILING_TEXT_RE = re.compile(  # a unit: "\text{ cm}^2" (not "\mathbf{v}", which is math)
    r"\\(?:text|textrm|textnormal|mbox|mathrm)\s*\{\s*[A-Za-z][A-Za-z .]*\}(?:\s*\^\s*\{?[23]\}?)?\s*$"
)
_TEXT_WRAP_RE = re.compile(r"\\" + _TEXT_CMDS + r"\s*\{([^{}]*)\}")
_TRAILING_WORDS_RE = re.compile(r"(?<=[\d}).])\s+[A-Za-z]{2,}\.?(?:\s+[A-Za-z]{2,}\.?)*(?:\^[23])?$")
_ASSIGNMENT_RE = re.compile(
    r"^\s*(?:[A-Za-z]|\\(?:alpha|beta|gamma|theta|phi|lambda|mu|omega|rho|sigma|tau))"
    r"(?:_\{?\w+\}?)?\s*(?:=|\\in(?![a-zA-Z]))\s*(.+)$"
)
_THOUSANDS_RE = re.compile(r"(?<![\d.])\d{1,3}(?:,\d{3})+(?![\d])")
_CHOICE_RE = re.compile(r"^\(([A-Z])\)$")


@dataclass(frozen=True)
class NormalizedAnswer:
    """A normalised answer: ``text`` is LaTeX with spacing collapsed; ``percent`` if it had ``%``."""

    text: str
    percent: bool = False


def normalize_answer(answer: str) -> str:
    """The normalised text of an answer (see the module docstring for what is normalised)."""
    return _normalize(answer).text


def _normalize(raw: str) -> NormalizedAnswer:
    # JSON-escaped LaTeX (two backslashes before "frac") from a model that wrote its answer in a string
    text = re.sub(r"\\(\\(?:[dt]?frac|sqrt|pi|infty|text|mbox|cdot|times|circ|pm)(?![a-zA-Z]))", r"\1", raw.strip())
    text = _unwrap_boxes(text)
    text = _strip_delimiters(text)
    text = text.replace("{,}", ",")  # 10{,}000
    text = re.sub(r",\s*\\!\s*", ",", text)  # 10,\!080 and 11,\! 111 are thousands separators
    text = re.sub(r"(\d)\\,(\d{3})(?!\d)", r"\1\2", text)  # 1\,000 likewise
    text = _SPACING_RE.sub(" ", text)
    text = re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", text)
    text = re.sub(r"\\[dt]binom(?![a-zA-Z])", r"\\binom", text)
    text = text.replace("\\lvert", "|").replace("\\rvert", "|").replace("\\vert", "|")
    text = _DEGREE_RE.sub("", text)
    text, percent = _strip_percent(text)
    text = text.replace("\\$", "").replace("$", "")
    text = _strip_units(text)
    text = _strip_assignment(text)
    if not re.search(r"[(\[]|\\\{", text):  # "(12,102)" is a pair, not twelve thousand
        text = _THOUSANDS_RE.sub(lambda m: m.group(0).replace(",", ""), text)
    text = _complete_short_arguments(text)
    text = re.sub(r"\s+", " ", text).strip().rstrip(".").strip()
    text = re.sub(r"^(-?\d+) (\d+)/(\d+)$", r"\1\\frac{\2}{\3}", text)  # plain-text mixed number "137 1/2"
    choice = _CHOICE_RE.match(text)
    return NormalizedAnswer(choice.group(1) if choice else text, percent)


def _unwrap_boxes(text: str) -> str:
    while True:
        m = re.fullmatch(r"\\(?:boxed|fbox)\s*\{(.*)\}", text, re.S)
        if m is None or match_brace(text, text.index("{")) != len(text) - 1:
            return text
        text = m.group(1).strip()


def _strip_delimiters(text: str) -> str:
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if text.startswith(left) and text.endswith(right) and len(text) >= len(left) + len(right):
            return text[len(left) : len(text) - len(right)].strip()
    return text


def _strip_percent(text: str) -> tuple[str, bool]:
    stripped = re.sub(r"\\?%|\s*\bpercent\b", "", text)
    return stripped, stripped != text


def _strip_units(text: str) -> str:
    """Drop trailing units; then unwrap any remaining ``\\text{...}`` to its content."""
    text = re.sub(r"\\text\s*\{\s*(?:or|and)\s*\}", ",", text)
    while True:
        unit = _TRAILING_TEXT_RE.search(text)
        head = text[: unit.start()].rstrip() if unit else ""
        if not head or head[-1] in "=+-*/,(<>:":  # "x = \text{east}" is a word answer, not a unit
            break
        text = head
    while True:
        unwrapped = _TEXT_WRAP_RE.sub(r"\1", text)
        if unwrapped == text:
            break
        text = unwrapped
    text = _TRAILING_WORDS_RE.sub("", text.strip())
    return text.strip()


def _strip_assignment(text: str) -> str:
    m = _ASSIGNMENT_RE.match(text)
    if m and "=" not in m.group(1):
        return m.group(1)
    return text


def _complete_short_arguments(text: str) -> str:
    r"""``\frac12`` -> ``\frac{1}{2}``, ``\frac 34``, ``\frac9{19}``, ``\sqrt2`` -> ``\sqrt{2}``."""
    text = re.sub(r"\\frac\s*([\w])\s*([\w])", r"\\frac{\1}{\2}", text)
    text = re.sub(r"\\frac\s*([\w])\s*\{", r"\\frac{\1}{", text)
    text = re.sub(r"\\frac\s*\{([^{}]*)\}\s*([\w])", r"\\frac{\1}{\2}", text)
    return re.sub(r"\\sqrt\s*([\w])", r"\\sqrt{\1}", text)


def _key(text: str) -> str:
    """Whitespace-free comparison key: ``x^{2}`` = ``x^2``, ``2.50`` = ``2.5``, ``.5`` = ``0.5``."""
    key = re.sub(r"\s+", "", text)
    key = re.sub(r"([\^_])\{(\w)\}", r"\1\2", key)
    # lookbehinds make each regex start only at a digit run's start: linear, not quadratic
    key = re.sub(r"(?<!\d)\d+\.\d+", lambda m: m.group(0).rstrip("0").rstrip("."), key)
    key = re.sub(r"(?<!\d)(\d+)\.(?!\d)", r"\1", key)
    key = re.sub(r"(?<![\d}])\.(\d)", r"0.\1", key)
    if _is_words(key.replace("-", " ")):
        key = key.casefold()
    return key


def _is_words(text: str) -> bool:
    """A word answer ("east", "Evelyn"): letters and spaces only, some run of 2+ letters."""
    return bool(re.fullmatch(r"[A-Za-z][A-Za-z' ]*", text)) and bool(re.search(r"[A-Za-z]{2}", text))


# --------------------------------------------------------------------------------------------
# Answer structure: scalars, tuples/intervals, unordered collections, unions, matrices, equations
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shape:
    """An answer split into parts. kind: scalar | ordered | unordered | union | matrix | equation."""

    kind: str
    parts: tuple[Any, ...] = ()
    brackets: str = ""  # "(]" etc. for ordered


def _split_top(text: str, separator: str) -> list[str]:
    """Split at ``separator`` outside any (), [], {} (intervals' mismatched brackets are fine)."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        char = text[i]
        if depth == 0 and text.startswith(separator, i):
            parts.append(text[start:i])
            i += len(separator)
            start = i
            continue
        if char == "\\":
            if text[i + 1 : i + 2] in ("{", "}"):
                depth += 1 if text[i + 1] == "{" else -1
            i += 2
            continue
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        i += 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def _encloses(text: str) -> bool:
    """The first bracket of ``text`` closes at its last character."""
    depth = 0
    for i, char in enumerate(text):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
            if depth == 0:
                return i == len(text) - 1
    return False


def _shape(text: str) -> _Shape:
    matrix = re.fullmatch(r"\\begin\{([pbvBV]?matrix|array)\}(?:\{[lcr|]*\})?(.*)\\end\{\1\}", text, re.S)
    if matrix:
        rows = [r for r in re.split(r"\\\\", matrix.group(2)) if r.strip()]
        return _Shape("matrix", tuple(tuple(c.strip() for c in r.split("&")) for r in rows))
    union = _split_top(text, "\\cup")
    if len(union) > 1:
        return _Shape("union", tuple(_shape(part) for part in union))
    if text.startswith("\\{") and text.endswith("\\}"):
        return _Shape("unordered", _expand_pm(_split_top(text[2:-2], ",")))
    if len(text) >= 2 and text[0] in "([" and text[-1] in ")]" and _encloses(text):
        items = _split_top(text[1:-1], ",")
        if len(items) > 1:
            return _Shape("ordered", tuple(items), text[0] + text[-1])
    items = _split_top(re.sub(r"\s+(?:or|and)\s+", ",", text), ",")
    if len(items) > 1 or "\\pm" in text:
        return _Shape("unordered", _expand_pm(items))
    sides = _split_top(text, "=")
    if len(sides) == 2 and all(sides):
        return _Shape("equation", tuple(sides))
    return _Shape("scalar", (text,))


def _expand_pm(items: list[str]) -> tuple[str, ...]:
    out: list[str] = []
    for item in items:
        if "\\pm" in item:
            out.append(item.replace("\\pm", "+", 1))
            out.append(item.replace("\\pm", "-", 1))
        elif item:
            out.append(item)
    return tuple(out)


ScalarCompare = Callable[[str, str], "str | None"]


def _shapes_equal(gold: _Shape, pred: _Shape, same: ScalarCompare) -> str | None:
    """The weakest match rule over all parts, or None when some part differs."""
    if {gold.kind, pred.kind} == {"matrix", "ordered"}:
        gold, pred = _as_vector(gold), _as_vector(pred)
    if gold.kind == "unordered" and pred.kind == "scalar":
        pred = _Shape("unordered", pred.parts)
    if pred.kind == "unordered" and gold.kind == "scalar":
        gold = _Shape("unordered", gold.parts)
    if gold.kind != pred.kind or gold.brackets != pred.brackets or len(gold.parts) != len(pred.parts):
        return None
    if gold.kind == "equation":
        return None  # equations need sympy; decided in `_symbolic_pass`
    if gold.kind == "unordered":
        return _unordered_equal(list(gold.parts), list(pred.parts), same)
    rules: list[str] = []
    for g, p in zip(gold.parts, pred.parts):
        if gold.kind in ("union",):
            rule = _shapes_equal(g, p, same)
        elif gold.kind == "matrix":
            rule = _shapes_equal(_Shape("ordered", g, "()"), _Shape("ordered", p, "()"), same)
        else:
            rule = same(g, p)
        if rule is None:
            return None
        rules.append(rule)
    return _weakest(rules)


def _as_vector(shape: _Shape) -> _Shape:
    """A one-column or one-row matrix as the tuple of its entries."""
    if shape.kind != "matrix":
        return shape if shape.brackets == "()" else _Shape("mismatch")
    rows = shape.parts
    if all(len(r) == 1 for r in rows):
        return _Shape("ordered", tuple(r[0] for r in rows), "()")
    if len(rows) == 1:
        return _Shape("ordered", tuple(rows[0]), "()")
    return shape


def _unordered_equal(gold: list[str], pred: list[str], same: ScalarCompare) -> str | None:
    rules: list[str] = []
    remaining = list(pred)
    for g in gold:
        for index, p in enumerate(remaining):
            rule = same(g, p)
            if rule is not None:
                rules.append(rule)
                del remaining[index]
                break
        else:
            return None
    return _weakest(rules)


def _weakest(rules: list[str]) -> str:
    return max(rules, key=_MATCH_STRENGTH.index) if rules else "string"


def _scalars(shape: _Shape) -> list[str]:
    if shape.kind in ("union",):
        return [s for part in shape.parts for s in _scalars(part)]
    if shape.kind == "matrix":
        return [cell for row in shape.parts for cell in row]
    return list(shape.parts)


# --------------------------------------------------------------------------------------------
# Cheap comparison (no sympy): string keys and plain numbers
# --------------------------------------------------------------------------------------------

_PLAIN_NUMBER_RE = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")


def plain_number(text: str) -> Fraction | None:
    r"""``text`` as an exact fraction when it is a plain number: ``-2.5``, ``3/4``, ``\frac{3}{4}``."""
    text = text.replace(" ", "")
    if len(text) > 1000:  # int() refuses over 4300 digits; no real answer is this long
        return None
    if _PLAIN_NUMBER_RE.fullmatch(text):
        return Fraction(text)
    m = re.fullmatch(r"(-?)(?:(\d+)/(\d+)|\\frac\{(\d+)\}\{(\d+)\})", text)
    if m is None:
        return None
    numerator, denominator = (m.group(2), m.group(3)) if m.group(2) else (m.group(4), m.group(5))
    if int(denominator) == 0:
        return None
    value = Fraction(int(numerator), int(denominator))
    return -value if m.group(1) else value


def _close(a: complex, b: complex, rel_tol: float) -> bool:
    return abs(a - b) <= max(rel_tol * max(abs(a), abs(b)), ABS_TOL)


def _cheap_scalar_equal(gold: str, pred: str, rel_tol: float) -> str | None:
    if _key(gold) == _key(pred):
        return "string"
    g, p = plain_number(gold), plain_number(pred)
    if g is None or p is None:
        return None
    if g == p:
        return "numeric"
    both_integers = g.denominator == 1 and p.denominator == 1
    # exact arithmetic: a float could overflow on a long numeral
    if not both_integers and abs(g - p) <= max(Fraction(rel_tol) * max(abs(g), abs(p)), Fraction(ABS_TOL)):
        return "tolerance"
    return None


# --------------------------------------------------------------------------------------------
# LaTeX -> sympy: a small recursive-descent parser (no antlr, no sympy.parsing.latex)
# --------------------------------------------------------------------------------------------


class LatexParseError(ValueError):
    """The text is not math this converter understands."""


class TooLargeError(ValueError):
    """The expression would build a number with more than MAX_DIGITS digits."""


_TOKEN_RE = re.compile(r"\s*(?:(\d+\.?\d*|\.\d+)|(\\[a-zA-Z]+|\\.)|(\S))")
_FUNCTIONS = {
    "sin": "sin", "cos": "cos", "tan": "tan", "cot": "cot", "sec": "sec", "csc": "csc",
    "arcsin": "asin", "arccos": "acos", "arctan": "atan", "sinh": "sinh", "cosh": "cosh",
    "tanh": "tanh", "ln": "log", "log": "log", "exp": "exp",
}
_INVERSE = {"sin": "asin", "cos": "acos", "tan": "atan"}
_GREEK = {
    "alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta", "vartheta",
    "iota", "kappa", "lambda", "mu", "nu", "xi", "rho", "sigma", "tau", "upsilon", "phi", "varphi",
    "chi", "psi", "omega", "Gamma", "Delta", "Theta", "Lambda", "Xi", "Sigma", "Phi", "Psi", "Omega",
}
_BARE_FUNCTIONS = ("arcsin", "arccos", "arctan", "sqrt", "sinh", "cosh", "tanh", "sin", "cos", "tan",
                   "cot", "sec", "csc", "log", "ln", "exp", "pi")
_ATOM_COMMANDS = {"\\frac", "\\cfrac", "\\sqrt", "\\pi", "\\infty", "\\binom", "\\lfloor", "\\lceil"}


def _sympy() -> Any:
    import sympy  # imported on first use: it costs ~0.3 s and most answers never need it

    return sympy


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens = []
    position = 0
    text = text.strip().replace("**", "^")  # Python-style powers
    while position < len(text):
        m = _TOKEN_RE.match(text, position)
        if m is None:
            break
        kind = "num" if m.group(1) else "cmd" if m.group(2) else "char"
        tokens.append((kind, m.group(m.lastindex or 0)))
        position = m.end()
    return tokens


def _magnitude_digits(value: Any) -> float:
    """About how many decimal digits ``value`` needs (its size or its precision)."""
    sp = _sympy()
    if isinstance(value, sp.Rational):  # integers included; 1 and -1 need no digits at all
        return max(int(value.p).bit_length(), int(value.q).bit_length(), 1) * 0.30103 - 0.30103
    try:
        size = abs(complex(value.evalf(15)))
    except (TypeError, ValueError, OverflowError):
        return math.inf
    if size == 0 or math.isnan(size):
        return 0.0
    return abs(math.log10(size)) if math.isfinite(size) else math.inf


def _safe_pow(base: Any, exponent: Any) -> Any:
    """``base ** exponent``, refusing results of more than MAX_DIGITS digits before building them."""
    sp = _sympy()
    if exponent.is_number and base.is_finite is not False:
        try:
            power = abs(complex(exponent.evalf(15)))
        except (TypeError, ValueError, OverflowError):
            power = math.inf
        # A non-finite exponent is symbolic (oo, zoo): sympy handles it without bignum work.
        if math.isfinite(power):
            if base.is_number and _magnitude_digits(base) * power > MAX_DIGITS:
                raise TooLargeError("power too large to evaluate")
            if not base.is_number and power > MAX_DIGITS:
                raise TooLargeError("symbolic power with a huge exponent")
    return sp.Pow(base, exponent)


def _safe_integer_arg(value: Any, what: str) -> None:
    if value.is_Integer and abs(int(value)) > 5000:
        raise TooLargeError(f"{what} too large to evaluate")


class _LatexParser:
    """Grammar: expr = term (+|- term)*; term = unary ((*|/|implicit) unary)*;
    unary = -unary | power; power = postfix (^ arg)?; postfix = atom !*."""

    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text)
        self.index = 0
        self.abs_depth = 0
        self.sp = _sympy()

    def parse(self) -> Any:
        if not self.tokens:
            raise LatexParseError("empty")
        expr = self.expr()
        if self.index != len(self.tokens):
            raise LatexParseError(f"unexpected {self.peek()!r}")
        return expr

    def peek(self, offset: int = 0) -> str | None:
        i = self.index + offset
        return self.tokens[i][1] if i < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        if self.index >= len(self.tokens):
            raise LatexParseError("unexpected end")
        self.index += 1
        return self.tokens[self.index - 1]

    def expect(self, text: str) -> None:
        if self.take()[1] != text:
            raise LatexParseError(f"expected {text!r}")

    def expr(self) -> Any:
        left = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()[1]
            right = self.term()
            left = left + right if op == "+" else left - right
        return left

    def term(self, stop_at_function: bool = False) -> Any:
        left = self.unary()
        while True:
            token = self.peek()
            if token in ("*", "\\cdot", "\\times"):
                self.take()
                left = left * self.unary()
            elif token in ("/", "\\div"):
                self.take()
                left = left / self.unary()
            elif self.starts_atom(stop_at_function):
                left = left * self.power()
            else:
                return left

    def unary(self) -> Any:
        if self.peek() == "-":
            self.take()
            return -self.unary()
        if self.peek() == "+":
            self.take()
            return self.unary()
        return self.power()

    def power(self) -> Any:
        value = self.postfix()
        if self.peek() == "^":
            self.take()
            value = _safe_pow(value, self.argument())
            value = self.factorials(value)  # "x^{2}!"
        return value

    def postfix(self) -> Any:
        return self.factorials(self.atom())

    def factorials(self, value: Any) -> Any:
        while self.peek() == "!":
            self.take()
            _safe_integer_arg(value, "factorial")
            value = self.sp.factorial(value)
        return value

    def starts_atom(self, stop_at_function: bool = False) -> bool:
        if self.index >= len(self.tokens):
            return False
        kind, text = self.tokens[self.index]
        if kind == "num" or text in ("(", "{") or (kind == "char" and text.isalpha()):
            return True
        if text == "|":
            return self.abs_depth == 0
        if kind == "cmd":
            name = text[1:]
            if name in _FUNCTIONS:
                return not stop_at_function
            return text in _ATOM_COMMANDS or name in _GREEK
        return False

    def argument(self) -> Any:
        """A braced group or one token: ``x^2``, ``\\frac12`` (one digit each), ``x^\\pi``."""
        token = self.peek()
        if token in ("{", "("):  # "x^(2)" and "sqrt(2)" as written in plain text
            return self.group(token, "}" if token == "{" else ")")
        if token == "-":
            self.take()
            return -self.argument()
        kind, text = self.take()
        if kind == "num":
            if len(text) > 1 and "." not in text:  # "\frac123" = \frac{1}{2}3: one digit each
                self.tokens.insert(self.index, ("num", text[1:]))
                text = text[0]
            return self.sp.Rational(text)
        self.index -= 1
        if kind == "char" and text.isalpha():
            return self.letter()
        if kind == "cmd":
            return self.command()
        raise LatexParseError(f"unexpected {text!r}")

    def group(self, left: str, right: str) -> Any:
        self.expect(left)
        saved, self.abs_depth = self.abs_depth, 0
        value = self.expr()
        self.abs_depth = saved
        self.expect(right)
        return value

    def raw_argument(self) -> str:
        if self.peek() != "{":
            return self.take()[1]
        self.take()
        parts, depth = [], 1
        while True:
            text = self.take()[1]
            depth += {"{": 1, "}": -1}.get(text, 0)
            if depth == 0:
                return "".join(parts)
            parts.append(text)

    def number(self) -> Any:
        text = self.take()[1]
        if len(text) > 1000:
            raise TooLargeError("numeral too long")
        value = self.sp.Rational(text)
        if self.peek() == "_":
            raise LatexParseError("number with a base subscript")
        if "." not in text and self.peek() in ("\\frac", "\\cfrac"):
            start = self.index
            fraction = self.atom()
            if fraction.is_Rational and _plain_fraction(self.tokens[start:self.index]):
                return value + fraction  # mixed number: 1\frac{4}{5} = 9/5
            return value * fraction
        return value

    def atom(self) -> Any:
        kind, text = self.tokens[self.index] if self.index < len(self.tokens) else ("", "")
        if kind == "num":
            return self.number()
        if kind == "char" and text.isalpha():
            return self.letter()
        if text in ("(", "[", "{"):
            return self.group(text, {"(": ")", "[": "]", "{": "}"}[text])
        if text == "|":
            self.take()
            self.abs_depth += 1
            value = self.expr()
            self.abs_depth -= 1
            self.expect("|")
            return self.sp.Abs(value)
        if kind == "cmd":
            return self.command()
        raise LatexParseError(f"unexpected {text!r}")

    def letter(self) -> Any:
        word = self.word_ahead()
        for name in _BARE_FUNCTIONS:  # "sqrt(2)", "2pi", "sin x" written without backslashes
            if word.startswith(name):
                self.index += len(name)
                return self.sp.pi if name == "pi" else self.sqrt() if name == "sqrt" else self.function(name)
        if len(word) >= 3:
            raise LatexParseError("a word, not math")
        text = self.take()[1]
        if self.peek() == "_":
            self.take()
            return self.sp.Symbol(f"{text}_{self.raw_argument()}")
        constants = {"i": self.sp.I, "e": self.sp.E}  # as in competition answers
        return constants.get(text) or self.sp.Symbol(text)

    def word_ahead(self) -> str:
        """The run of single-letter tokens starting here ("sqrt", "xy")."""
        letters = []
        for kind, text in self.tokens[self.index : self.index + 8]:
            if kind != "char" or not text.isalpha():
                break
            letters.append(text)
        return "".join(letters)

    def command(self) -> Any:
        name = self.take()[1][1:]
        sp = self.sp
        simple = {"pi": sp.pi, "infty": sp.oo}
        if name in simple:
            return simple[name]
        if name in _GREEK:
            return sp.Symbol(name)
        if name in ("frac", "cfrac"):
            numerator = self.argument()
            return numerator / self.argument()
        if name == "sqrt":
            return self.sqrt()
        if name == "binom":
            n, k = self.argument(), self.argument()
            _safe_integer_arg(n, "binomial")
            return sp.binomial(n, k)
        if name in ("lfloor", "lceil"):
            value = self.expr()
            self.expect("\\rfloor" if name == "lfloor" else "\\rceil")
            return sp.floor(value) if name == "lfloor" else sp.ceiling(value)
        if name in _FUNCTIONS:
            return self.function(name)
        raise LatexParseError(f"unsupported command \\{name}")

    def sqrt(self) -> Any:
        index = None
        if self.peek() == "[":
            index = self.group("[", "]")
        radicand = self.argument()
        return self.sp.sqrt(radicand) if index is None else self.sp.root(radicand, index)

    def function(self, name: str) -> Any:
        sp = self.sp
        base = None
        power = None
        if name == "log" and self.peek() == "_":
            self.take()
            base = self.argument()
        if self.peek() == "^":
            self.take()
            power = self.argument()
        if power == -1 and name in _INVERSE:
            name, power = _INVERSE[name], None
        if self.peek() in ("(", "{"):
            arg = self.group(self.peek() or "(", ")" if self.peek() == "(" else "}")
        else:
            arg = self.term(stop_at_function=True)
        value = getattr(sp, _FUNCTIONS.get(name, name))(arg)
        if base is not None:
            value = sp.log(arg, base)
        return value if power is None else _safe_pow(value, power)


def _plain_fraction(tokens: list[tuple[str, str]]) -> bool:
    """Tokens of ``\\frac{p}{q}`` with integer p and q (for mixed numbers)."""
    texts = [t for _, t in tokens]
    return bool(re.fullmatch(r"\\c?frac(\{\d+\}|\d)(\{\d+\}|\d)", "".join(texts)))


def latex_to_sympy(text: str) -> Any:
    """Parse normalised LaTeX into a sympy expression; raises LatexParseError / TooLargeError."""
    try:
        return _LatexParser(text).parse()
    except (LatexParseError, TooLargeError):
        raise
    except RecursionError as err:
        raise LatexParseError("nested too deeply") from err
    except (TypeError, ValueError, ZeroDivisionError, AttributeError) as err:
        raise LatexParseError(str(err)) from err


# --------------------------------------------------------------------------------------------
# Symbolic and numeric comparison (runs under the hard timeout)
# --------------------------------------------------------------------------------------------

# Fixed sample points for expressions with variables: deterministic (no RNG), irrational-looking
# so no pole is hit by accident, one negative so that sqrt(x^2) and x are told apart.
_SAMPLE_POINTS = (0.5772156649, -1.3247179572, 2.7182818285)


def _numeric_verdict(a: Any, b: Any, rel_tol: float) -> bool | None:
    """True/False when both sides evaluate to finite numbers (at fixed points if they have
    variables); None when they cannot be evaluated."""
    symbols = sorted(a.free_symbols | b.free_symbols, key=str)
    points = [{}] if not symbols else [
        {s: start + 0.1371 * j for j, s in enumerate(symbols)} for start in _SAMPLE_POINTS
    ]
    agreed = 0
    for point in points:
        try:
            va = complex(a.evalf(30, subs=point))
            vb = complex(b.evalf(30, subs=point))
        except (TypeError, ValueError, ArithmeticError, AttributeError):
            continue
        finite = [math.isfinite(v.real) and math.isfinite(v.imag) for v in (va, vb)]
        if finite[0] != finite[1]:
            return False  # a number is never equal to an infinity
        if not finite[0]:
            continue
        if not _close(va, vb, rel_tol):
            return False
        agreed += 1
    return True if agreed == len(points) else None


def _sympy_scalar_equal(gold: str, pred: str, rel_tol: float, notes: list[str]) -> str | None:
    sp = _sympy()
    try:
        a, b = latex_to_sympy(gold), latex_to_sympy(pred)
    except TooLargeError as err:
        notes.append(f"not evaluated: {err}")
        return None
    except LatexParseError as err:
        notes.append(f"could not parse as math: {err}")
        return None
    if a == b:
        return "symbolic"
    try:
        verdict = _numeric_verdict(a, b, rel_tol)
        if verdict is False:
            return None
        if sp.simplify(a - b) == 0:
            return "symbolic"
    except (TypeError, ValueError, ArithmeticError, AttributeError, NotImplementedError) as err:
        notes.append(f"sympy could not compare: {type(err).__name__}")
        return None
    both_integers = a.is_Integer and b.is_Integer
    return "tolerance" if verdict and not both_integers else None


def _equations_equal(gold: _Shape, pred: _Shape, rel_tol: float, notes: list[str]) -> str | None:
    """``lhs = rhs`` equations are equal when ``lhs - rhs`` agree up to a nonzero constant."""
    sp = _sympy()
    try:
        a = latex_to_sympy(gold.parts[0]) - latex_to_sympy(gold.parts[1])
        b = latex_to_sympy(pred.parts[0]) - latex_to_sympy(pred.parts[1])
    except (LatexParseError, TooLargeError) as err:
        notes.append(f"could not parse equation: {err}")
        return None
    if sp.simplify(a - b) == 0:
        return "symbolic"
    ratio = sp.simplify(a / b)
    return "symbolic" if ratio.is_number and ratio != 0 and ratio.is_finite else None


def _symbolic_pass(gold: str, pred: str, rel_tol: float) -> tuple[str | None, str]:
    """(rule or None, notes). Module level and picklable so it can run in a worker process."""
    notes: list[str] = []
    gold_shape, pred_shape = _shape(gold), _shape(pred)
    if gold_shape.kind == "equation" and pred_shape.kind == "equation":
        return _equations_equal(gold_shape, pred_shape, rel_tol, notes), "; ".join(notes)

    def same(g: str, p: str) -> str | None:
        return _cheap_scalar_equal(g, p, rel_tol) or _sympy_scalar_equal(g, p, rel_tol, notes)

    return _shapes_equal(gold_shape, pred_shape, same), "; ".join(dict.fromkeys(notes))


# --------------------------------------------------------------------------------------------
# Hard timeout
# --------------------------------------------------------------------------------------------


class _SymbolicTimeout(BaseException):
    """Raised by the SIGALRM handler; a BaseException so sympy's `except Exception` can't eat it."""


def _alarm_usable() -> bool:
    return (
        hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
        and signal.getitimer(signal.ITIMER_REAL)[0] == 0  # never override a caller's own timer
    )


def _run_bounded(fn: Callable[..., Any], args: tuple[Any, ...], timeout_s: float) -> tuple[str, Any]:
    """Run ``fn(*args)`` for at most ``timeout_s`` seconds: ("ok", result) | ("timeout", None) |
    ("error", message). SIGALRM in the main thread, else a killable worker process."""
    if _alarm_usable():
        return _run_with_alarm(fn, args, timeout_s)
    return _run_in_process(fn, args, timeout_s)


def _run_with_alarm(fn: Callable[..., Any], args: tuple[Any, ...], timeout_s: float) -> tuple[str, Any]:
    armed = [True]

    def on_alarm(signum: int, frame: Any) -> None:
        if armed[0]:  # a late signal after fn returned must not escape into the caller
            raise _SymbolicTimeout()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        return _call_with_timer(fn, args, timeout_s, armed)
    except _SymbolicTimeout:  # fired in the few bytecodes between fn's return and disarming
        return "timeout", None
    finally:
        armed[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _call_with_timer(
    fn: Callable[..., Any], args: tuple[Any, ...], timeout_s: float, armed: list[bool]
) -> tuple[str, Any]:
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout_s)  # inside the try: a tiny timeout may fire at once
        result = fn(*args)
        armed[0] = False
        return "ok", result
    except _SymbolicTimeout:
        return "timeout", None
    except (Exception, RecursionError) as err:  # sympy raises a wide variety; none may escape
        return "error", f"{type(err).__name__}: {err}"
    finally:
        armed[0] = False


def _child_main(connection: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        connection.send(("ok", fn(*args)))
    except BaseException as err:  # report everything to the parent, which decides
        connection.send(("error", f"{type(err).__name__}: {err}"))
    finally:
        connection.close()


def _run_in_process(fn: Callable[..., Any], args: tuple[Any, ...], timeout_s: float) -> tuple[str, Any]:
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    receiver, sender = context.Pipe(duplex=False)
    # Not a daemon: daemonic processes (e.g. DataLoader workers) may not have children.
    process = context.Process(target=_child_main, args=(sender, fn, args))
    process.start()
    sender.close()
    try:
        if receiver.poll(timeout_s):
            return receiver.recv()
        return "timeout", None
    except EOFError:
        return "error", "worker process died"
    finally:
        if process.is_alive():
            process.kill()
        process.join()
        receiver.close()


# --------------------------------------------------------------------------------------------
# Public comparison and the verifier
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnswerMatch:
    """The verdict of `answers_equal`; ``rule`` is string|numeric|symbolic|tolerance or None."""

    equal: bool
    rule: str | None
    reason: str | None
    normalized_pred: str
    normalized_gold: str


def answers_equal(
    pred: str, gold: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, rel_tol: float = DEFAULT_REL_TOL
) -> AnswerMatch:
    """Whether the answer ``pred`` equals the reference ``gold`` (both already extracted)."""
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    g, p = _normalize(gold), _normalize(pred)
    rule, reason = _compare_texts(g.text, p.text, rel_tol, timeout_s)
    if rule is None and g.percent != p.percent:
        scaled = _percent_alternative(g, p)
        if scaled is not None:
            rule, _ = _compare_texts(scaled[0], scaled[1], rel_tol, timeout_s)
    if rule is None and reason is None:
        reason = "not equivalent"
    return AnswerMatch(rule is not None, rule, None if rule else reason, p.text, g.text)


def _percent_alternative(gold: NormalizedAnswer, pred: NormalizedAnswer) -> tuple[str, str] | None:
    """The side that had a percent sign, divided by 100, against the other side as written."""
    with_sign, other = (gold, pred) if gold.percent else (pred, gold)
    value = plain_number(with_sign.text)
    if value is None:
        return None
    scaled = value / 100
    text = str(scaled.numerator) if scaled.denominator == 1 else f"{scaled.numerator}/{scaled.denominator}"
    return (text, other.text) if gold.percent else (other.text, text)


def _compare_texts(gold: str, pred: str, rel_tol: float, timeout_s: float) -> tuple[str | None, str | None]:
    if not gold:
        return None, "gold answer is empty after normalisation"
    if _key(gold) == _key(pred):
        return "string", None
    gold_shape, pred_shape = _shape(gold), _shape(pred)
    rule = _shapes_equal(gold_shape, pred_shape, lambda g, p: _cheap_scalar_equal(g, p, rel_tol))
    if rule is not None:
        return rule, None
    if not _worth_symbolic(gold_shape, pred_shape):
        return None, None
    _sympy()  # import before any timer starts: the import alone can take most of a second
    status, value = _run_bounded(_symbolic_pass, (gold, pred, rel_tol), timeout_s)
    if status == "timeout":
        return None, f"symbolic check timed out after {timeout_s:g}s"
    if status == "error":
        return None, f"symbolic check failed: {value}"
    rule, notes = value
    return rule, (notes or None) if rule is None else None


def _worth_symbolic(gold: _Shape, pred: _Shape) -> bool:
    """Skip sympy when it cannot change the verdict: plain numbers, words, different shapes."""
    scalars = _scalars(gold) + _scalars(pred)
    if all(isinstance(s, str) and plain_number(s) is not None for s in scalars):
        return False
    if any(isinstance(s, str) and _is_words(s) for s in scalars):
        return False
    kinds = {gold.kind, pred.kind}
    return len(kinds) == 1 or kinds <= {"scalar", "unordered"} or kinds <= {"ordered", "matrix"}


def verify_math(
    completion: str,
    answer: str,
    *,
    strict: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    rel_tol: float = DEFAULT_REL_TOL,
) -> RewardResult:
    r"""Score 1.0 when the completion's final answer equals ``answer``, else 0.0.

    ``answer`` is the reference answer; a full reference solution also works (its ``####`` tail or
    last box is used). meta: ``extracted``, ``extract_rule``, ``gold``, ``normalized``,
    ``normalized_gold``, ``match`` (the rule that decided), and ``reason`` when it scores 0.
    """
    gold = extract_gold_answer(answer) if ("\\boxed" in answer or "####" in answer) else answer
    gold = (gold or "").strip()
    extracted, extract_rule = extract_answer(completion, strict=strict)
    meta: dict[str, Any] = {"extracted": extracted, "extract_rule": extract_rule, "gold": gold}
    if not gold:
        return RewardResult(0.0, {"correct": 0.0}, {**meta, "reason": "gold answer is empty"})
    if extracted is None:
        reason = "no boxed answer or answer marker found" + ("" if strict else " and no number")
        return RewardResult(0.0, {"correct": 0.0}, {**meta, "reason": reason})
    verdict = answers_equal(extracted, gold, timeout_s=timeout_s, rel_tol=rel_tol)
    meta.update(normalized=verdict.normalized_pred, normalized_gold=verdict.normalized_gold,
                match=verdict.rule)
    if not verdict.equal:
        meta["reason"] = verdict.reason
    score = 1.0 if verdict.equal else 0.0
    return RewardResult(score, {"correct": score}, meta)


def verify_math_row(completion: str, row: dict[str, Any]) -> RewardResult:
    """The ``math`` verifier: reads ``row["answer"]`` (optional ``strict``, ``timeout_s``)."""
    answer = row.get("answer")
    if answer is None or not isinstance(answer, (str, int, float)) or str(answer).strip() == "":
        raise UserError(problem(
            "row.answer", "the math verifier needs the reference answer in field 'answer'",
            "add \"answer\": \"<final answer>\" to each row (e.g. \"42\" or \"\\\\frac{1}{2}\")",
            value=answer,
        ))
    timeout_s = row.get("timeout_s", DEFAULT_TIMEOUT_S)
    if not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
        raise UserError(problem("row.timeout_s", "the symbolic-check timeout must be a positive number",
                                f"drop the field (default {DEFAULT_TIMEOUT_S} s) or set e.g. 5",
                                value=timeout_s))
    return verify_math(completion, str(answer), strict=bool(row.get("strict", False)),
                       timeout_s=float(timeout_s))
