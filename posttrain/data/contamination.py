"""Contamination scan: training rows that overlap evaluation rows.

Text is normalised first (`normalize`: Unicode NFKC, lowercase, punctuation and whitespace
dropped, arithmetic symbols kept) and split into words. A training row and an eval row overlap when any of
these holds:

- exact: their prompts are equal after normalisation;
- near: the Jaccard similarity of their prompts' word shingles (``shingle`` words, default 3) is
  at least ``near_threshold`` (default 0.8): paraphrase-level edits such as changed numbers or a
  reworded clause;
- n-gram: the training row's whole text (prompt and response) contains an ``ngram``-word sequence
  (default 13, as in GPT-3's analysis) of the eval prompt. An eval prompt shorter than ``ngram``
  words but at least ``min_tokens`` long counts as one n-gram of its own length.

The eval side is the eval prompt (the question a benchmark asks); the training side is the
whole row, so an eval question quoted inside a training answer is found too.

Everything is exact and dependency-free: inverted indexes from n-grams and shingles to eval rows.
Near-duplicate candidates come from shingles shared with at most ``max_posting`` eval rows (common
phrasing is not a lead), and a candidate is dropped only when the shared rare shingles prove that
its Jaccard similarity is below the threshold; survivors get the exact Jaccard. GSM8K train
(7,473 rows) against test (1,319) takes a few seconds.

`ContaminationReport` lists each overlapping pair with both rows' ``file:line``; `apply_policy`
implements ``on_contamination: report | fail | drop``.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from posttrain.errors import UserError, problem
from posttrain.types import (
    ChatExample,
    Example,
    KTOExample,
    PreferencePair,
    PromptCompletionExample,
    PromptExample,
    RankedExample,
    RowSource,
    Text,
    TextExample,
)

Policy = Literal["report", "fail", "drop"]
POLICIES: tuple[str, ...] = ("report", "fail", "drop")
_TOKEN = re.compile(r"[^\W_]+|[+\-*/=<>^%]")

# Raw-row fields, in order of preference, that hold a prompt, and fields that hold the rest.
PROMPT_FIELDS = ("prompt", "question", "problem", "instruction", "query", "input", "text")
RESPONSE_FIELDS = ("completion", "answer", "solution", "response", "output", "chosen", "rejected",
                   "canonical_solution", "code")


@dataclass(frozen=True)
class ScanSettings:
    ngram: int = 13  # words per n-gram
    near_threshold: float = 0.8  # Jaccard of prompt shingles that counts as a near duplicate
    shingle: int = 3  # words per shingle for the near-duplicate test
    min_tokens: int = 8  # shorter eval prompts are matched only exactly or as near duplicates
    max_posting: int = 50  # shingles shared by more eval rows are not used to find candidates

    def __post_init__(self) -> None:
        if self.ngram < 1 or self.shingle < 1 or self.min_tokens < 1 or self.max_posting < 1:
            raise ValueError("ngram, shingle, min_tokens and max_posting must be positive")
        if not 0 < self.near_threshold <= 1:
            raise ValueError("near_threshold must be in (0, 1]")


@dataclass(frozen=True)
class TextRow:
    """One row's text: ``prompt`` for exact and near matching, ``text`` for n-gram overlap."""

    source: RowSource
    prompt: str
    text: str


def normalize(text: str) -> list[str]:
    """Words of ``text`` after NFKC and lowercasing, without punctuation; arithmetic symbols are
    kept as words of their own ("62 - 41" and "62 + 41" are different questions)."""
    return _TOKEN.findall(unicodedata.normalize("NFKC", text).lower())


def _flatten(value: Text | Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(_flatten(m.get("content", "") if isinstance(m, dict) else m) for m in value)
    if isinstance(value, dict):
        return _flatten(value.get("content", value.get("value", "")))
    return ""


def _user_turns(messages: Sequence[Any]) -> str:
    return "\n".join(_flatten(m.get("content", m.get("value", ""))) for m in messages
                     if isinstance(m, dict) and m.get("role", m.get("from")) in ("user", "human"))


def row_from_example(example: Example) -> TextRow:
    """Prompt and full text of any typed example."""
    if isinstance(example, TextExample):
        return TextRow(example.source, example.text, example.text)
    if isinstance(example, ChatExample):
        return TextRow(example.source, _user_turns(example.messages), _flatten(example.messages))
    if isinstance(example, PromptCompletionExample | KTOExample):
        prompt = _flatten(example.prompt)
        return TextRow(example.source, prompt, prompt + "\n" + _flatten(example.completion))
    if isinstance(example, PreferencePair):
        prompt = _flatten(example.prompt)
        return TextRow(example.source, prompt, "\n".join([prompt, _flatten(example.chosen),
                                                          _flatten(example.rejected)]))
    if isinstance(example, RankedExample):
        prompt = _flatten(example.prompt)
        return TextRow(example.source, prompt, "\n".join([prompt, *(_flatten(r) for r in example.responses)]))
    if isinstance(example, PromptExample):
        prompt = _flatten(example.prompt)
        return TextRow(example.source, prompt, prompt + "\n" + str(example.answer or ""))
    raise TypeError(f"cannot read text from {type(example).__name__}")


def row_from_dict(row: Mapping[str, Any], source: RowSource) -> TextRow:
    """Prompt and full text of a raw row, by the usual field names (GSM8K ``question``, MATH
    ``problem``, MBPP ``text``, conversations ``messages``, ...)."""
    if isinstance(row.get("messages") or row.get("conversations"), list):
        messages = row.get("messages") or row.get("conversations")
        prompt = _user_turns(messages)
        rest = _flatten(messages)
    else:
        prompt = next((_flatten(row[k]) for k in PROMPT_FIELDS if isinstance(row.get(k), str | list)), "")
        rest = prompt
    extra = [_flatten(row[k]) for k in RESPONSE_FIELDS if k in row and isinstance(row[k], str | list | dict)]
    return TextRow(source, prompt, "\n".join([rest, *extra]))


@dataclass
class Overlap:
    """One training row that overlaps one eval row."""

    eval_set: str
    train: RowSource
    eval: RowSource
    exact: bool = False
    jaccard: float = 0.0  # of the prompts' shingles, when it was computed (else 0)
    shared_ngrams: int = 0
    eval_ngrams: int = 0
    snippet: str = ""  # a shared n-gram, or the eval prompt's start

    @property
    def kind(self) -> str:
        return "exact" if self.exact else "ngram" if self.shared_ngrams else "near"

    def describe(self) -> str:
        detail = {"exact": "same prompt", "near": f"near duplicate, Jaccard {self.jaccard:.2f}",
                  "ngram": f"{self.shared_ngrams}/{self.eval_ngrams} n-grams shared"}[self.kind]
        return f"{self.train} ~ {self.eval} [{self.eval_set}] {detail}: \"{self.snippet[:80]}\""


@dataclass
class ContaminationReport:
    settings: ScanSettings
    overlaps: list[Overlap] = field(default_factory=list)
    train_rows: int = 0
    eval_rows: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # eval sets not scanned, and why

    def contaminated_train(self) -> set[RowSource]:
        return {o.train for o in self.overlaps}

    def contaminated_eval(self, eval_set: str | None = None) -> set[RowSource]:
        return {o.eval for o in self.overlaps if eval_set is None or o.eval_set == eval_set}

    def counts(self) -> dict[str, int]:
        kinds = Counter(o.kind for o in self.overlaps)
        return {"pairs": len(self.overlaps), "train_rows": len(self.contaminated_train()),
                "eval_rows": len(self.contaminated_eval()), **{k: kinds.get(k, 0) for k in ("exact", "near", "ngram")}}

    def summary(self, limit: int = 20) -> str:
        c = self.counts()
        head = (f"contamination scan ({self.settings.ngram}-grams, near-duplicate Jaccard >= "
                f"{self.settings.near_threshold}): {self.train_rows} training rows against "
                + ", ".join(f"{name} ({n} rows)" for name, n in self.eval_rows.items())
                + f": {c['pairs']} overlapping pairs ({c['exact']} exact, {c['near']} near, {c['ngram']} n-gram), "
                f"{c['train_rows']} training rows, {c['eval_rows']} eval rows")
        lines = [head, *(f"  {o.describe()}" for o in self.overlaps[:limit])]
        if len(self.overlaps) > limit:
            lines.append(f"  ... and {len(self.overlaps) - limit} more (see the report file)")
        lines += [f"  not scanned: {why}" for why in self.skipped]
        return "\n".join(lines)

    def write_jsonl(self, path: Path) -> None:
        """One JSON object per overlapping pair (rows as ``file:line``)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for o in self.overlaps:
                record = asdict(o)
                record.update(kind=o.kind, train=str(o.train), eval=str(o.eval))
                f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------- the scan


@dataclass
class _EvalIndex:
    rows: list[tuple[str, TextRow]]  # (eval set, row)
    grams: dict[tuple[str, ...], list[int]]  # n-gram (or short whole prompt) -> eval rows
    gram_counts: list[int]  # n-grams per eval row
    short_lengths: list[int]  # lengths of short eval prompts indexed whole
    exact: dict[str, list[int]]
    shingles: list[frozenset[tuple[str, ...]]]
    postings: dict[tuple[str, ...], list[int]]


def _grams(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def _build_index(against: Mapping[str, Sequence[TextRow]], s: ScanSettings) -> _EvalIndex:
    index = _EvalIndex([], {}, [], [], {}, [], {})
    short = set()
    for name, rows in against.items():
        for row in rows:
            i = len(index.rows)
            index.rows.append((name, row))
            words = normalize(row.prompt)
            grams = _grams(words, s.ngram) if len(words) >= s.ngram else (
                {tuple(words)} if len(words) >= s.min_tokens else set())
            if s.min_tokens <= len(words) < s.ngram:
                short.add(len(words))
            index.gram_counts.append(len(grams))
            for gram in grams:
                index.grams.setdefault(gram, []).append(i)
            if words:
                index.exact.setdefault(" ".join(words), []).append(i)
            shingles = frozenset(_grams(words, s.shingle)) if len(words) >= s.shingle else frozenset([tuple(words)])
            index.shingles.append(shingles)
            for shingle in shingles:
                index.postings.setdefault(shingle, []).append(i)
    index.short_lengths = sorted(short)
    return index


def _ngram_hits(text_words: list[str], index: _EvalIndex, s: ScanSettings) -> dict[int, list[tuple[str, ...]]]:
    hits: dict[int, list[tuple[str, ...]]] = {}
    for n in [s.ngram, *index.short_lengths]:
        for gram in _grams(text_words, n):
            for j in index.grams.get(gram, ()):
                hits.setdefault(j, []).append(gram)
    return hits


def _near_hits(prompt_words: list[str], index: _EvalIndex, s: ScanSettings) -> dict[int, float]:
    mine = frozenset(_grams(prompt_words, s.shingle)) if len(prompt_words) >= s.shingle else (
        frozenset([tuple(prompt_words)]) if prompt_words else frozenset())
    rare: Counter[int] = Counter()
    common = 0
    for shingle in mine:
        posting = index.postings.get(shingle, ())
        if len(posting) > s.max_posting:
            common += 1
            continue
        rare.update(posting)
    out = {}
    for j, shared_rare in rare.items():
        # J >= t needs |A & B| >= t * max(|A|, |B|); at most `common` shared shingles went uncounted.
        if shared_rare + common < s.near_threshold * max(len(mine), len(index.shingles[j])):
            continue
        theirs = index.shingles[j]
        jaccard = len(mine & theirs) / len(mine | theirs)
        if jaccard >= s.near_threshold:
            out[j] = jaccard
    return out


def scan(train: Sequence[TextRow], against: Mapping[str, Sequence[TextRow]],
         settings: ScanSettings | None = None) -> ContaminationReport:
    """Every (training row, eval row) pair that overlaps, per the module docstring."""
    s = settings or ScanSettings()
    index = _build_index(against, s)
    report = ContaminationReport(s, train_rows=len(train), eval_rows={k: len(v) for k, v in against.items()})
    for row in train:
        prompt_words = normalize(row.prompt)
        text_words = prompt_words if row.text == row.prompt else normalize(row.text)
        found: dict[int, Overlap] = {}
        for j in index.exact.get(" ".join(prompt_words), ()) if prompt_words else ():
            found[j] = Overlap(index.rows[j][0], row.source, index.rows[j][1].source, exact=True, jaccard=1.0)
        for j, jaccard in _near_hits(prompt_words, index, s).items():
            found.setdefault(j, Overlap(index.rows[j][0], row.source, index.rows[j][1].source)).jaccard = jaccard
        for j, grams in _ngram_hits(text_words, index, s).items():
            overlap = found.setdefault(j, Overlap(index.rows[j][0], row.source, index.rows[j][1].source))
            overlap.shared_ngrams, overlap.eval_ngrams = len(grams), index.gram_counts[j]
            overlap.snippet = " ".join(grams[0])
        for j, overlap in sorted(found.items()):
            overlap.snippet = overlap.snippet or index.rows[j][1].prompt.strip()[:120]
            report.overlaps.append(overlap)
    return report


# ---------------------------------------------------------------- policies

T = TypeVar("T")


def apply_policy(report: ContaminationReport, rows: Sequence[T], sources: Sequence[RowSource], policy: str, *,
                 where: str) -> list[T]:
    """``report``: keep every row; ``drop``: keep the rows not in an overlap; ``fail``: raise a
    UserError listing the overlaps when there is any. ``sources[i]`` is ``rows[i]``'s source."""
    if policy not in POLICIES:
        raise UserError(problem(where, f"unknown on_contamination {policy!r}", "use report, fail or drop"))
    bad = report.contaminated_train()
    if policy == "fail" and bad:
        shown = [problem(str(o.train), f"overlaps {o.eval} [{o.eval_set}] ({o.kind})",
                         "remove the row, or set on_contamination: drop") for o in report.overlaps[:20]]
        raise UserError(shown, title=f"{where}: {len(bad)} training rows overlap the eval sets "
                        f"({len(report.overlaps)} pairs; on_contamination: fail)")
    if policy == "drop":
        return [row for row, source in zip(rows, sources) if source not in bad]
    return list(rows)
