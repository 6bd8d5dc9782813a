"""Packing and collation of tokenized rows into micro-batches.

A *row* is one sequence of the batch: a single example, or several examples packed together.
Packed examples never attend to each other: position ids restart at 0 for every segment, and the
model builds a block-diagonal causal mask from them (transformers detects packed sequences from
position ids when no attention mask is passed; ``tests/data/test_packing.py`` checks that packed
and unpacked log-probabilities agree). Right padding needs no attention mask at all under causal
attention: real tokens never see the padding after them, and padded positions are never targets.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from posttrain.types import TokenizedExample

TOKEN_MEAN = "token-mean"
SEQ_MEAN_TOKEN_MEAN = "seq-mean-token-mean"


def best_fit_pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: indices grouped into bins of total length <= capacity.

    Deterministic: ties are broken by original index. Every length must be <= capacity.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    # Sorted list of (remaining space, bin index) so the tightest fitting bin is a bisect away.
    free: list[tuple[int, int]] = []
    for i in order:
        size = lengths[i]
        if size > capacity:
            raise ValueError(f"item of length {size} exceeds capacity {capacity}")
        pos = bisect.bisect_left(free, (size, -1))
        if pos < len(free):
            space, b = free.pop(pos)
            bins[b].append(i)
            bisect.insort(free, (space - size, b))
        else:
            bins.append([i])
            bisect.insort(free, (capacity - size, len(bins) - 1))
    return bins


@dataclass
class Row:
    """One sequence of a batch: one or more examples (segments)."""

    segments: list[TokenizedExample]

    def __len__(self) -> int:
        return sum(len(s) for s in self.segments)

    @property
    def n_targets(self) -> int:
        return sum(s.n_targets for s in self.segments)


def make_rows(examples: list[TokenizedExample], *, packing: bool, max_length: int) -> list[Row]:
    if not packing:
        return [Row([e]) for e in examples]
    bins = best_fit_pack([len(e) for e in examples], max_length)
    return [Row([examples[i] for i in sorted(b)]) for b in bins]


def row_units(row: Row, aggregation: str) -> float:
    """A row's share of the loss normaliser: target tokens, or examples (per-sequence mean)."""
    if aggregation == TOKEN_MEAN:
        return float(row.n_targets)
    return float(sum(1 for s in row.segments if s.n_targets))


@dataclass
class MicroBatch:
    """Tensors for one forward/backward.

    input_ids [B, T]; position_ids [B, T] (restart per packed segment); target_weights [B, T]:
    weight of token t as a target (0 = not a target; 1 for token-mean; 1/targets-of-its-segment
    for seq-mean-token-mean). ``tokens`` counts non-padding tokens.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    target_weights: torch.Tensor
    tokens: int
    targets: int
    rows: int

    def to(self, device: torch.device) -> MicroBatch:
        return MicroBatch(self.input_ids.to(device), self.position_ids.to(device),
                          self.target_weights.to(device), self.tokens, self.targets, self.rows)


def collate(rows: list[Row], pad_id: int, aggregation: str = TOKEN_MEAN) -> MicroBatch:
    """Right-pad rows into a micro-batch."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    weights = torch.zeros((len(rows), width), dtype=torch.float32)
    tokens = targets = 0
    for b, row in enumerate(rows):
        t = 0
        for seg in row.segments:
            n = len(seg)
            input_ids[b, t : t + n] = torch.tensor(seg.input_ids)
            position_ids[b, t : t + n] = torch.arange(n)
            mask = torch.tensor(seg.loss_mask, dtype=torch.float32)
            if aggregation == SEQ_MEAN_TOKEN_MEAN and seg.n_targets:
                mask /= seg.n_targets
            weights[b, t : t + n] = mask
            t += n
        if len(row.segments) > 1 and t < width:
            # Padding of a packed row forms its own segment so no real token attends to it.
            position_ids[b, t:] = torch.arange(width - t)
        elif t < width:
            position_ids[b, t:] = torch.arange(t, width)
        tokens += t
        targets += row.n_targets
    return MicroBatch(input_ids, position_ids, weights, tokens, targets, len(rows))
