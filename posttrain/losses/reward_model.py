"""Reward-model losses as pure functions: pairwise (Bradley-Terry) and pointwise (regression).

Two shapes, one per kind of data:

- pairwise ``fn(chosen [B], rejected [B], margin [B] | None, *, <params>) -> (losses [B], stats)``,
  B counting (prompt, chosen, rejected) pairs, ``chosen``/``rejected`` the scalar rewards of the
  two responses;
- pointwise ``fn(predicted [B], target [B], *, <params>) -> (losses [B], stats)``, B counting
  scored responses (HelpSteer-style attribute scores).

``losses`` are per example and *unreduced*: the caller divides their sum by the global example
count, so micro-batching, accumulation and process count never change the update. ``stats`` are
detached per-example tensors [B]. Rewards are computed in fp32 (half-precision rewards lose the
small differences the sigmoid is made of).

Names (``REWARD_LOSSES``; ours first, then the aliases we accept):

==============  =============  ==============================================================
ours            aliases        peers
==============  =============  ==============================================================
bradley_terry   bt, pairwise   TRL ``RewardTrainer`` (a ``margin`` column = our per-pair margin;
                               ``center_rewards_coefficient`` the same name and maths),
                               OpenRLHF ``--loss sigmoid`` (its ``margin`` likewise)
regression      mse            pointwise MSE on a score (HelpSteer / SteerLM attribute heads)
==============  =============  ==============================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from posttrain.registry import Registry, keyword_parameters

Stats = dict[str, Tensor]
LossResult = tuple[Tensor, Stats]
RewardLossFn = Callable[..., LossResult]


@dataclass(frozen=True)
class RewardLoss:
    """A registered reward-model loss: the pure function and the kind of rows it trains on."""

    name: str
    fn: RewardLossFn
    pairwise: bool  # True: (chosen, rejected, margin); False: (predicted, target)

    def __call__(self, *tensors: Tensor | None, **params: object) -> LossResult:
        return self.fn(*tensors, **params)

    @property
    def params(self) -> dict[str, object]:
        """The loss's keyword parameters and their defaults (for config validation)."""
        return keyword_parameters(self.fn)


REWARD_LOSSES: Registry[RewardLoss] = Registry("reward model loss")


def _register(name: str, *, pairwise: bool, aliases: tuple[str, ...] = ()) -> Callable[[RewardLossFn], RewardLossFn]:
    def decorate(fn: RewardLossFn) -> RewardLossFn:
        REWARD_LOSSES.add(name, RewardLoss(name, fn, pairwise), aliases=aliases)
        return fn

    return decorate


def get_reward_loss(name: str, where: str = "") -> RewardLoss:
    """The loss registered as ``name`` (or an alias); a miss lists the valid names."""
    return REWARD_LOSSES.get(name, where)


def _float(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


@_register("bradley_terry", pairwise=True, aliases=("bt", "pairwise"))
def bradley_terry_loss(chosen: Tensor, rejected: Tensor, margin: Tensor | None = None, *,
                       center_rewards_coefficient: float = 0.0) -> LossResult:
    """``-log sigmoid(r_c - r_r - m) + c * (r_c + r_r)^2`` per pair.

    Bradley & Terry 1952; as a reward-model loss Ouyang et al. 2022 ("Training language models to
    follow instructions", eq. 1). ``margin`` m [B] is the per-pair margin of Touvron et al. 2023
    (Llama 2, eq. 2): a pair rated "much better" must be separated by more (None = 0). The
    centring term is Eisenstein et al. 2023 ("Helping or herding?", the auxiliary loss that keeps
    rewards near zero); TRL adds ``c * mean((r_c + r_r)^2)`` over its batch, which is this term's
    mean, so after the caller's mean the two agree.
    """
    chosen, rejected = _float(chosen), _float(rejected)
    gap = chosen - rejected
    logits = gap if margin is None else gap - _float(margin).detach()
    losses = -F.logsigmoid(logits)
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * (chosen + rejected) ** 2
    stats = {"chosen_rewards": chosen.detach(), "rejected_rewards": rejected.detach(), "margin": gap.detach(),
             "accuracy": (gap > 0).to(gap.dtype).detach()}
    return losses, stats


@_register("regression", pairwise=False, aliases=("mse",))
def regression_loss(predicted: Tensor, target: Tensor, *, scale: float = 1.0) -> LossResult:
    """``((r - y) / scale)^2`` per scored response: a head regresses an attribute score.

    The pointwise objective of SteerLM / HelpSteer (Wang et al. 2023, "HelpSteer", Sec. 4: one
    regression output per attribute). ``scale`` divides both sides (e.g. 4 for 0-4 ratings) so the
    loss does not depend on the rating's units.
    """
    predicted, target = _float(predicted), _float(target).detach()
    error = (predicted - target) / scale
    return error ** 2, {"predicted": predicted.detach(), "target": target, "abs_error": error.abs().detach() * scale}
