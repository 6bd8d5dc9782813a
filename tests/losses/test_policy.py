"""Policy losses: on-policy identities, hand-checked clipping, dual-clip, clip-higher,
GSPO, truncated IS, and parity with TRL 1.16's own ``GRPOTrainer._compute_loss``
(which also pins the mapping of TRL ``loss_type`` names onto our aggregation modes).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from posttrain.errors import UserError
from posttrain.losses.aggregation import GlobalNormalisers, aggregate, masked_mean
from posttrain.losses.kl import kl_penalty_in_loss
from posttrain.losses.policy import (
    POLICY_LOSSES,
    PolicyLossFn,
    clip_higher_loss,
    dual_clip_loss,
    gspo_loss,
    ppo_clip_loss,
    sequence_log_ratio,
    truncated_is_weights,
)

F64 = torch.float64


def ragged_batch(seed: int = 0, rows: int = 5, tokens: int = 6, spread: float = 0.3) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([6, 4, 2, 5, 1])[:rows]
    mask = (torch.arange(tokens) < lengths.unsqueeze(1)).to(F64)
    logp = -torch.rand(rows, tokens, generator=gen, dtype=F64) - 0.1
    old_logp = logp + spread * torch.randn(rows, tokens, generator=gen, dtype=F64)
    advantages = torch.randn(rows, generator=gen, dtype=F64)
    return logp, old_logp, advantages, mask


def one_token_per_case(ratios: list[float], advantages: list[float]) -> tuple[torch.Tensor, ...]:
    """Each case is a [1]-token row: logp = log r (a leaf), old_logp = 0, so the ratio is r and
    d ratio / d logp = r."""
    logp = torch.tensor([[math.log(r)] for r in ratios], dtype=F64, requires_grad=True)
    old_logp = torch.zeros_like(logp)
    return logp, old_logp, torch.tensor(advantages, dtype=F64), torch.ones_like(old_logp)


def loss_and_grad(
    fn: PolicyLossFn,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    **options: Any,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    loss, stats = fn(logp, old_logp, advantages, mask, **options)
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    return loss.detach(), grad, stats


# ---------------------------------------------------------------------------------------------
# On-policy


@pytest.mark.parametrize("name", ["ppo_clip", "clip_higher", "dual_clip", "gspo"])
def test_on_policy_ratio_is_one_and_gradient_is_vanilla_policy_gradient(name: str) -> None:
    """logp == old_logp in value: ratio exactly 1, no clipping, d loss / d logp_t = -A_t."""
    logp, _, advantages, mask = ragged_batch()
    logp = logp.clone().requires_grad_()
    loss, grad, stats = loss_and_grad(POLICY_LOSSES.get(name), logp, logp.detach().clone(), advantages, mask)
    assert stats["ratio_max"].item() == 1.0 and stats["ratio_min"].item() == 1.0
    assert stats["clip_frac"].item() == 0.0
    assert stats["approx_kl"].item() == 0.0
    expected = -advantages.unsqueeze(-1) * mask
    torch.testing.assert_close(grad, expected, atol=1e-15, rtol=0)
    torch.testing.assert_close(loss, expected)


# ---------------------------------------------------------------------------------------------
# PPO-clip hand cases, eps = 0.2


def test_ppo_clip_hand_cases() -> None:
    """Loss -min(r A, clip(r, 0.8, 1.2) A); gradient w.r.t. logp is -A r where the unclipped
    branch is active, 0 where the clip binds.

    A = +1, r = 1.5: clipped at 1.2 -> loss -1.2, grad 0 (no more push up)
    A = +1, r = 0.5: min picks r A = 0.5 -> loss -0.5, grad -0.5 (pessimistic: still pushed up)
    A = -1, r = 0.5: clipped at 0.8 -> loss 0.8, grad 0 (no more push down)
    A = -1, r = 1.5: min picks -1.5 -> loss 1.5, grad 1.5 (unbounded without dual-clip)
    A = +1, r = 1.1: inside -> loss -1.1, grad -1.1
    """
    logp, old_logp, advantages, mask = one_token_per_case([1.5, 0.5, 0.5, 1.5, 1.1], [1, 1, -1, -1, 1])
    loss, grad, stats = loss_and_grad(ppo_clip_loss, logp, old_logp, advantages, mask)
    torch.testing.assert_close(loss.squeeze(-1), torch.tensor([-1.2, -0.5, 0.8, 1.5, -1.1], dtype=F64))
    torch.testing.assert_close(grad.squeeze(-1), torch.tensor([0.0, -0.5, 0.0, 1.5, -1.1], dtype=F64))
    assert stats["clip_frac_high"].item() == pytest.approx(1 / 5)
    assert stats["clip_frac_low"].item() == pytest.approx(1 / 5)
    assert stats["clip_frac"].item() == pytest.approx(2 / 5)
    assert stats["ratio_max"].item() == pytest.approx(1.5)
    assert stats["ratio_min"].item() == pytest.approx(0.5)


def test_dual_clip_caps_the_loss_for_negative_advantages() -> None:
    """c = 3. A = -1, r = 5: PPO-clip gives 5, dual-clip caps at c |A| = 3 with zero gradient.
    A = -1, r = 2: below the cap, unchanged (2, grad 2). A = +1, r = 5: untouched (-1.2, grad 0).
    A = -2, r = 4: cap c |A| = 6 < 8 -> 6."""
    logp, old_logp, advantages, mask = one_token_per_case([5.0, 2.0, 5.0, 4.0], [-1, -1, 1, -2])
    loss, grad, stats = loss_and_grad(dual_clip_loss, logp, old_logp, advantages, mask, dual_clip_c=3.0)
    torch.testing.assert_close(loss.squeeze(-1), torch.tensor([3.0, 2.0, -1.2, 6.0], dtype=F64))
    torch.testing.assert_close(grad.squeeze(-1), torch.tensor([0.0, 2.0, 0.0, 0.0], dtype=F64))
    assert stats["dual_clip_frac"].item() == pytest.approx(2 / 4)
    plain, _, _ = loss_and_grad(ppo_clip_loss, logp, old_logp, advantages, mask)
    torch.testing.assert_close(plain.squeeze(-1), torch.tensor([5.0, 2.0, -1.2, 8.0], dtype=F64))
    with pytest.raises(ValueError, match="> 1"):
        ppo_clip_loss(logp, old_logp, advantages, mask, dual_clip_c=1.0)


def test_clip_higher_uses_the_asymmetric_bounds() -> None:
    """eps_low 0.2, eps_high 0.28 (DAPO). A = +1, r = 1.25: inside [0.8, 1.28] -> -1.25, grad
    -1.25 (symmetric 0.2 would clip it: -1.2, grad 0). A = +1, r = 1.3: clipped at 1.28.
    A = -1, r = 0.79: clipped at 0.8 (grad 0). A = -1, r = 0.81: inside -> 0.81, grad 0.81."""
    logp, old_logp, advantages, mask = one_token_per_case([1.25, 1.3, 0.79, 0.81], [1, 1, -1, -1])
    loss, grad, stats = loss_and_grad(clip_higher_loss, logp, old_logp, advantages, mask)
    torch.testing.assert_close(loss.squeeze(-1), torch.tensor([-1.25, -1.28, 0.8, 0.81], dtype=F64))
    torch.testing.assert_close(grad.squeeze(-1), torch.tensor([-1.25, 0.0, 0.0, 0.81], dtype=F64))
    assert stats["clip_frac_high"].item() == pytest.approx(1 / 4)
    assert stats["clip_frac_low"].item() == pytest.approx(1 / 4)
    symmetric, symmetric_grad, _ = loss_and_grad(ppo_clip_loss, logp, old_logp, advantages, mask)
    assert symmetric[0].item() == pytest.approx(-1.2) and symmetric_grad[0].item() == 0.0


def test_masked_tokens_have_zero_loss_and_gradient_even_with_nan_padding() -> None:
    logp, old_logp, advantages, mask = ragged_batch()
    padding = torch.full_like(logp, float("nan"))
    logp = torch.where(mask.bool(), logp, padding).requires_grad_()
    old_logp = torch.where(mask.bool(), old_logp, -padding)
    for name in POLICY_LOSSES.names():
        loss, grad, _ = loss_and_grad(POLICY_LOSSES.get(name), logp, old_logp, advantages, mask)
        assert torch.equal(loss[~mask.bool()], torch.zeros_like(loss[~mask.bool()]))
        assert not torch.isnan(grad).any(), name


def test_per_token_advantages_are_accepted() -> None:
    logp, old_logp, advantages, mask = ragged_batch()
    per_row, _ = ppo_clip_loss(logp, old_logp, advantages, mask)
    per_token, _ = ppo_clip_loss(logp, old_logp, advantages.unsqueeze(-1).expand_as(logp), mask)
    torch.testing.assert_close(per_row, per_token)


# ---------------------------------------------------------------------------------------------
# GSPO


def test_gspo_ratio_is_exp_of_the_mean_token_log_ratio() -> None:
    logp, old_logp, advantages, mask = ragged_batch(spread=1e-4)
    log_ratio = sequence_log_ratio(logp, old_logp, mask)
    for row in range(logp.shape[0]):
        n = int(mask[row].sum())
        expected = (logp[row, :n] - old_logp[row, :n]).mean()
        assert log_ratio[row].item() == pytest.approx(expected.item(), abs=1e-15)
    # Wide clip range: every valid token of row i carries -A_i s_i.
    loss, stats = gspo_loss(logp, old_logp, advantages, mask, eps_low=10.0, eps_high=10.0)
    seq_ratio = torch.exp(log_ratio)
    torch.testing.assert_close(loss, -(advantages * seq_ratio).unsqueeze(-1) * mask)
    assert stats["seq_ratio_max"].item() == pytest.approx(seq_ratio.max().item())


def test_gspo_clips_whole_sequences() -> None:
    """Row 0: mean log-ratio +0.01 > log(1 + 4e-4) with A > 0 -> every token clipped, even the
    token whose own ratio is below 1; the whole row's gradient is 0. Row 1: mean log-ratio
    -1e-5, inside [1 - 3e-4, 1 + 4e-4] -> not clipped, each token's gradient is -A s."""
    logp = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]], dtype=F64, requires_grad=True)
    old_logp = torch.tensor([[-1.03, -0.99], [-1.0 + 1e-5, -1.0 + 1e-5]], dtype=F64)
    advantages = torch.tensor([1.0, 2.0], dtype=F64)
    loss, grad, stats = loss_and_grad(gspo_loss, logp, old_logp, advantages, torch.ones(2, 2))
    torch.testing.assert_close(loss[0], torch.full((2,), -(1 + 4e-4), dtype=F64))
    assert torch.equal(grad[0], torch.zeros(2, dtype=F64))
    s1 = math.exp(-1e-5)
    torch.testing.assert_close(grad[1], torch.full((2,), -2.0 * s1, dtype=F64))
    assert stats["seq_clip_frac"].item() == pytest.approx(0.5)


@pytest.mark.parametrize("mode", ["seq-mean-token-mean", "token-mean"])
def test_gspo_token_form_has_the_sequence_objective_gradient(mode: str) -> None:
    """The GSPO-token form gives the gradient of the plain sequence objective (ratio
    exp(mean log-ratio) with gradient, broadcast to the row's tokens) under aggregations that
    weigh a row's tokens equally."""
    logp, old_logp, advantages, mask = ragged_batch(spread=3e-4)
    norm = GlobalNormalisers.from_masks([mask])
    ours_param = logp.clone().requires_grad_()
    ours, _ = gspo_loss(ours_param, old_logp, advantages, mask)
    aggregate(ours, mask, norm, mode).backward()

    plain_param = logp.clone().requires_grad_()
    seq_ratio = torch.exp(masked_mean(plain_param - old_logp, mask, dim=-1)).unsqueeze(-1)
    a = advantages.unsqueeze(-1)
    plain = torch.maximum(-a * seq_ratio, -a * seq_ratio.clamp(1 - 3e-4, 1 + 4e-4)).expand_as(logp)
    aggregate(plain * mask, mask, norm, mode).backward()
    torch.testing.assert_close(ours_param.grad, plain_param.grad, atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------
# Truncated importance sampling


def test_truncated_is_weights_hand_case() -> None:
    """w = min(exp(old - sampler), C) with C = 2: ratios 0.5, 1.5, 3 -> 0.5, 1.5, 2; a masked
    token and a NaN sampler log-prob get 1; the weights carry no gradient."""
    old_logp = torch.tensor([[math.log(0.5), math.log(1.5), math.log(3.0), 5.0, 0.0]], requires_grad=True)
    sampler_logp = torch.tensor([[0.0, 0.0, 0.0, 0.0, float("nan")]])
    mask = torch.tensor([[1, 1, 1, 0, 1]])
    weights, stats = truncated_is_weights(old_logp, sampler_logp, mask, cap=2.0)
    torch.testing.assert_close(weights, torch.tensor([[0.5, 1.5, 2.0, 1.0, 1.0]]))
    assert not weights.requires_grad
    assert stats["is_truncated_frac"].item() == pytest.approx(1 / 4)
    assert stats["is_weight_mean"].item() == pytest.approx((0.5 + 1.5 + 2.0 + 1.0) / 4)
    # Huge gaps do not overflow.
    big, _ = truncated_is_weights(torch.tensor([[1000.0]]), torch.tensor([[0.0]]), torch.ones(1, 1))
    assert big.item() == pytest.approx(2.0)


def test_is_weights_scale_the_loss_and_its_gradient() -> None:
    logp, old_logp, advantages, mask = ragged_batch()
    weights = torch.rand(logp.shape, dtype=F64, generator=torch.Generator().manual_seed(9)) * 2
    for name in POLICY_LOSSES.names():
        param = logp.clone().requires_grad_()
        weighted, grad_weighted, _ = loss_and_grad(
            POLICY_LOSSES.get(name), param, old_logp, advantages, mask, is_weights=weights
        )
        plain, grad_plain, _ = loss_and_grad(POLICY_LOSSES.get(name), param, old_logp, advantages, mask)
        torch.testing.assert_close(weighted, plain * weights * mask)
        torch.testing.assert_close(grad_weighted, grad_plain * weights * mask)


# ---------------------------------------------------------------------------------------------
# Registry


def test_registry() -> None:
    assert POLICY_LOSSES.names() == ["clip_higher", "dual_clip", "gspo", "ppo_clip"]
    assert POLICY_LOSSES.canonical("ppo") == "ppo_clip"
    assert POLICY_LOSSES.canonical("clip-higher") == "clip_higher"
    with pytest.raises(UserError, match="valid names: clip_higher, dual_clip, gspo, ppo_clip"):
        POLICY_LOSSES.get("grpo_loss")


# ---------------------------------------------------------------------------------------------
# Parity with TRL 1.16: run GRPOTrainer._compute_loss itself on a stand-in trainer whose
# "model" returns fixed log-probs (single process, one accumulation step unless stated).


class _Accelerator:
    num_processes = 1
    sync_gradients = True

    def reduce(self, x: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return x

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def gather_for_metrics(self, x: torch.Tensor) -> torch.Tensor:
        return x


def trl_compute_loss(
    loss_type: str,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    level: str = "token",
    eps_low: float = 0.2,
    eps_high: float | None = None,
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    is_ratio: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | None = None,
    accumulation_steps: int = 1,
) -> torch.Tensor:
    from trl.trainer.grpo_trainer import GRPOTrainer

    rows, tokens = logp.shape
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logp, torch.zeros_like(logp), None),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=level,
        beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=accumulation_steps),
        loss_type=loss_type,
        epsilon_low=eps_low,
        epsilon_high=eps_low if eps_high is None else eps_high,
        use_vllm=is_ratio is not None,
        vllm_importance_sampling_correction=is_ratio is not None,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=accumulation_steps,
        max_completion_length=tokens,
        accelerator=_Accelerator(),
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    inputs = {
        "prompt_ids": torch.zeros(rows, 1, dtype=torch.long),
        "prompt_mask": torch.ones(rows, 1, dtype=torch.long),
        "completion_ids": torch.zeros(rows, tokens, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": advantages,
        "old_per_token_logps": old_logp,
        "num_items_in_batch": mask.sum() if num_items_in_batch is None else num_items_in_batch,
    }
    if ref_logp is not None:
        inputs["ref_per_token_logps"] = ref_logp
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = is_ratio
    return GRPOTrainer._compute_loss(trainer, None, inputs)


def compare_with_trl(
    trl_loss_fn: Callable[[torch.Tensor], torch.Tensor],
    our_loss_fn: Callable[[torch.Tensor], torch.Tensor],
    logp: torch.Tensor,
) -> None:
    """Same value, same gradient w.r.t. the policy log-probs."""
    trl_param = logp.clone().requires_grad_()
    trl_loss = trl_loss_fn(trl_param)
    (trl_grad,) = torch.autograd.grad(trl_loss, trl_param)
    our_param = logp.clone().requires_grad_()
    our_loss = our_loss_fn(our_param)
    (our_grad,) = torch.autograd.grad(our_loss, our_param)
    assert our_loss.item() == pytest.approx(trl_loss.item(), abs=1e-12)
    torch.testing.assert_close(our_grad, trl_grad, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    ("loss_type", "mode"),
    [
        ("grpo", "seq-mean-token-mean"),
        ("bnpo", "token-mean"),  # equal here: one micro-batch
        ("dr_grpo", "constant-norm"),  # constant = max_completion_length x rows
        ("dapo", "token-mean"),
    ],
)
@pytest.mark.parametrize("eps_high", [None, 0.28], ids=["symmetric", "clip-higher"])
def test_trl_loss_types_map_onto_our_aggregations(loss_type: str, mode: str, eps_high: float | None) -> None:
    logp, old_logp, advantages, mask = ragged_batch()
    norm = GlobalNormalisers.from_masks([mask], max_completion_length=mask.shape[1])

    def ours(param: torch.Tensor) -> torch.Tensor:
        loss, _ = ppo_clip_loss(param, old_logp, advantages, mask, eps_high=eps_high)
        return aggregate(loss, mask, norm, mode)

    compare_with_trl(
        lambda param: trl_compute_loss(loss_type, param, old_logp, advantages, mask, eps_high=eps_high),
        ours,
        logp,
    )


def test_trl_dapo_over_accumulated_micro_batches_equals_our_token_mean() -> None:
    """TRL ``dapo`` with 2 accumulation steps divides each micro-batch by the count of the whole
    generation batch: the sum of the pieces is the full batch's token mean, like ours."""
    logp, old_logp, advantages, mask = ragged_batch(rows=4)
    total_tokens = mask.sum()
    trl_total = sum(
        trl_compute_loss(
            "dapo", lp, op, ad, mk, num_items_in_batch=total_tokens, accumulation_steps=2
        ).item()
        for lp, op, ad, mk in zip(logp.chunk(2), old_logp.chunk(2), advantages.chunk(2), mask.chunk(2))
    )
    loss, _ = ppo_clip_loss(logp, old_logp, advantages, mask)
    ours = aggregate(loss, mask, GlobalNormalisers.from_masks([mask]), "token-mean")
    assert ours.item() == pytest.approx(trl_total, abs=1e-12)


def test_trl_sequence_level_importance_sampling_is_our_gspo() -> None:
    """TRL ``importance_sampling_level="sequence"`` with ``loss_type="grpo"`` is GSPO with
    seq-mean-token-mean (what TRL recommends to reproduce the paper)."""
    logp, old_logp, advantages, mask = ragged_batch(spread=5e-4)
    norm = GlobalNormalisers.from_masks([mask])

    def ours(param: torch.Tensor) -> torch.Tensor:
        loss, _ = gspo_loss(param, old_logp, advantages, mask)
        return aggregate(loss, mask, norm, "seq-mean-token-mean")

    compare_with_trl(
        lambda param: trl_compute_loss(
            "grpo", param, old_logp, advantages, mask, level="sequence", eps_low=3e-4, eps_high=4e-4
        ),
        ours,
        logp,
    )


def test_trl_vllm_token_truncate_is_our_truncated_is() -> None:
    """TRL ``vllm_importance_sampling_mode="token_truncate"``: ratio clamp(exp((old - sampler) *
    mask), max=C) multiplies the clipped per-token loss - our weights and ``is_weights``."""
    logp, old_logp, advantages, mask = ragged_batch()
    sampler_logp = old_logp + 0.5 * torch.randn(old_logp.shape, dtype=F64, generator=torch.Generator().manual_seed(3))
    cap = 3.0
    trl_ratio = torch.clamp(torch.exp((old_logp - sampler_logp) * mask), max=cap)  # TRL's own lines
    weights, _ = truncated_is_weights(old_logp, sampler_logp, mask, cap=cap)
    torch.testing.assert_close(weights, trl_ratio)
    norm = GlobalNormalisers.from_masks([mask])

    def ours(param: torch.Tensor) -> torch.Tensor:
        loss, _ = ppo_clip_loss(param, old_logp, advantages, mask, is_weights=weights)
        return aggregate(loss, mask, norm, "token-mean")

    compare_with_trl(
        lambda param: trl_compute_loss("dapo", param, old_logp, advantages, mask, is_ratio=trl_ratio), ours, logp
    )


def test_trl_kl_in_the_loss_is_our_k3_penalty() -> None:
    """TRL ``beta > 0``: per-token k3 KL to the reference added to the per-token loss."""
    logp, old_logp, advantages, mask = ragged_batch()
    ref_logp = logp + 0.2 * torch.randn(logp.shape, dtype=F64, generator=torch.Generator().manual_seed(4))
    beta = 0.04
    norm = GlobalNormalisers.from_masks([mask])

    def ours(param: torch.Tensor) -> torch.Tensor:
        loss, _ = ppo_clip_loss(param, old_logp, advantages, mask)
        loss, _ = kl_penalty_in_loss(loss, param, ref_logp, mask, beta, estimator="k3")
        return aggregate(loss, mask, norm, "seq-mean-token-mean")

    compare_with_trl(
        lambda param: trl_compute_loss("grpo", param, old_logp, advantages, mask, beta=beta, ref_logp=ref_logp),
        ours,
        logp,
    )
