"""Loss aggregation: hand cases, micro-batch invariance (values and gradients), names.

The end-to-end parity with TRL 1.16's ``loss_type`` values (grpo, bnpo, dr_grpo, dapo) runs
TRL's own ``GRPOTrainer._compute_loss`` and lives in ``test_policy.py``; the mapping table is in
the docstring of ``posttrain.losses.aggregation``.
"""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.errors import UserError
from posttrain.losses.aggregation import AGGREGATIONS, GlobalNormalisers, aggregate, masked_mean
from posttrain.losses.policy import ppo_clip_loss

MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "constant-norm"]


def hand_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Row 0: losses 1, 2, 3 (3 valid tokens); row 1: loss 4 (1 valid token, then padding whose
    loss is NaN - it must never leak)."""
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, float("nan"), 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    return loss, mask


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        # (1 + 2 + 3 + 4) / 4 tokens
        ("token-mean", 2.5),
        # (mean(1, 2, 3) + mean(4)) / 2 sequences = (2 + 4) / 2
        ("seq-mean-token-mean", 3.0),
        # (6 + 4) / 2 sequences
        ("seq-mean-token-sum", 5.0),
        # (6 + 4) / (max length 3 x 2 rows)
        ("constant-norm", 10.0 / 6.0),
    ],
)
def test_hand_cases(mode: str, expected: float) -> None:
    loss, mask = hand_batch()
    norm = GlobalNormalisers.from_masks([mask], max_completion_length=3)
    assert norm == GlobalNormalisers(tokens=4.0, sequences=2.0, constant=6.0)
    assert aggregate(loss, mask, norm, mode).item() == pytest.approx(expected, abs=1e-7)


def test_from_masks_skips_empty_rows_for_sequences_but_not_for_the_constant() -> None:
    masks = [torch.tensor([[1, 1, 0], [0, 0, 0]]), torch.tensor([[1, 0, 0]])]
    norm = GlobalNormalisers.from_masks(masks, max_completion_length=5)
    assert (norm.tokens, norm.sequences, norm.constant) == (3.0, 2.0, 15.0)


def random_batch(seed: int = 0, rows: int = 8, tokens: int = 7) -> tuple[torch.Tensor, ...]:
    """Variable lengths, one empty row, float64 so 1e-6 is far above rounding."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, tokens + 1, (rows,), generator=gen)
    lengths[3] = 0
    mask = (torch.arange(tokens).unsqueeze(0) < lengths.unsqueeze(1)).to(torch.float64)
    logp = -torch.rand(rows, tokens, generator=gen, dtype=torch.float64)
    old_logp = logp + 0.3 * torch.randn(rows, tokens, generator=gen, dtype=torch.float64)
    advantages = torch.randn(rows, generator=gen, dtype=torch.float64)
    return logp, old_logp, advantages, mask


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pieces", [1, 2, 4])
def test_micro_batches_sum_to_the_full_batch(mode: str, pieces: int) -> None:
    """Split the rows into 1, 2 or 4 micro-batches, aggregate each with the *global* normalisers,
    sum: the value and the gradient equal the full batch's to 1e-6."""
    logp, old_logp, advantages, mask = random_batch()
    norm = GlobalNormalisers.from_masks([mask], max_completion_length=mask.shape[1])
    # Counting over the pieces gives the same normalisers as counting over the whole.
    assert GlobalNormalisers.from_masks(mask.chunk(pieces), max_completion_length=mask.shape[1]) == norm

    full_param = logp.clone().requires_grad_()
    full_loss, _ = ppo_clip_loss(full_param, old_logp, advantages, mask)
    full = aggregate(full_loss, mask, norm, mode)
    full.backward()

    split_param = logp.clone().requires_grad_()
    total = torch.zeros((), dtype=torch.float64)
    for part_logp, part_old, part_adv, part_mask in zip(
        split_param.chunk(pieces), old_logp.chunk(pieces), advantages.chunk(pieces), mask.chunk(pieces)
    ):
        part_loss, _ = ppo_clip_loss(part_logp, part_old, part_adv, part_mask)
        part = aggregate(part_loss, part_mask, norm, mode)
        part.backward()  # gradient accumulation: backward per micro-batch
        total = total + part.detach()

    assert total.item() == pytest.approx(full.item(), abs=1e-6)
    torch.testing.assert_close(split_param.grad, full_param.grad, atol=1e-6, rtol=0)


def test_per_micro_batch_token_mean_is_not_split_invariant() -> None:
    """Why the normalisers are global: TRL's ``bnpo`` divides each micro-batch by its own token
    count, then by the accumulation steps. With unequal token counts that differs from the full
    batch's token mean, which ours reproduces."""
    loss = torch.tensor([[1.0, 1.0, 1.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    steps = 2
    bnpo = sum(
        (part_loss * part_mask).sum() / part_mask.sum() / steps
        for part_loss, part_mask in zip(loss.chunk(steps), mask.chunk(steps))
    )
    norm = GlobalNormalisers.from_masks([mask])
    ours = sum(aggregate(lp, mp, norm, "token-mean") for lp, mp in zip(loss.chunk(steps), mask.chunk(steps)))
    assert bnpo.item() == pytest.approx((1.0 + 4.0) / 2)  # mean of micro-batch means
    assert ours.item() == pytest.approx(7.0 / 4)  # token mean of the full batch


def test_nothing_to_train_gives_zero_not_nan() -> None:
    loss = torch.tensor([[float("nan"), 1.0]], requires_grad=True)
    mask = torch.zeros(1, 2)
    norm = GlobalNormalisers.from_masks([mask], max_completion_length=2)
    for mode in MODES:
        value = aggregate(loss, mask, norm, mode)
        assert value.item() == 0.0
    tensor_norm = GlobalNormalisers(tokens=torch.tensor(0.0), sequences=torch.tensor(0.0))
    assert aggregate(loss, mask, tensor_norm, "token-mean").item() == 0.0


def test_tensor_normalisers_match_float_normalisers() -> None:
    loss, mask = hand_batch()
    tensor_norm = GlobalNormalisers(tokens=torch.tensor(4.0), sequences=torch.tensor(2.0), constant=torch.tensor(6.0))
    float_norm = GlobalNormalisers(tokens=4.0, sequences=2.0, constant=6.0)
    for mode in MODES:
        assert aggregate(loss, mask, tensor_norm, mode).item() == pytest.approx(
            aggregate(loss, mask, float_norm, mode).item()
        )


def test_constant_norm_needs_a_constant() -> None:
    loss, mask = hand_batch()
    with pytest.raises(ValueError, match="max_completion_length"):
        aggregate(loss, mask, GlobalNormalisers(tokens=4.0, sequences=2.0), "constant-norm")


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("token_mean", "token-mean"),
        ("seq_mean_token_mean", "seq-mean-token-mean"),
        ("seq_mean_token_sum", "seq-mean-token-sum"),
        ("constant_norm", "constant-norm"),
        ("seq-mean-token-sum-norm", "constant-norm"),  # verl
        ("seq_mean_token_sum_norm", "constant-norm"),
    ],
)
def test_aliases(alias: str, name: str) -> None:
    assert AGGREGATIONS.canonical(alias) == name
    assert AGGREGATIONS.get(alias) is AGGREGATIONS.get(name)


def test_unknown_mode_lists_the_valid_names() -> None:
    loss, mask = hand_batch()
    with pytest.raises(UserError) as err:
        aggregate(loss, mask, GlobalNormalisers(4.0, 2.0), "token-meen")
    text = str(err.value)
    assert "token-mean" in text and "seq-mean-token-mean" in text and "constant-norm" in text


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        aggregate(torch.zeros(2, 3), torch.ones(2, 4), GlobalNormalisers(1.0, 1.0), "token-mean")


def test_masked_mean_ignores_nan_in_masked_entries() -> None:
    values = torch.tensor([[1.0, float("nan")], [3.0, float("inf")]])
    mask = torch.tensor([[1, 0], [1, 0]])
    assert masked_mean(values, mask).item() == 2.0
    torch.testing.assert_close(masked_mean(values, mask, dim=-1), torch.tensor([1.0, 3.0]))
    assert not math.isnan(masked_mean(values, torch.zeros_like(mask)).item())
