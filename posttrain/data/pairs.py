"""Preference pairs -> token sequences (shared by the DPO family and reward models).

Both responses of a pair are rendered exactly like SFT rows (``render_prompt_completion``), so the
prompt tokens are the ones a sampler sees and each response ends with its end-of-turn token.
Pairs that cannot teach anything are counted and reported, or fail the stage (configurable):
identical responses, an empty response, a prompt longer than ``max_prompt_length``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from posttrain.data.render import fit_length, render_prompt_completion
from posttrain.errors import UserError, problem
from posttrain.types import PreferencePair, RowSource, Text, TokenizedExample


@dataclass
class TokenizedPair:
    """chosen / rejected: prompt + response with the response (and its end token) as targets."""

    chosen: TokenizedExample
    rejected: TokenizedExample
    prompt_length: int
    source: RowSource
    extra: dict[str, Any] = field(default_factory=dict)  # margin, category, scores
    index: int = -1  # position in the rendered dataset (keys the cached reference log-probs)

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)


@dataclass
class PairReport:
    pairs: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def drop(self, reason: str, source: RowSource) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(str(source))

    def as_dict(self) -> dict[str, Any]:
        return {"pairs": self.pairs, "kept": self.kept, "truncated": self.truncated, "dropped": dict(self.dropped),
                "dropped_examples": dict(self.examples)}


def _is_empty(response: Text) -> bool:
    if isinstance(response, str):
        return not response.strip()
    return not any(m["content"].strip() for m in response)


def _check_pair(pair: PreferencePair) -> str | None:
    """Why the pair cannot teach anything, or None."""
    if _is_empty(pair.chosen) or _is_empty(pair.rejected):
        return "empty response"
    if pair.chosen == pair.rejected:
        return "identical chosen and rejected"
    return None


def render_pair(tokenizer: PreTrainedTokenizerBase, pair: PreferencePair) -> TokenizedPair:
    chosen = render_prompt_completion(tokenizer, pair.prompt, pair.chosen, "assistant", pair.source)
    rejected = render_prompt_completion(tokenizer, pair.prompt, pair.rejected, "assistant", pair.source)
    prompt_length = chosen.loss_mask.index(1)
    return TokenizedPair(chosen, rejected, prompt_length, pair.source, dict(pair.extra))


def render_pairs(tokenizer: PreTrainedTokenizerBase, pairs: list[PreferencePair], *, max_length: int,
                 max_prompt_length: int | None, on_overlong: str, on_bad_pair: str, max_dropped_share: float,
                 where: str) -> tuple[list[TokenizedPair], PairReport]:
    """Render every pair; bad ones fail (``on_bad_pair: error``) or are dropped and counted."""
    report = PairReport(pairs=len(pairs))
    out: list[TokenizedPair] = []
    for pair in pairs:
        reason = _check_pair(pair)
        rendered = None if reason else render_pair(tokenizer, pair)
        if rendered is not None and max_prompt_length and rendered.prompt_length > max_prompt_length:
            reason = f"prompt longer than max_prompt_length {max_prompt_length}"
        if rendered is not None and reason is None:
            rendered, reason = _fit_pair(rendered, max_length, on_overlong, report)
            if rendered is not None and rendered.chosen.input_ids == rendered.rejected.input_ids:
                reason = "identical chosen and rejected after tokenisation"
        if reason:
            if on_bad_pair == "error":
                raise UserError(problem(str(pair.source), f"unusable pair: {reason}",
                                        f"fix or remove the row, or set {where}.on_bad_pair: drop"))
            report.drop(reason, pair.source)
            continue
        out.append(rendered)
    dropped = sum(report.dropped.values())
    if pairs and dropped / len(pairs) > max_dropped_share:
        raise UserError(problem(where, f"{dropped} of {len(pairs)} pairs were dropped ({report.dropped})",
                                f"fix the data, or raise {where}.max_dropped_share"))
    if not out:
        raise UserError(problem(where, "no usable pairs", "check the data"))
    for i, pair in enumerate(out):
        pair.index = i
    report.kept = len(out)
    return out, report


def _fit_pair(pair: TokenizedPair, max_length: int, on_overlong: str, report: PairReport
              ) -> tuple[TokenizedPair | None, str | None]:
    if pair.prompt_length >= max_length:
        return None, f"prompt of {pair.prompt_length} tokens leaves no room within max_length {max_length}"
    chosen = fit_length(pair.chosen, max_length, on_overlong)
    rejected = fit_length(pair.rejected, max_length, on_overlong)
    if chosen is None or rejected is None:
        return None, f"longer than max_length {max_length}"
    if chosen.truncated or rejected.truncated:
        report.truncated += 1
    return TokenizedPair(chosen, rejected, pair.prompt_length, pair.source, pair.extra), None


@dataclass
class SequenceBatch:
    """Right-padded sequences for scoring: input_ids, position_ids, target_mask [R, T];
    ``index`` [R] is each sequence's position in the flattened dataset (for cached values)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    target_mask: torch.Tensor
    index: torch.Tensor
    tokens: int

    def to(self, device: torch.device) -> SequenceBatch:
        return SequenceBatch(self.input_ids.to(device), self.position_ids.to(device), self.target_mask.to(device),
                             self.index.to(device), self.tokens)


def collate_sequences(sequences: list[TokenizedExample], index: list[int], pad_id: int) -> SequenceBatch:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for r, s in enumerate(sequences):
        ids[r, : len(s)] = torch.tensor(s.input_ids)
        mask[r, : len(s)] = torch.tensor(s.loss_mask)
    positions = torch.arange(width).expand(len(sequences), width).clone()
    return SequenceBatch(ids, positions, mask, torch.tensor(index), sum(len(s) for s in sequences))


def collate_pairs(pairs: list[TokenizedPair], pad_id: int) -> SequenceBatch:
    """One batch of 2B rows: the B chosen sequences, then the B rejected ones (one forward).
    ``index`` holds 2 * pair.index (chosen) and 2 * pair.index + 1 (rejected)."""
    sequences = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    index = [2 * p.index for p in pairs] + [2 * p.index + 1 for p in pairs]
    return collate_sequences(sequences, index, pad_id)


def pairs_from_ranking(prompt: Text, responses: list[Text], scores: list[float], *, mode: str,
                       source: RowSource, extra: dict[str, Any] | None = None) -> list[PreferencePair]:
    """Pairs from several scored responses: the best against each other one (``best_vs_rest``)
    or every ordered pair (``all_pairs``). Ties make no pair. ``extra['margin']`` = score gap."""
    order = sorted(range(len(responses)), key=lambda i: -scores[i])
    candidates = [(order[0], j) for j in order[1:]] if mode == "best_vs_rest" else [
        (order[a], order[b]) for a in range(len(order)) for b in range(a + 1, len(order))]
    out = []
    for i, j in candidates:
        if scores[i] == scores[j]:
            continue
        out.append(PreferencePair(prompt, responses[i], responses[j], source,
                                  {**(extra or {}), "margin": scores[i] - scores[j]}))
    return out
