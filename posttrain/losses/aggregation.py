"""Loss aggregation: per-token loss [B, T] -> one scalar, normalised over the *global* batch.

Shapes (letters from ``posttrain.types``): B rows, T tokens per row. ``per_token_loss`` [B, T] is
what a loss in ``posttrain.losses.policy`` returns; ``mask`` [B, T] is 1 (or True) where a token
is trained on.

Why global normalisers: an optimizer step sees one *global* batch split into micro-batches (gradient
accumulation) and across processes. If each micro-batch divided by its own token count, the loss
and its gradient would change with the micro-batch size (TRL's ``bnpo`` does this). Here the caller
counts once, over every micro-batch on every process, and passes the totals in
``GlobalNormalisers``; each micro-batch's aggregate is then a *share* of the full-batch value, so
summing the micro-batch losses (and their gradients) gives exactly the full-batch value. Under DDP,
whose all-reduce *averages* gradients over processes, the caller multiplies the summed loss by
the number of processes (or equivalently divides the normalisers by it) - that choice belongs to
the loop, not here.

Modes (our name / underscore spelling / peers' names):

==========================  =============================  ======================================
ours                        formula (sums over the global  peers
                            batch; n_i = valid tokens of
                            row i)
==========================  =============================  ======================================
``token-mean``              sum_i,t l_it / tokens           verl ``token-mean``; TRL ``dapo``
                                                           (TRL ``bnpo`` uses the micro-batch's
                                                           own count, see below)
``seq-mean-token-mean``     sum_i (sum_t l_it / n_i)        verl ``seq-mean-token-mean``;
                            / sequences                    TRL ``grpo`` and ``sapo``
``seq-mean-token-sum``      sum_i,t l_it / sequences        verl ``seq-mean-token-sum``;
                                                           TRL ``luspo``
``constant-norm``           sum_i,t l_it / constant         TRL ``dr_grpo`` with constant =
                                                           max_completion_length x rows;
                                                           verl ``seq-mean-token-sum-norm``
                                                           with constant = T (its loss_scale_factor)
==========================  =============================  ======================================

Mapping from TRL 1.16 ``GRPOConfig.loss_type`` (read from ``GRPOTrainer._compute_loss``; the
per-token part of those losses is ``policy.ppo_clip_loss``):

- ``grpo``: ``((l * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()`` per micro-batch, divided by the
  accumulation steps = our ``seq-mean-token-mean`` when every micro-batch holds the same number of
  rows (TRL guarantees it: fixed per-device batch size) and no row is entirely masked (TRL counts
  such rows in its mean, we do not). The "GRPO" of the DeepSeekMath paper (eq. 3,
  1/G sum_i 1/|o_i| sum_t).
- ``bnpo``: ``(l * m).sum() / m.sum()`` per micro-batch / accumulation steps. Equals our
  ``token-mean`` only when every micro-batch holds the same number of valid tokens; otherwise it
  is a mean of micro-batch means. We do not reproduce that dependence on the split on purpose.
- ``dr_grpo``: ``(l * m).sum() / (rows_in_micro_batch * max_completion_length)`` / accumulation
  steps = our ``constant-norm`` with ``constant = max_completion_length * rows`` (all rows, which
  ``GlobalNormalisers.from_masks(..., max_completion_length=...)`` builds).
- ``dapo`` (TRL's default; also ``cispo``, ``vespo``): ``(l * m).sum() / num_items_in_batch``
  with the count gathered over processes and the generation batch = our ``token-mean``.
- ``luspo``: ``(l * m).sum(-1).mean()`` = our ``seq-mean-token-sum``.

Aggregation functions return the scalar loss only (no stats: they add nothing to observe).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from posttrain.registry import Registry

Number = float | torch.Tensor


@dataclass(frozen=True)
class GlobalNormalisers:
    """Counts over one optimizer step's global batch (every micro-batch, every process).

    ``tokens``: valid tokens (sum of the masks). ``sequences``: rows with at least one valid token
    (a row whose mask is all zero - an overlong-filtered completion, say - carries no loss and is
    not counted; TRL and verl count every row, which only differs when such rows exist).
    ``constant``: the divisor of ``constant-norm`` (Dr. GRPO: max completion length x rows); None
    when that mode is not used. Values may be floats or 0-d tensors (after an all-reduce).
    """

    tokens: Number
    sequences: Number
    constant: Number | None = None

    @classmethod
    def from_masks(
        cls, masks: Iterable[torch.Tensor], *, max_completion_length: int | None = None
    ) -> GlobalNormalisers:
        """Count over the masks [B_k, T_k] of all micro-batches of this process.

        With several processes, all-reduce (sum) ``tokens``, ``sequences`` and ``constant`` of the
        result before use. ``constant`` is ``max_completion_length`` x all rows (empty rows
        included, as in TRL's ``dr_grpo``) when ``max_completion_length`` is given.
        """
        tokens = 0.0
        sequences = 0.0
        rows = 0
        for mask in masks:
            mask = mask.detach()
            tokens += float(mask.sum())
            sequences += float((mask.sum(-1) > 0).sum())
            rows += mask.shape[0]
        constant = None if max_completion_length is None else float(max_completion_length * rows)
        return cls(tokens=tokens, sequences=sequences, constant=constant)


class AggregationFn(Protocol):
    def __call__(
        self, per_token_loss: torch.Tensor, mask: torch.Tensor, norm: GlobalNormalisers
    ) -> torch.Tensor: ...


AGGREGATIONS: Registry[AggregationFn] = Registry("loss aggregation")


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``values`` where ``mask`` is set; masked entries never contribute (even NaN/inf)."""
    kept = torch.where(mask.bool(), values, torch.zeros_like(values))
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over the entries where ``mask`` is set; 0 where there are none (never NaN)."""
    count = mask.to(values.dtype).sum() if dim is None else mask.to(values.dtype).sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1.0)


def _divide(total: torch.Tensor, normaliser: Number) -> torch.Tensor:
    # A zero count means nothing in the global batch is trained on, so ``total`` is 0 too: return 0
    # (and a zero gradient), never NaN.
    if isinstance(normaliser, torch.Tensor):
        normaliser = normaliser.to(total.dtype)
        return total / torch.where(normaliser > 0, normaliser, torch.ones_like(normaliser))
    return total / normaliser if normaliser > 0 else total


def _check(per_token_loss: torch.Tensor, mask: torch.Tensor) -> None:
    if per_token_loss.dim() != 2 or per_token_loss.shape != mask.shape:
        raise ValueError(
            f"per_token_loss {tuple(per_token_loss.shape)} and mask {tuple(mask.shape)} must both be [B, T]"
        )


@AGGREGATIONS.register("token-mean", aliases=("token_mean",))
def token_mean(per_token_loss: torch.Tensor, mask: torch.Tensor, norm: GlobalNormalisers) -> torch.Tensor:
    """Sum of the valid tokens' losses / valid tokens in the global batch (DAPO §3.3, token-level
    policy-gradient loss: every token weighs the same, whatever the length of its sequence)."""
    _check(per_token_loss, mask)
    return _divide(masked_sum(per_token_loss, mask), norm.tokens)


@AGGREGATIONS.register("seq-mean-token-mean", aliases=("seq_mean_token_mean",))
def seq_mean_token_mean(
    per_token_loss: torch.Tensor, mask: torch.Tensor, norm: GlobalNormalisers
) -> torch.Tensor:
    """Mean over each sequence's valid tokens, then mean over the global batch's sequences.

    The GRPO objective as written (Shao et al. 2024, eq. 3: 1/G sum_i 1/|o_i| sum_t). A row is whole
    inside one micro-batch, so its own token count is local; only the sequence count is global.
    """
    _check(per_token_loss, mask)
    per_row = masked_sum(per_token_loss, mask, dim=-1) / mask.to(per_token_loss.dtype).sum(-1).clamp(min=1.0)
    return _divide(per_row.sum(), norm.sequences)


@AGGREGATIONS.register("seq-mean-token-sum", aliases=("seq_mean_token_sum",))
def seq_mean_token_sum(
    per_token_loss: torch.Tensor, mask: torch.Tensor, norm: GlobalNormalisers
) -> torch.Tensor:
    """Sum over each sequence's valid tokens, then mean over the global batch's sequences."""
    _check(per_token_loss, mask)
    return _divide(masked_sum(per_token_loss, mask), norm.sequences)


@AGGREGATIONS.register(
    "constant-norm",
    aliases=("constant_norm", "seq-mean-token-sum-norm", "seq_mean_token_sum_norm"),
)
def constant_norm(per_token_loss: torch.Tensor, mask: torch.Tensor, norm: GlobalNormalisers) -> torch.Tensor:
    """Sum of the valid tokens' losses / a constant (Liu et al. 2025, Dr. GRPO §3: replace the
    per-sequence 1/|o_i| by a constant, e.g. max completion length x sequences, so no length bias).

    verl's ``seq-mean-token-sum-norm`` is this mode with constant = T (its response length).
    """
    _check(per_token_loss, mask)
    if norm.constant is None:
        raise ValueError(
            "constant-norm needs GlobalNormalisers.constant (e.g. max_completion_length x rows); "
            "build it with GlobalNormalisers.from_masks(..., max_completion_length=...)"
        )
    return _divide(masked_sum(per_token_loss, mask), norm.constant)


def aggregate(
    per_token_loss: torch.Tensor, mask: torch.Tensor, norm: GlobalNormalisers, mode: str
) -> torch.Tensor:
    """Aggregate with the mode named ``mode`` (any registered name or alias)."""
    return AGGREGATIONS.get(mode)(per_token_loss, mask, norm)
