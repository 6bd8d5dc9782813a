"""KTO and other unpaired preference losses as pure functions.

Unpaired data is a batch of B examples (prompt, completion, desirable?), B counting examples.
Every loss has the shape ``fn(policy_logps [B], ref_logps [B], labels [B] bool, kl_baseline,
*, <params>) -> (losses [B], stats)``: per-example losses, unreduced (the caller divides the sum
by the global example count), and detached per-example stats [B]:

- ``rewards``: beta * (policy - ref) logps;
- ``is_desirable``: 1.0 for desirable examples, 0.0 otherwise (the mean chosen reward is
  ``(rewards * is_desirable).sum() / is_desirable.sum()``, computed where the counts are global);
- ``kl_baseline``: the z0 used, broadcast to [B].

Names (``UNPAIRED_LOSSES``): ``kto`` (TRL ``KTOTrainer`` ``loss_type="kto"``) and
``apo_zero_unpaired`` (TRL ``loss_type="apo_zero_unpaired"``). A record's ``needs_kl_baseline``
says whether the stage must score the mismatched (prompt, other completion) pairs for z0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from posttrain.registry import Registry, keyword_parameters

Stats = dict[str, Tensor]
LossResult = tuple[Tensor, Stats]
UnpairedLossFn = Callable[..., LossResult]


@dataclass(frozen=True)
class UnpairedLoss:
    """A registered unpaired loss: the pure function and what the stage must compute for it."""

    name: str
    fn: UnpairedLossFn
    needs_kl_baseline: bool

    def __call__(
        self, policy_logps: Tensor, ref_logps: Tensor, labels: Tensor, kl_baseline: Tensor | None, **params: object
    ) -> LossResult:
        return self.fn(policy_logps, ref_logps, labels, kl_baseline, **params)

    @property
    def params(self) -> dict[str, object]:
        """The loss's keyword parameters and their defaults (for config validation)."""
        return keyword_parameters(self.fn)


UNPAIRED_LOSSES: Registry[UnpairedLoss] = Registry("unpaired preference loss")


def _register(name: str, *, needs_kl_baseline: bool) -> Callable[[UnpairedLossFn], UnpairedLossFn]:
    def decorate(fn: UnpairedLossFn) -> UnpairedLossFn:
        UNPAIRED_LOSSES.add(name, UnpairedLoss(name, fn, needs_kl_baseline))
        return fn

    return decorate


def kl_completion_order(batch_size: int) -> Tensor:
    """For each prompt i, the index of the completion it is paired with for the KL estimate [B].

    ``[B-1, 0, 1, ..., B-2]``: every prompt gets the previous example's completion, the rotation
    TRL uses, so the mismatched completions are the same set as the batch's own (paper, Sec. 4.1).
    """
    if batch_size < 2:
        raise ValueError("the KTO KL estimate needs at least 2 examples per batch (with 1, z0 = the reward)")
    return torch.arange(batch_size).roll(1)


def kto_kl_baseline(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """KTO's reference point z0 = max(0, mean(policy - ref)) over mismatched pairs, detached (scalar).

    Ethayarajh et al. 2024, Sec. 4.1: z0 estimates KL(pi || pi_ref) from the logps of each
    prompt with another example's completion (``kl_completion_order``); it is clamped at 0 and not
    back-propagated through. Inputs are [M] sequence logps. Across processes pass the logps
    gathered from all of them (all_gather), which gives the global mean; TRL instead averages the
    per-process means, equal to it only when every process holds the same number of examples.
    """
    if policy_kl_logps.shape != ref_kl_logps.shape:
        raise ValueError(f"KL logps shapes differ: {tuple(policy_kl_logps.shape)} vs {tuple(ref_kl_logps.shape)}")
    difference = _float(policy_kl_logps.detach()) - _float(ref_kl_logps.detach())
    return difference.mean().clamp(min=0)


def _check(policy_logps: Tensor, ref_logps: Tensor, labels: Tensor) -> Tensor:
    if policy_logps.dim() != 1 or ref_logps.shape != policy_logps.shape or labels.shape != policy_logps.shape:
        raise ValueError(
            "unpaired losses take [B] policy_logps, ref_logps and labels; got "
            f"{tuple(policy_logps.shape)}, {tuple(ref_logps.shape)}, {tuple(labels.shape)}"
        )
    return labels.to(torch.bool)


def _float(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


@_register("kto", needs_kl_baseline=True)
def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    kl_baseline: Tensor | None,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossResult:
    """KTO: ``lambda_D (1 - s(beta (r - z0)))`` for desirable, ``lambda_U (1 - s(beta (z0 - r)))``
    for undesirable examples, r = policy - ref logps.

    Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", the KTO
    loss ``lambda_y - v(x, y)`` of Sec. 4.1 (eq. 7 in the version TRL cites). ``kl_baseline`` is z0
    from ``kto_kl_baseline`` (detached here as well); pass ``torch.zeros(())`` to drop it. The
    paper suggests weights with ``lambda_D n_D / (lambda_U n_U)`` in [1, 4/3].
    """
    if kl_baseline is None:
        raise ValueError("kto needs kl_baseline (z0 from kto_kl_baseline; torch.zeros(()) to drop it)")
    desirable = _check(policy_logps, ref_logps, labels)
    logratios = _float(policy_logps) - _float(ref_logps).detach()
    z0 = kl_baseline.detach().to(device=logratios.device, dtype=logratios.dtype)
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (logratios - z0)))
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratios)))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    return losses, _stats(beta * logratios, desirable, z0)


@_register("apo_zero_unpaired", needs_kl_baseline=False)
def apo_zero_unpaired_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    kl_baseline: Tensor | None = None,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossResult:
    """Unpaired APO-zero: ``lambda_D (1 - s(beta r))`` for desirable, ``lambda_U s(beta r)`` for
    undesirable examples.

    D'Oosterlinck et al. 2024, "Anchored Preference Optimization", eq. 7 split into its two
    halves (TRL's ``apo_zero_unpaired``). It has no reference point: ``kl_baseline`` is ignored.
    """
    desirable = _check(policy_logps, ref_logps, labels)
    logratios = _float(policy_logps) - _float(ref_logps).detach()
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * logratios))
    undesirable_losses = undesirable_weight * torch.sigmoid(beta * logratios)
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    return losses, _stats(beta * logratios, desirable, torch.zeros((), dtype=logratios.dtype))


def _stats(rewards: Tensor, desirable: Tensor, z0: Tensor) -> Stats:
    rewards = rewards.detach()
    return {
        "rewards": rewards,
        "is_desirable": desirable.to(rewards.dtype),
        "kl_baseline": z0.detach().to(device=rewards.device, dtype=rewards.dtype).expand_as(rewards),
    }
