"""KTO and unpaired APO: hand-derived values and properties.

Hand batch (beta = 0.5, z0 = 1):

    example 0: desirable,   policy -2, ref -5  ->  r = +3:  1 - s(0.5 (3 - 1))    = 1 - s(1)
    example 1: undesirable, policy -6, ref -5  ->  r = -1:  1 - s(0.5 (1 - (-1))) = 1 - s(1)
    example 2: undesirable, policy -4, ref -7  ->  r = +3:  1 - s(0.5 (1 - 3))    = 1 - s(-1)
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.losses.kto import (
    UNPAIRED_LOSSES,
    apo_zero_unpaired_loss,
    kl_completion_order,
    kto_kl_baseline,
    kto_loss,
)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


POLICY = torch.tensor([-2.0, -6.0, -4.0], dtype=torch.float64)
REF = torch.tensor([-5.0, -5.0, -7.0], dtype=torch.float64)
LABELS = torch.tensor([True, False, False])
Z0 = torch.tensor(1.0, dtype=torch.float64)


def check(values: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(values, torch.tensor(expected, dtype=values.dtype), rtol=1e-12, atol=1e-12)


def test_kto_hand_values() -> None:
    losses, stats = kto_loss(POLICY, REF, LABELS, Z0, beta=0.5)
    check(losses, [1 - sigmoid(1), 1 - sigmoid(1), 1 - sigmoid(-1)])
    check(stats["rewards"], [1.5, -0.5, 1.5])
    check(stats["is_desirable"], [1.0, 0.0, 0.0])
    check(stats["kl_baseline"], [1.0, 1.0, 1.0])


def test_kto_weights() -> None:
    """lambda_D = 2 scales the desirable example, lambda_U = 0.5 the undesirable ones."""
    losses, _ = kto_loss(POLICY, REF, LABELS, Z0, beta=0.5, desirable_weight=2.0, undesirable_weight=0.5)
    check(losses, [2 * (1 - sigmoid(1)), 0.5 * (1 - sigmoid(1)), 0.5 * (1 - sigmoid(-1))])


def test_kto_accepts_integer_labels() -> None:
    check(kto_loss(POLICY, REF, torch.tensor([1, 0, 0]), Z0, beta=0.5)[0], [1 - sigmoid(1), 1 - sigmoid(1), 1 - sigmoid(-1)])


def test_kl_baseline_hand_values() -> None:
    """z0 = max(0, mean(policy - ref)): differences (1, -1) -> 0; (3, 1) -> 2; (-1, -3) -> 0."""
    def z0(policy: list[float], ref: list[float]) -> float:
        return kto_kl_baseline(torch.tensor(policy), torch.tensor(ref)).item()

    assert z0([-3.0, -5.0], [-4.0, -4.0]) == 0.0
    assert z0([-1.0, -3.0], [-4.0, -4.0]) == 2.0
    assert z0([-5.0, -7.0], [-4.0, -4.0]) == 0.0
    with pytest.raises(ValueError, match="shapes"):
        kto_kl_baseline(torch.zeros(2), torch.zeros(3))


def test_kl_baseline_and_reference_are_constants() -> None:
    """Neither z0 (even if the caller's z0 carries grad) nor the reference receives gradient."""
    policy_kl = torch.tensor([-1.0, -2.0], requires_grad=True)
    z0 = kto_kl_baseline(policy_kl, torch.tensor([-3.0, -3.0]))
    assert not z0.requires_grad

    policy = POLICY.clone().requires_grad_()
    ref = REF.clone().requires_grad_()
    z0_with_grad = Z0.clone().requires_grad_()
    losses, stats = kto_loss(policy, ref, LABELS, z0_with_grad, beta=0.5)
    losses.sum().backward()
    assert ref.grad is None and z0_with_grad.grad is None and policy.grad is not None
    assert not any(value.requires_grad for value in stats.values())


@settings(max_examples=50, deadline=None)
@given(
    data=st.lists(
        st.tuples(st.floats(-50, 0), st.floats(-50, 0), st.booleans()), min_size=1, max_size=6
    ),
    z0=st.floats(0, 10),
)
def test_raising_a_logp_lowers_desirable_and_raises_undesirable_losses(
    data: list[tuple[float, float, bool]], z0: float
) -> None:
    policy = torch.tensor([d[0] for d in data], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([d[1] for d in data], dtype=torch.float64)
    labels = torch.tensor([d[2] for d in data])
    losses, _ = kto_loss(policy, ref, labels, torch.tensor(z0), beta=0.1)
    (gradient,) = torch.autograd.grad(losses.sum(), policy)
    assert (gradient[labels] < 0).all() and (gradient[~labels] > 0).all()


@settings(max_examples=30, deadline=None)
@given(
    data=st.lists(st.tuples(st.floats(-1e6, 0), st.floats(-1e6, 0), st.booleans()), min_size=1, max_size=6),
    kl=st.lists(st.tuples(st.floats(-1e6, 0), st.floats(-1e6, 0)), min_size=2, max_size=6),
)
def test_finite_for_large_logps(data: list[tuple[float, float, bool]], kl: list[tuple[float, float]]) -> None:
    policy = torch.tensor([d[0] for d in data], requires_grad=True)
    ref = torch.tensor([d[1] for d in data])
    labels = torch.tensor([d[2] for d in data])
    z0 = kto_kl_baseline(torch.tensor([k[0] for k in kl]), torch.tensor([k[1] for k in kl]))
    for loss in (kto_loss, apo_zero_unpaired_loss):
        losses, _ = loss(policy, ref, labels, z0)
        (gradient,) = torch.autograd.grad(losses.sum(), policy)
        assert torch.isfinite(losses).all() and torch.isfinite(gradient).all()


def test_apo_zero_unpaired_hand_values() -> None:
    """Desirable: 1 - s(beta r); undesirable: s(beta r); beta r = 1.5, -0.5, 1.5; z0 unused."""
    losses, stats = apo_zero_unpaired_loss(POLICY, REF, LABELS, Z0, beta=0.5)
    check(losses, [1 - sigmoid(1.5), sigmoid(-0.5), sigmoid(1.5)])
    check(stats["kl_baseline"], [0.0, 0.0, 0.0])
    check(apo_zero_unpaired_loss(POLICY, REF, LABELS, None, beta=0.5)[0], losses.tolist())


def test_kl_completion_order() -> None:
    """Each prompt gets the previous example's completion: [3, 0, 1, 2] for 4 examples."""
    assert kl_completion_order(4).tolist() == [3, 0, 1, 2]
    with pytest.raises(ValueError, match="at least 2"):
        kl_completion_order(1)


def test_validation() -> None:
    with pytest.raises(ValueError, match="kl_baseline"):
        kto_loss(POLICY, REF, LABELS, None)
    with pytest.raises(ValueError, match=r"\[B\]"):
        kto_loss(POLICY, REF[:2], LABELS, Z0)


def test_registry() -> None:
    assert UNPAIRED_LOSSES.names() == ["apo_zero_unpaired", "kto"]
    kto = UNPAIRED_LOSSES.get("kto")
    assert kto.needs_kl_baseline and not UNPAIRED_LOSSES.get("apo_zero_unpaired").needs_kl_baseline
    check(kto(POLICY, REF, LABELS, Z0, beta=0.5)[0], [1 - sigmoid(1), 1 - sigmoid(1), 1 - sigmoid(-1)])


def test_micro_batches_sum_to_the_full_batch() -> None:
    """With z0 computed once for the global batch, per-example losses split freely."""
    full, _ = kto_loss(POLICY, REF, LABELS, Z0)
    parts = [kto_loss(POLICY[s], REF[s], LABELS[s], Z0)[0].sum() for s in (slice(0, 1), slice(1, 3))]
    torch.testing.assert_close(sum(parts) / 3, full.mean())
