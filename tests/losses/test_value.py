"""The critic's pure functions: the clipped value loss by hand, its masking and global
normalisation, the explained variance by hand, and whitening with moments summed elsewhere."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.losses.advantages import masked_whiten, whiten
from posttrain.losses.aggregation import GlobalNormalisers, aggregate
from posttrain.losses.value import explained_variance, value_loss, value_moments

F64 = torch.float64


def test_value_loss_hand_case() -> None:
    """clip 0.5, returns 0, old values 2.
    V = 1: unclipped (1 - 0)^2 = 1; clipped V = 2 - 0.5 = 1.5 -> 2.25; max 2.25 -> loss 1.125,
           gradient 0 (the clipped value does not move with V).
    V = 3: unclipped 9; clipped V = 2.5 -> 6.25; max 9 -> loss 4.5, gradient (V - R) = 3.
    Without clipping: 0.5 and 4.5, gradients 1 and 3."""
    values = torch.tensor([[1.0, 3.0]], dtype=F64, requires_grad=True)
    old_values = torch.tensor([[2.0, 2.0]], dtype=F64)
    returns = torch.zeros(1, 2, dtype=F64)
    mask = torch.ones(1, 2)
    loss, stats = value_loss(values, old_values, returns, mask, clip=0.5)
    (grad,) = torch.autograd.grad(loss.sum(), values)
    torch.testing.assert_close(loss, torch.tensor([[1.125, 4.5]], dtype=F64))
    torch.testing.assert_close(grad, torch.tensor([[0.0, 3.0]], dtype=F64))
    assert stats["value_clip_frac"].item() == pytest.approx(0.5)
    assert stats["value_error"].item() == pytest.approx(5.0)  # (1 + 9) / 2
    loss, _ = value_loss(values, old_values, returns, mask, clip=None)
    (grad,) = torch.autograd.grad(loss.sum(), values)
    torch.testing.assert_close(loss, torch.tensor([[0.5, 4.5]], dtype=F64))
    torch.testing.assert_close(grad, torch.tensor([[1.0, 3.0]], dtype=F64))


def test_value_loss_inside_the_clip_is_the_plain_error() -> None:
    """V = 2.1, V_old = 2, R = 3, clip 0.2: V moved 0.1 < 0.2, both branches equal 0.81 -> 0.405,
    gradient V - R = -0.9; nothing counted as clipped."""
    values = torch.tensor([[2.1]], dtype=F64, requires_grad=True)
    loss, stats = value_loss(values, torch.tensor([[2.0]], dtype=F64), torch.tensor([[3.0]], dtype=F64),
                             torch.ones(1, 1), clip=0.2)
    (grad,) = torch.autograd.grad(loss.sum(), values)
    assert loss.item() == pytest.approx(0.405)
    assert grad.item() == pytest.approx(-0.9)
    assert stats["value_clip_frac"].item() == 0.0


def test_value_loss_masks_padding_even_when_it_is_nan() -> None:
    values = torch.tensor([[1.0, math.nan]], dtype=F64, requires_grad=True)
    returns = torch.tensor([[0.0, math.inf]], dtype=F64)
    loss, stats = value_loss(values, torch.zeros(1, 2, dtype=F64), returns, torch.tensor([[1.0, 0.0]]), clip=0.2)
    (grad,) = torch.autograd.grad(loss.sum(), values)
    assert loss[0, 1] == 0 and grad[0, 1] == 0 and torch.isfinite(grad).all()
    assert stats["value_mean"].item() == 1.0


def test_value_loss_micro_batches_sum_to_the_full_batch_under_global_normalisers() -> None:
    """Same global normalisation as the policy loss: two micro-batch shares = the full-batch loss."""
    gen = torch.Generator().manual_seed(0)
    values, old, returns = (torch.randn(4, 5, generator=gen, dtype=F64) for _ in range(3))
    mask = (torch.arange(5) < torch.tensor([5, 3, 1, 4]).unsqueeze(1)).to(F64)
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        norm = GlobalNormalisers.from_masks([mask])
        full = aggregate(value_loss(values, old, returns, mask, clip=0.3)[0], mask, norm, mode)
        parts = sum(aggregate(value_loss(values[r], old[r], returns[r], mask[r], clip=0.3)[0], mask[r], norm, mode)
                    for r in (slice(0, 1), slice(1, 4)))
        torch.testing.assert_close(parts, full)


def test_explained_variance_hand_case() -> None:
    """R = (1, 2, 3), V = (1, 2, 2) (a padded fourth token ignored): R - V = (0, 0, 1).
    Var(R) = 2/3, Var(R - V) = 1/3 - 1/9 = 2/9 -> EV = 1 - (2/9)/(2/3) = 2/3."""
    returns = torch.tensor([[1.0, 2.0, 3.0, 50.0]])
    values = torch.tensor([[1.0, 2.0, 2.0, -7.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    moments = value_moments(values, returns, mask)
    assert moments["tokens"] == 3
    assert explained_variance(moments) == pytest.approx(2 / 3)
    assert explained_variance(value_moments(returns, returns, mask)) == pytest.approx(1.0)
    assert math.isnan(explained_variance(value_moments(values, torch.ones(1, 4), mask)))  # constant returns


def test_explained_variance_from_summed_parts_equals_the_whole() -> None:
    gen = torch.Generator().manual_seed(1)
    values, returns = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    mask = torch.rand(6, 4, generator=gen) > 0.3
    a, b = value_moments(values[:2], returns[:2], mask[:2]), value_moments(values[2:], returns[2:], mask[2:])
    whole = explained_variance(value_moments(values, returns, mask))
    assert explained_variance({k: a[k] + b[k] for k in a}) == pytest.approx(whole, rel=1e-9)


def test_whiten_with_given_moments_equals_masked_whiten() -> None:
    gen = torch.Generator().manual_seed(2)
    values = torch.randn(3, 5, generator=gen, dtype=F64) * 3 + 1
    mask = (torch.arange(5) < torch.tensor([5, 2, 4]).unsqueeze(1)).to(F64)
    kept = values[mask.bool()]
    torch.testing.assert_close(whiten(values, mask, kept.mean(), kept.var()), masked_whiten(values, mask))
