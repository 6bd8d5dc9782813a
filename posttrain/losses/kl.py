"""KL estimators, KL penalties (in the reward or in the loss) and KL coefficient controllers.

Shapes (letters from ``posttrain.types``): B rows, T completion tokens. ``logp`` and ``ref_logp``
[B, T] are the log-probabilities of the *sampled* tokens under the policy and the reference
model. The tokens were sampled from the policy, so with log r = ref_logp - logp the estimators of
KL(policy || ref) are (Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html):

- ``k1`` = -log r: unbiased, high variance, can be negative per token.
- ``k2`` = (log r)^2 / 2: biased, low variance, never negative.
- ``k3`` = (r - 1) - log r: unbiased, low variance, never negative.

Registry ``KL_ESTIMATORS`` (aliases: verl's ``kl_penalty`` names ``kl`` = k1, ``mse`` = k2,
``low_var_kl`` = k3; OpenRLHF's ``kl_estimator`` uses k1/k2/k3). TRL's GRPOTrainer puts k3 in the
loss; its RLOOTrainer and PPO-style trainers put k1 in the reward.

Where the KL goes matters for the gradient, not only the value: in the reward (PPO, REINFORCE++,
RLOO) it is a constant that shapes returns; in the loss (GRPO) its gradient is what regularises.
As a loss term, on-policy and in expectation: k1's gradient is 0 (E[grad log pi] = 0), k2's is
the gradient of KL(policy || ref), and k3's is the gradient of the *forward* KL(ref || policy)
(its gradient is (1 - pi_ref/pi) grad log pi). See the discussion around Tang & Munos 2025 ("On a few
pitfalls in KL divergence gradient estimation for RL"). We implement what peers use and document it.

Controllers (``KL_CONTROLLERS``: ``fixed``, ``adaptive``) hold beta with explicit state and
``state_dict()`` / ``load_state_dict()`` so a resumed run continues with the exact same beta.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from posttrain.losses.aggregation import masked_mean
from posttrain.registry import Registry

Stats = dict[str, torch.Tensor]
KLEstimatorFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

KL_ESTIMATORS: Registry[KLEstimatorFn] = Registry("KL estimator")


@KL_ESTIMATORS.register("k1", aliases=("kl",))
def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = logp - ref_logp per token ([B, T] -> [B, T])."""
    return logp - ref_logp


@KL_ESTIMATORS.register("k2", aliases=("mse",))
def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = (logp - ref_logp)^2 / 2 per token ([B, T] -> [B, T])."""
    return 0.5 * (logp - ref_logp).pow(2)


@KL_ESTIMATORS.register("k3", aliases=("low_var_kl",))
def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = exp(ref_logp - logp) - 1 - (ref_logp - logp) per token ([B, T] -> [B, T]).

    ``expm1`` keeps it accurate (and >= 0 in floating point) when the log-ratio is tiny, where
    exp(x) - 1 - x would cancel catastrophically. No clamp, unlike verl's ``low_var_kl`` (+-10):
    a clamp hides a diverged policy instead of showing it.
    """
    log_ratio = ref_logp - logp
    return torch.expm1(log_ratio) - log_ratio


def kl_penalty_in_reward(
    token_rewards: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    estimator: str = "k1",
) -> tuple[torch.Tensor, Stats]:
    """Token rewards with a per-token KL penalty: r_t - beta * KL_t at valid tokens
    (Ziegler et al. 2019; Ouyang et al. 2022, eq. 2, with k1).

    token_rewards, logp, ref_logp, mask: [B, T] -> (rewards [B, T], stats). ``logp`` is the policy
    at rollout time (the old log-probs); everything is detached - a reward is a constant. Masked
    tokens keep their reward (normally 0). Stats: ``kl`` (masked mean per-token KL), ``kl_seq``
    (mean over rows of the summed KL, the quantity an adaptive controller usually targets).
    """
    keep = mask.bool()
    logp = torch.where(keep, logp.detach(), torch.zeros_like(logp))
    ref_logp = torch.where(keep, ref_logp.detach(), torch.zeros_like(logp))
    kl = KL_ESTIMATORS.get(estimator)(logp, ref_logp)
    rewards = token_rewards.detach() - beta * kl
    return rewards, _kl_stats(kl, keep)


def kl_penalty_in_loss(
    per_token_loss: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    estimator: str = "k3",
) -> tuple[torch.Tensor, Stats]:
    """Per-token loss plus beta * KL_t (Shao et al. 2024, GRPO eq. 3-4, with k3 as there and in TRL).

    per_token_loss, logp (with gradient), ref_logp, mask: [B, T] -> (per_token_loss [B, T], stats);
    0 at masked tokens. Aggregate the result as usual, so the KL term is normalised exactly like
    the policy term (TRL adds it before aggregating too).
    """
    keep = mask.bool()
    # Zero padding first: a NaN log-prob there would otherwise leak NaN into the gradient.
    logp = torch.where(keep, logp, torch.zeros_like(logp))
    ref_logp = torch.where(keep, ref_logp.detach(), torch.zeros_like(logp))
    kl = KL_ESTIMATORS.get(estimator)(logp, ref_logp)
    loss = torch.where(keep, per_token_loss + beta * kl, torch.zeros_like(per_token_loss))
    return loss, _kl_stats(kl.detach(), keep)


def _kl_stats(kl: torch.Tensor, keep: torch.Tensor) -> Stats:
    kl = torch.where(keep, kl, torch.zeros_like(kl))
    rows = keep.any(-1)
    return {"kl": masked_mean(kl, keep), "kl_seq": masked_mean(kl.sum(-1), rows)}


class FixedKLController:
    """A constant beta, with the same interface as ``AdaptiveKLController``."""

    kind = "fixed"

    def __init__(self, beta: float) -> None:
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.beta = float(beta)
        self.updates = 0

    def update(self, observed_kl: float) -> float:
        """Record one observation; beta does not change. Returns beta."""
        self.updates += 1
        return self.beta

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "beta": self.beta, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(state, self.kind)
        if float(state["beta"]) != self.beta:
            raise ValueError(
                f"checkpoint has fixed beta {state['beta']} but this run is configured with {self.beta}; "
                "resume with the checkpoint's beta or start a new run"
            )
        self.updates = int(state["updates"])


class AdaptiveKLController:
    """Beta that follows a target KL (in the spirit of Schulman et al. 2017, §4 "Adaptive KL
    Penalty Coefficient", with this project's constants):

    after each step with observed KL d: beta *= 1.5 if d > 2 * target; beta /= 1.5 if
    d < target / 2; unchanged otherwise (both thresholds strict). The observed KL is whatever the
    stage measures (per-token mean, or per-sequence sum) - ``target`` must be in the same units.
    ``state_dict`` holds beta, target and the update count; JSON round-trips it exactly.
    """

    kind = "adaptive"
    FACTOR = 1.5
    BAND = 2.0

    def __init__(self, beta: float, target: float) -> None:
        if beta <= 0:
            raise ValueError(f"adaptive beta must start > 0 (it only scales), got {beta}")
        if target <= 0:
            raise ValueError(f"target KL must be > 0, got {target}")
        self.beta = float(beta)
        self.target = float(target)
        self.updates = 0

    def update(self, observed_kl: float) -> float:
        """Apply the rule once for ``observed_kl``; returns the new beta."""
        observed_kl = float(observed_kl)
        if observed_kl > self.BAND * self.target:
            self.beta *= self.FACTOR
        elif observed_kl < self.target / self.BAND:
            self.beta /= self.FACTOR
        self.updates += 1
        return self.beta

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "beta": self.beta, "target": self.target, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(state, self.kind)
        if float(state["target"]) != self.target:
            raise ValueError(
                f"checkpoint has target KL {state['target']} but this run is configured with "
                f"{self.target}; resume with the same target or start a new run"
            )
        self.beta = float(state["beta"])
        self.updates = int(state["updates"])


def _check_kind(state: dict[str, Any], kind: str) -> None:
    if state.get("kind") != kind:
        raise ValueError(f"state_dict is for a {state.get('kind')!r} KL controller, not {kind!r}")


KLController = FixedKLController | AdaptiveKLController

KL_CONTROLLERS: Registry[type[FixedKLController] | type[AdaptiveKLController]] = Registry("KL controller")
KL_CONTROLLERS.add("fixed", FixedKLController)
KL_CONTROLLERS.add("adaptive", AdaptiveKLController)
