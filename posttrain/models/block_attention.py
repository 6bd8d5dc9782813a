"""Attention over explicit blocks of one packed row: no padding, and prompts shared between
responses.

A micro-batch of reward-model pairs is packed into a single row ``[prompt | chosen rest |
rejected rest | prompt | ...]``. Each `AttentionBlock` is a run of query tokens that attends
causally to itself and fully to its ``context`` ranges (earlier tokens of the same row): a
pair's prompt + chosen rest is one plain causal block; its rejected rest is a block whose context
is the prompt. Attention is then computed block by block with ``scaled_dot_product_attention``,
so its cost is the sum of the blocks' own costs (never the packed row's squared length) and no
token is padding.

transformers passes unknown keyword arguments of the decoder's forward down to the attention
function, so the layout travels as ``posttrain_blocks=``; the attention implementation registered
here falls back to transformers' SDPA whenever no layout is given (and masks are built as for
SDPA), so a backbone switched to it behaves exactly as before everywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

BLOCK_ATTENTION = "posttrain_blocks"
# A 4D mask makes transformers skip building its own (an N x N mask for a packed row would cost
# as much as the attention we avoid); the block function never reads it.
NO_MASK = torch.ones((1, 1, 1, 1), dtype=torch.bool)


@dataclass(frozen=True)
class AttentionBlock:
    """Query tokens ``[start, end)`` of the row; they see ``context`` ranges fully and themselves causally."""

    start: int
    end: int
    context: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class BlockLayout:
    """Blocks in order, covering the row ``[0, length)`` without gaps."""

    blocks: tuple[AttentionBlock, ...]

    def __post_init__(self) -> None:
        position = 0
        for block in self.blocks:
            if block.start != position or block.end <= block.start:
                raise ValueError(f"blocks must tile the row in order; {block} follows position {position}")
            for a, b in block.context:
                owner = self.owner(a)
                if owner is None or b > self.blocks[owner].end or b > block.start or b <= a:
                    raise ValueError(f"a block's context must lie inside one earlier block: {block}")
            position = block.end

    def owner(self, position: int) -> int | None:
        """The index of the block holding ``position`` (None if none does yet)."""
        return next((i for i, b in enumerate(self.blocks) if b.start <= position < b.end), None)

    @property
    def length(self) -> int:
        return self.blocks[-1].end if self.blocks else 0

    @property
    def sizes(self) -> list[int]:
        return [b.end - b.start for b in self.blocks]


@dataclass(frozen=True)
class _Plan:
    """Index tensors that gather a layout's blocks into two padded batches and back.

    Plain blocks: [A, LA] token positions (right-padded by repeating the last one, which causal
    attention never lets a real query see). Blocks with a context: queries [C, LQ] likewise, keys
    [C, LK] = the context padded to the longest context, then the block's own positions, with a
    mask [C, 1, LQ, LK]. ``inverse`` [N] picks each token's output from the two batches' outputs,
    flattened and concatenated."""

    plain: torch.Tensor
    plain_shape: tuple[int, int]
    queries: torch.Tensor
    keys: torch.Tensor
    mask: torch.Tensor
    context_shape: tuple[int, int, int]
    inverse: torch.Tensor


def _padded(positions: list[int], width: int) -> list[int]:
    return positions + [positions[-1]] * (width - len(positions))


def _plan(layout: BlockLayout, device: torch.device) -> _Plan:
    plain = [b for b in layout.blocks if not b.context]
    rest = [b for b in layout.blocks if b.context]
    width = max((b.end - b.start for b in plain), default=1)
    inverse = [0] * layout.length
    for i, b in enumerate(plain):
        inverse[b.start : b.end] = range(i * width, i * width + b.end - b.start)
    queries_width = max((b.end - b.start for b in rest), default=1)
    contexts = [[p for a, c in b.context for p in range(a, c)] for b in rest]
    context_width = max((len(c) for c in contexts), default=1)
    mask = torch.zeros((len(rest), 1, queries_width, context_width + queries_width), dtype=torch.bool)
    offset = len(plain) * width
    for i, (b, context) in enumerate(zip(rest, contexts)):
        inverse[b.start : b.end] = range(offset + i * queries_width, offset + i * queries_width + b.end - b.start)
        mask[i, 0, :, : len(context)] = True
    mask[:, 0, :, context_width:] = torch.ones((queries_width, queries_width), dtype=torch.bool).tril()

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    return _Plan(tensor([p for b in plain for p in _padded(list(range(b.start, b.end)), width)]), (len(plain), width),
                 tensor([p for b in rest for p in _padded(list(range(b.start, b.end)), queries_width)]),
                 tensor([p for b, c in zip(rest, contexts) for p in _padded(c, context_width)
                         + _padded(list(range(b.start, b.end)), queries_width)]),
                 mask.to(device), (len(rest), queries_width, context_width + queries_width), tensor(inverse))


def _cached_plan(layout: BlockLayout, device: torch.device) -> _Plan:
    """The layout's plan, built once per forward pass (every layer reuses it)."""
    cache = layout.__dict__.setdefault("_plans", {})
    if str(device) not in cache:
        cache[str(device)] = _plan(layout, device)
    return cache[str(device)]


def _gather(x: torch.Tensor, index: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """[H, N, d] -> [rows, H, width, d] at the flattened positions ``index``."""
    return x.index_select(1, index).view(x.shape[0], rows, width, x.shape[-1]).transpose(0, 1)


def block_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            posttrain_blocks: BlockLayout | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query [1, H, N, d], key/value [1, Hkv, N, d] -> ([1, N, H, d], None).

    The blocks are gathered into two padded batches (plain causal blocks; blocks with a context)
    so a layer costs two attention calls however many blocks there are; padding exists only
    inside attention, never in the linear layers."""
    if posttrain_blocks is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1 or query.shape[2] != posttrain_blocks.length:
        raise ValueError(f"a block layout of {posttrain_blocks.length} tokens needs one packed row, got query "
                         f"shape {tuple(query.shape)}")
    if key.shape[1] != query.shape[1]:  # grouped-query attention
        repeat = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    plan = _cached_plan(posttrain_blocks, query.device)
    q, k, v = query[0], key[0], value[0]
    heads, dim = q.shape[0], q.shape[-1]
    outputs = []
    rows, width = plan.plain_shape
    if rows:
        out = F.scaled_dot_product_attention(_gather(q, plan.plain, rows, width), _gather(k, plan.plain, rows, width),
                                             _gather(v, plan.plain, rows, width), is_causal=True, dropout_p=dropout,
                                             scale=scaling)
        outputs.append(out.transpose(0, 1).reshape(heads, rows * width, dim))
    rows, queries, keys = plan.context_shape
    if rows:
        out = F.scaled_dot_product_attention(_gather(q, plan.queries, rows, queries), _gather(k, plan.keys, rows, keys),
                                             _gather(v, plan.keys, rows, keys), attn_mask=plan.mask,
                                             dropout_p=dropout, scale=scaling)
        outputs.append(out.transpose(0, 1).reshape(heads, rows * queries, dim))
    flat = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]
    return flat.index_select(1, plan.inverse).transpose(0, 1).unsqueeze(0).contiguous(), None


AttentionInterface.register(BLOCK_ATTENTION, block_attention_forward)
AttentionMaskInterface.register(BLOCK_ATTENTION, sdpa_mask)


def use_block_attention(model: torch.nn.Module) -> bool:
    """Switch an SDPA model to block attention (same results without a layout); False if it
    uses another implementation (eager, flash attention), which is left alone."""
    config = model.config
    if config._attn_implementation == BLOCK_ATTENTION:
        return True
    if config._attn_implementation != "sdpa":
        return False
    config._attn_implementation = BLOCK_ATTENTION
    return True
