"""Pairs that share one copy of their prompt: ``[common prefix | chosen rest | rejected rest]``.

Under causal attention the hidden states of the tokens a pair's two sequences have in common (the
prompt, often most of the tokens) are the same in both, so they are computed once. The rejected
rest takes the positions the chosen rest takes (both continue the prefix) and a mask keeps it
from attending to the chosen rest; every other token attends causally within its own row.
Rewards are exactly those of the two separate sequences (tested); the forward processes
``prefix + chosen rest + rejected rest`` tokens instead of ``2 * prefix + both rests``.

A scored response (a regression head's row) is its own row with a plain causal mask. Padding
tokens attend only to themselves, which keeps every softmax row finite.
"""

from __future__ import annotations

import torch

from posttrain.data.reward_data import RewardBatch, RewardRow


def common_prefix(a: list[int], b: list[int]) -> int:
    """Tokens two sequences share at the start, leaving each at least one token of its own."""
    limit = min(len(a), len(b)) - 1
    n = 0
    while n < limit and a[n] == b[n]:
        n += 1
    return n


def collate_shared_prompt(rows: list[RewardRow], pad_id: int) -> RewardBatch:
    """One row per pair (prefix once) or scored response; see the module docstring."""
    layouts = []
    for row in rows:
        if row.is_pair:
            chosen, rejected = (s.input_ids for s in row.sequences)
            shared = common_prefix(chosen, rejected)
            layouts.append((chosen + rejected[shared:], shared, len(chosen) - shared, len(rejected) - shared))
        else:
            ids = row.sequences[0].input_ids
            layouts.append((ids, len(ids), 0, 0))
    width = max(len(ids) for ids, *_ in layouts)
    count = len(rows)
    input_ids = torch.full((count, width), pad_id, dtype=torch.long)
    positions = torch.arange(width).expand(count, width).clone()
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    mask = causal.expand(count, width, width).clone()
    read_rows, read_cols = [], []
    for r, (ids, shared, chosen_rest, rejected_rest) in enumerate(layouts):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        mask[r, len(ids):, :] = False
        mask[r, len(ids):, len(ids):] |= torch.eye(width - len(ids), dtype=torch.bool)
        if chosen_rest:
            start = shared + chosen_rest
            positions[r, start : start + rejected_rest] = torch.arange(shared, shared + rejected_rest)
            mask[r, start : start + rejected_rest, shared:start] = False
            read_rows += [r, r]
            read_cols += [start - 1, start + rejected_rest - 1]
        else:
            read_rows.append(r)
            read_cols.append(len(ids) - 1)
    plain = _plain_fields(rows)
    tokens = sum(len(row) for row in rows)
    return RewardBatch(input_ids, positions, torch.tensor(read_rows), torch.tensor(read_cols), *plain, tokens,
                       attention_mask=mask[:, None])


def _plain_fields(rows: list[RewardRow]) -> tuple[torch.Tensor, ...]:
    """Pair and point bookkeeping in reading order (a pair's chosen read, then its rejected)."""
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
