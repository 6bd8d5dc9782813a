"""Reward-model and PRM losses against values worked out by hand, and their registry."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.errors import UserError
from posttrain.losses.prm import prm_step_loss
from posttrain.losses.reward_model import (
    REWARD_LOSSES,
    bradley_terry_loss,
    get_reward_loss,
    regression_loss,
)


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_bradley_terry_by_hand():
    # -log sigmoid(1) = log(1 + e^-1); -log sigmoid(-1) = log(1 + e)
    losses, stats = bradley_terry_loss(_t(2.0, 0.0), _t(1.0, 1.0))
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-1)), math.log1p(math.e)], abs=1e-12)
    assert stats["accuracy"].tolist() == [1.0, 0.0]
    assert stats["margin"].tolist() == [1.0, -1.0]


def test_bradley_terry_margin_and_centring_by_hand():
    # margins 0.5 and -1: logits 1 - 0.5 = 0.5 and -1 + 1 = 0; centring 0.1 * (r_c + r_r)^2 = 0.9 and 0.1
    losses, stats = bradley_terry_loss(_t(2.0, 0.0), _t(1.0, 1.0), _t(0.5, -1.0), center_rewards_coefficient=0.1)
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-0.5)) + 0.9, math.log(2) + 0.1], abs=1e-12)
    assert stats["margin"].tolist() == [1.0, -1.0]  # the reward gap, not the margin-shifted logit


def test_bradley_terry_gradient_by_hand():
    chosen, rejected = _t(2.0).requires_grad_(), _t(1.0).requires_grad_()
    losses, _ = bradley_terry_loss(chosen, rejected, None, center_rewards_coefficient=0.5)
    losses.sum().backward()
    # d/dr_c: -sigmoid(-(r_c - r_r)) + 2c(r_c + r_r) = -sigmoid(-1) + 3
    assert float(chosen.grad) == pytest.approx(-1 / (1 + math.e) + 3.0, abs=1e-12)
    assert float(rejected.grad) == pytest.approx(1 / (1 + math.e) + 3.0, abs=1e-12)


def test_margin_is_a_constant():
    chosen, margin = _t(1.0).requires_grad_(), _t(0.5).requires_grad_()
    losses, _ = bradley_terry_loss(chosen, _t(0.0), margin)
    losses.sum().backward()
    assert margin.grad is None and chosen.grad is not None


def test_regression_by_hand():
    losses, stats = regression_loss(_t(1.0, 3.0, 0.0), _t(2.0, 3.0, 4.0))
    assert losses.tolist() == [1.0, 0.0, 16.0]
    assert stats["abs_error"].tolist() == [1.0, 0.0, 4.0]
    scaled, stats = regression_loss(_t(1.0, 0.0), _t(2.0, 4.0), scale=2.0)
    assert scaled.tolist() == [0.25, 4.0]
    assert stats["abs_error"].tolist() == [1.0, 4.0]  # in the target's units


def test_prm_step_loss_soft_and_hard_labels_by_hand():
    # BCE(logit 0, label 0.5) = log 2; BCE(2, 1) = log(1 + e^-2); BCE(3, 0) = log(1 + e^3)
    losses, stats = prm_step_loss(_t(0.0, 2.0, 3.0), _t(0.5, 1.0, 0.0))
    assert losses.tolist() == pytest.approx([math.log(2), math.log1p(math.exp(-2)), math.log1p(math.exp(3))],
                                            abs=1e-12)
    assert stats["accuracy"].tolist() == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        prm_step_loss(_t(0.0), _t(1.5))


def test_half_precision_rewards_are_computed_in_fp32():
    losses, _ = bradley_terry_loss(torch.tensor([2.0], dtype=torch.bfloat16), torch.tensor([1.0], dtype=torch.bfloat16))
    assert losses.dtype == torch.float32


def test_registry_names_aliases_and_misses():
    assert get_reward_loss("bt").name == "bradley_terry" and get_reward_loss("pairwise").pairwise
    assert not get_reward_loss("mse").pairwise
    assert get_reward_loss("bradley_terry").params == {"center_rewards_coefficient": 0.0}
    with pytest.raises(UserError, match="did you mean 'bradley_terry'"):
        get_reward_loss("bradley_terri", "stages.rm.loss.name")
    assert set(REWARD_LOSSES.names()) == {"bradley_terry", "regression"}
