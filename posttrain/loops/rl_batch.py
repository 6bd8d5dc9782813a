"""Rollout batches for the online loop: token-in/token-out tensors, never re-tokenised.

Every tensor is in *target space*: position t of a [R, L] tensor is token t + 1 of the sequence
(prompt ids + completion ids as sampled), predicted from positions <= t. ``mask`` marks the
completion tokens that are trained on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from posttrain.models.block_attention import AttentionBlock, BlockLayout
from posttrain.models.forward import head_weight, hidden_states
from posttrain.models.logprobs import token_entropy, token_logprobs
from posttrain.types import Rollout


@dataclass
class RolloutBatch:
    """This process's rollouts of one step. R rows, L = longest sequence - 1."""

    input_ids: torch.Tensor  # [R, L + 1]
    position_ids: torch.Tensor  # [R, L + 1]
    lengths: torch.Tensor  # [R] prompt + completion tokens
    completion: torch.Tensor  # [R, L] bool: every sampled completion token
    mask: torch.Tensor  # [R, L] float: completion tokens trained on
    sampler_logp: torch.Tensor  # [R, L] the sampler's logprobs at completion tokens (0 elsewhere)
    rewards: torch.Tensor  # [R] combined reward (0 where invalid)
    valid: torch.Tensor  # [R] bool: the reward is not None
    truncated: torch.Tensor  # [R] bool
    advantages: torch.Tensor | None = None  # [R] (outcome estimators) or [R, L] (GAE)
    returns: torch.Tensor | None = None  # [R, L] the critic's targets (PPO)
    old_values: torch.Tensor | None = None  # [R, L] the critic's values at rollout time (PPO)
    old_logp: torch.Tensor | None = None  # [R, L] trainer logprobs before the update (None: on-policy)
    ref_logp: torch.Tensor | None = None  # [R, L]
    components: list[dict[str, float]] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: torch.Tensor) -> RolloutBatch:
        """A sub-batch (micro-batch) of rows, trimmed to its own longest sequence."""
        width = int(self.lengths[rows].max())

        def cut(name: str) -> torch.Tensor | None:
            t = getattr(self, name)
            if t is None:
                return None
            if t.dim() == 1:
                return t[rows]
            return t[rows][:, : width if name in ("input_ids", "position_ids") else width - 1]

        return RolloutBatch(**{name: cut(name) for name in _TENSORS})

    def to(self, device: torch.device) -> RolloutBatch:
        fields = {name: getattr(self, name) for name in _TENSORS}
        return RolloutBatch(**{k: None if v is None else v.to(device) for k, v in fields.items()},
                            components=self.components)


_TENSORS = ("input_ids", "position_ids", "lengths", "completion", "mask", "sampler_logp", "rewards", "valid",
            "truncated", "advantages", "returns", "old_values", "old_logp", "ref_logp")


def build_batch(rollouts: list[Rollout], scores: list[float | None], pad_id: int, *, mask_truncated: bool
                ) -> RolloutBatch:
    """Right-padded tensors of prompt + completion; invalid rewards and (optionally) truncated
    completions get an all-zero mask (no loss), but stay in the batch for the statistics."""
    width = max(len(r.prompt_ids) + len(r.completion_ids) for r in rollouts)
    rows = len(rollouts)
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    completion = torch.zeros((rows, width - 1), dtype=torch.bool)
    mask = torch.zeros((rows, width - 1))
    sampler = torch.zeros((rows, width - 1))
    for i, r in enumerate(rollouts):
        p, c = len(r.prompt_ids), len(r.completion_ids)
        ids[i, : p + c] = torch.tensor(r.prompt_ids + r.completion_ids)
        completion[i, p - 1 : p - 1 + c] = True
        train = scores[i] is not None and not (mask_truncated and r.truncated)
        mask[i, p - 1 : p - 1 + c] = float(train)
        sampler[i, p - 1 : p - 1 + c] = torch.tensor(r.logprobs)
    return RolloutBatch(
        input_ids=ids, position_ids=torch.arange(width).expand(rows, width).clone(),
        lengths=torch.tensor([len(r.prompt_ids) + len(r.completion_ids) for r in rollouts]),
        completion=completion, mask=mask, sampler_logp=sampler,
        rewards=torch.tensor([0.0 if s is None else float(s) for s in scores]),
        valid=torch.tensor([s is not None for s in scores]), truncated=torch.tensor([r.truncated for r in rollouts]))


@torch.no_grad()
def per_micro_batch(batch: RolloutBatch, micro_batch_size: int,
                    score: Callable[[RolloutBatch], torch.Tensor]) -> torch.Tensor:
    """A no-grad per-token pass [R, L] (old or reference logprobs, old values), computed
    ``micro_batch_size`` rows at a time; ``score`` maps a sub-batch to its [r, l] values."""
    out = torch.zeros_like(batch.mask)
    for rows in torch.arange(batch.rows).split(micro_batch_size):
        values = score(batch.select(rows))
        out[rows, : values.shape[1]] = values.to(out.dtype)
    return out


@dataclass(frozen=True)
class SharedPromptPack:
    """A micro-batch packed into one row, each prompt computed once for the consecutive rows
    that share it: ``[prompt | completion 1 | completion 2 | ... | next prompt ...]``.

    A group's first row (prompt + completion) is one causal block; each further completion is a
    block that attends to the prompt and, causally, to itself, at the positions it has in its own
    sequence (``posttrain.models.block_attention``). Under causal attention every hidden state is
    then exactly that of the separate, padded sequence. ``reads`` [K] are the packed positions
    whose hidden states predict the batch's completion tokens, in the order of
    ``batch.completion``'s True entries (row by row); a group's first completion token is
    predicted by the prompt's last token, which its rows share."""

    input_ids: torch.Tensor  # [1, N]
    position_ids: torch.Tensor  # [1, N]
    blocks: BlockLayout
    reads: torch.Tensor  # [K]


def pack_shared_prompts(batch: RolloutBatch) -> SharedPromptPack:
    completion_lengths = batch.completion.sum(-1).tolist()
    ids: list[int] = []
    positions: list[int] = []
    blocks: list[AttentionBlock] = []
    reads: list[int] = []
    prompt: list[int] | None = None
    start = 0  # where the current prompt sits in the packed row
    for row, c in enumerate(completion_lengths):
        sequence = batch.input_ids[row, : int(batch.lengths[row])].tolist()
        p = len(sequence) - c
        if sequence[:p] == prompt and c > 0:
            blocks.append(AttentionBlock(len(ids), len(ids) + c, ((start, start + p),)))
            reads += [start + p - 1, *range(len(ids), len(ids) + c - 1)]
            ids += sequence[p:]
            positions += range(p, p + c)
        elif sequence[:p] != prompt:
            prompt, start = sequence[:p], len(ids)
            blocks.append(AttentionBlock(start, start + p + c))
            reads += range(start + p - 1, start + p - 1 + c)
            ids += sequence
            positions += range(p + c)
    device = batch.input_ids.device
    return SharedPromptPack(torch.tensor([ids], device=device), torch.tensor([positions], device=device),
                            BlockLayout(tuple(blocks)), torch.tensor(reads, dtype=torch.long, device=device))


def policy_logprobs(model: torch.nn.Module, batch: RolloutBatch, *, temperature: float, chunk: int,
                    entropy: bool = False, share_prompt: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The trainer's logprobs of the sampled tokens [R, L] (0 off the mask), with gradient when
    enabled; optionally the per-token entropy [R, L] (no gradient). The same chunked code path as
    every other loss, at the sampler's temperature. ``share_prompt``: one packed row in which
    rows with the same prompt share one copy of it (`SharedPromptPack`; the same values)."""
    targets = batch.input_ids[:, 1:]
    # Score every sampled token, even in rows masked out of the loss (for the metrics).
    keep = batch.completion
    if share_prompt:
        pack = pack_shared_prompts(batch)
        hidden = hidden_states(model, pack.input_ids, pack.position_ids, pack.blocks)[0, pack.reads]
    else:
        hidden = hidden_states(model, batch.input_ids, batch.position_ids)[:, :-1][keep]
    weight = head_weight(model)
    values = token_logprobs(hidden, weight, targets[keep], chunk=chunk, temperature=temperature)
    out = torch.zeros(targets.shape, dtype=values.dtype, device=values.device)
    out = out.masked_scatter(keep, values)
    ent = None
    if entropy:
        ent = torch.zeros(targets.shape, dtype=torch.float32, device=values.device)
        ent[keep] = token_entropy(hidden.detach(), weight.detach(), chunk=chunk, temperature=temperature)
    return out, ent
