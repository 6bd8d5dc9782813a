"""A micro-batch of reward-model rows packed into one row, pairs sharing one copy of their prompt:
``[common prefix | chosen rest | rejected rest | next pair ...]``.

Under causal attention the hidden states of the tokens a pair's two sequences have in common (the
prompt, often most of the tokens) are the same in both, so they are computed once. The rejected
rest takes the positions the chosen rest takes (both continue the prefix) and attends to the
prefix and to itself, never to the chosen rest (``posttrain.models.block_attention``). Rows are
packed end to end with no padding; attention never crosses rows. Rewards are exactly those of the
separate sequences (tested); the forward processes ``prefix + chosen rest + rejected rest`` tokens
per pair instead of two padded sequences.

A scored response (a regression head's row) is one plain causal block.
"""

from __future__ import annotations

import torch

from posttrain.data.reward_data import RewardBatch, RewardRow, lm_targets
from posttrain.models.block_attention import AttentionBlock, BlockLayout


def common_prefix(a: list[int], b: list[int]) -> int:
    """Tokens two sequences share at the start, leaving each at least one token of its own."""
    limit = min(len(a), len(b)) - 1
    n = 0
    while n < limit and a[n] == b[n]:
        n += 1
    return n


def collate_shared_prompt(rows: list[RewardRow], pad_id: int) -> RewardBatch:
    """Every row of the micro-batch in one packed row; see the module docstring. ``pad_id`` is
    unused (nothing is padded) but kept so the collate functions are interchangeable."""
    ids: list[int] = []
    positions: list[int] = []
    blocks: list[AttentionBlock] = []
    reads: list[int] = []
    chosen = []
    for row in rows:
        start = len(ids)
        first = row.sequences[0].input_ids
        if not row.is_pair:
            ids += first
            positions += range(len(first))
            blocks.append(AttentionBlock(start, len(ids)))
            reads.append(len(ids) - 1)
            continue
        rejected = row.sequences[1].input_ids
        shared = common_prefix(first, rejected)
        chosen.append((row.sequences[0], 0, start))
        ids += first
        positions += range(len(first))
        blocks.append(AttentionBlock(start, len(ids)))
        reads.append(len(ids) - 1)
        rest = rejected[shared:]
        blocks.append(AttentionBlock(len(ids), len(ids) + len(rest), ((start, start + shared),) if shared else ()))
        ids += rest
        positions += range(shared, shared + len(rest))
        reads.append(len(ids) - 1)
    return RewardBatch(torch.tensor([ids]), torch.tensor([positions]), torch.zeros(len(reads), dtype=torch.long),
                       torch.tensor(reads), *_bookkeeping(rows), sum(len(row) for row in rows),
                       blocks=BlockLayout(tuple(blocks)), **lm_targets(chosen))


def _bookkeeping(rows: list[RewardRow]) -> tuple[torch.Tensor, ...]:
    """Pair and point fields in reading order (a pair's chosen read, then its rejected)."""
    pairs, points, read = [], [], 0
    for row in rows:
        if row.is_pair:
            pairs.append((read, read + 1, row.head, row.value, row.category))
            read += 2
        else:
            points.append((read, row.head, row.value))
            read += 1

    def column(items: list[tuple], i: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor([item[i] for item in items], dtype=dtype)

    return (column(pairs, 0, torch.long), column(pairs, 1, torch.long), column(pairs, 2, torch.long),
            column(pairs, 3, torch.float32), column(pairs, 4, torch.long),
            column(points, 0, torch.long), column(points, 1, torch.long), column(points, 2, torch.float32))
