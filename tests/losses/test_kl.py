"""KL estimators (hand values, sign, exact expectations), KL penalties and the controllers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from posttrain.errors import UserError
from posttrain.losses.kl import (
    KL_CONTROLLERS,
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_penalty_in_loss,
    kl_penalty_in_reward,
)

F64 = torch.float64
LOG2 = math.log(2.0)


def test_hand_values() -> None:
    """Policy gives the sampled token p = 0.5, the reference q = 0.25: log r = log(q/p) = -log 2.
    k1 = -log r = log 2 = 0.6931;  k2 = (log 2)^2 / 2 = 0.2402;  k3 = (r - 1) - log r = -0.5 + log 2
    = 0.1931. Swapped (p = 0.25, q = 0.5, r = 2): k1 = -log 2 (negative: k1 can be), k2 = 0.2402,
    k3 = 1 - log 2 = 0.3069."""
    half, quarter = torch.tensor([math.log(0.5)], dtype=F64), torch.tensor([math.log(0.25)], dtype=F64)
    assert kl_k1(half, quarter).item() == pytest.approx(LOG2)
    assert kl_k2(half, quarter).item() == pytest.approx(0.5 * LOG2**2)
    assert kl_k3(half, quarter).item() == pytest.approx(-0.5 + LOG2)
    assert kl_k1(quarter, half).item() == pytest.approx(-LOG2)
    assert kl_k2(quarter, half).item() == pytest.approx(0.5 * LOG2**2)
    assert kl_k3(quarter, half).item() == pytest.approx(1.0 - LOG2)
    assert kl_k3(half, quarter).item() == pytest.approx(0.1931, abs=1e-4)


def test_k3_and_k2_are_never_negative() -> None:
    gen = torch.Generator().manual_seed(0)
    logp = -torch.rand(10_000, generator=gen) * 10
    for scale in [1e-9, 1e-4, 1.0, 10.0]:
        ref_logp = logp + scale * torch.randn(10_000, generator=gen)
        assert (kl_k3(logp, ref_logp) >= 0).all(), scale
        assert (kl_k2(logp, ref_logp) >= 0).all(), scale


def test_k1_and_k3_expectations_are_the_exact_kl() -> None:
    """Enumerate a categorical: sum_x p(x) k(x) = KL(p || q) for k1 and k3 (unbiased); k2 is
    biased (close for nearby distributions)."""
    gen = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(50, generator=gen, dtype=F64), -1)
    q = torch.softmax(torch.log(p) + 0.3 * torch.randn(50, generator=gen, dtype=F64), -1)
    exact = (p * (p.log() - q.log())).sum()
    for estimator in (kl_k1, kl_k3):
        assert (p * estimator(p.log(), q.log())).sum().item() == pytest.approx(exact.item(), rel=1e-10)
    k2_mean = (p * kl_k2(p.log(), q.log())).sum().item()
    assert k2_mean != pytest.approx(exact.item(), rel=1e-6)
    assert k2_mean == pytest.approx(exact.item(), rel=0.2)


def test_registry_and_peer_aliases() -> None:
    assert KL_ESTIMATORS.names() == ["k1", "k2", "k3"]
    assert KL_ESTIMATORS.get("kl") is kl_k1  # verl kl_penalty names
    assert KL_ESTIMATORS.get("mse") is kl_k2
    assert KL_ESTIMATORS.get("low_var_kl") is kl_k3
    with pytest.raises(UserError, match="valid names: k1, k2, k3"):
        KL_ESTIMATORS.get("k4")


def test_kl_in_the_reward_hand_case() -> None:
    """k1 per token = logp - ref = (0.1, -0.2, 0.3); beta 0.5; token rewards (0, 0, 1):
    (0 - 0.05, 0 + 0.1, 1 - 0.15) = (-0.05, 0.1, 0.85); the masked 4th token keeps its reward."""
    logp = torch.tensor([[-1.0, -1.0, -1.0, -1.0]], dtype=F64, requires_grad=True)
    ref_logp = torch.tensor([[-1.1, -0.8, -1.3, -9.0]], dtype=F64)
    token_rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0]])
    rewards, stats = kl_penalty_in_reward(token_rewards, logp, ref_logp, mask, beta=0.5)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1, 0.85, 0.0]], dtype=F64))
    assert not rewards.requires_grad
    assert stats["kl"].item() == pytest.approx(0.2 / 3)
    assert stats["kl_seq"].item() == pytest.approx(0.2)


def test_kl_in_the_loss_value_and_gradient() -> None:
    """loss + beta k3; d k3 / d logp = 1 - exp(ref - logp); masked tokens are 0."""
    logp = torch.tensor([[-1.0, -2.0, -0.5]], dtype=F64, requires_grad=True)
    ref_logp = torch.tensor([[-1.5, -1.0, float("nan")]], dtype=F64)
    mask = torch.tensor([[1, 1, 0]])
    per_token_loss = torch.tensor([[0.3, -0.2, 7.0]], dtype=F64)
    beta = 0.1
    loss, stats = kl_penalty_in_loss(per_token_loss, logp, ref_logp, mask, beta)
    k3 = kl_k3(logp.detach()[:, :2], ref_logp[:, :2])
    torch.testing.assert_close(loss[:, :2], per_token_loss[:, :2] + beta * k3)
    assert loss[0, 2].item() == 0.0
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    expected = beta * (1 - torch.exp(ref_logp[:, :2] - logp.detach()[:, :2]))
    torch.testing.assert_close(grad[:, :2], expected)
    assert grad[0, 2].item() == 0.0
    assert stats["kl"].item() == pytest.approx(k3.mean().item())


def test_adaptive_controller_rule() -> None:
    """target 0.1: above 2 x 0.1 = 0.2 -> x 1.5; below 0.1 / 2 = 0.05 -> / 1.5; else unchanged
    (both thresholds strict)."""
    controller = AdaptiveKLController(beta=1.0, target=0.1)
    observed = [0.3, 0.25, 0.2, 0.1, 0.05, 0.04, 0.01, 0.06]
    expected = [1.5, 2.25, 2.25, 2.25, 2.25, 1.5, 1.0, 1.0]
    assert [controller.update(kl) for kl in observed] == expected
    assert controller.beta == 1.0 and controller.updates == len(observed)


def test_adaptive_controller_resume_is_exact() -> None:
    observed = [0.5, 0.013, 0.33, 0.7, 0.02, 0.11, 0.9, 0.001]
    uninterrupted = AdaptiveKLController(beta=0.05, target=0.1)
    betas = [uninterrupted.update(kl) for kl in observed]

    first = AdaptiveKLController(beta=0.05, target=0.1)
    for kl in observed[:3]:
        first.update(kl)
    saved = json.loads(json.dumps(first.state_dict()))  # a checkpoint on disk
    resumed = AdaptiveKLController(beta=0.05, target=0.1)
    resumed.load_state_dict(saved)
    assert resumed.state_dict() == first.state_dict()
    assert [resumed.update(kl) for kl in observed[3:]] == betas[3:]
    assert resumed.state_dict() == uninterrupted.state_dict()


def test_controller_state_mismatches_are_errors() -> None:
    adaptive = AdaptiveKLController(beta=0.05, target=0.1)
    with pytest.raises(ValueError, match="target"):
        adaptive.load_state_dict(AdaptiveKLController(beta=0.05, target=0.2).state_dict())
    with pytest.raises(ValueError, match="fixed"):
        adaptive.load_state_dict(FixedKLController(0.05).state_dict())
    with pytest.raises(ValueError, match="beta"):
        FixedKLController(0.05).load_state_dict(FixedKLController(0.1).state_dict())
    with pytest.raises(ValueError):
        AdaptiveKLController(beta=0.0, target=0.1)


def test_fixed_controller_has_the_same_interface() -> None:
    controller = FixedKLController(0.04)
    assert [controller.update(kl) for kl in [10.0, 0.0]] == [0.04, 0.04]
    restored = FixedKLController(0.04)
    restored.load_state_dict(json.loads(json.dumps(controller.state_dict())))
    assert restored.state_dict() == controller.state_dict() == {"kind": "fixed", "beta": 0.04, "updates": 2}


def test_controller_registry() -> None:
    assert KL_CONTROLLERS.names() == ["adaptive", "fixed"]
    assert isinstance(KL_CONTROLLERS.get("adaptive")(beta=0.1, target=6.0), AdaptiveKLController)
    assert KL_CONTROLLERS.get("fixed")(0.1).beta == 0.1
