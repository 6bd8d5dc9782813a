"""Advantage estimators for online RL, as pure tensor functions, and their registry.

Shapes (letters from ``posttrain.types``): P prompts, G completions per prompt, B = P x G rows,
T completion tokens per row (right-padded).

Outcome estimators (one scalar reward per completion) share one signature so that a stage picks
one by name::

    fn(rewards [P, G], *, valid [P, G] | None = None, baseline_rewards [P] | None = None,
       token_counts [P, G] | None = None, **options) -> advantages [P, G]

- ``valid``: False where the reward was None upstream (``RewardResult.score is None``). Invalid
  samples are left out of every statistic (mean, std, leave-one-out sum, batch moments) and get
  advantage exactly 0, so they neither move the policy nor bias their siblings' baseline. Their
  entries in ``rewards`` may hold anything (0, NaN). A group with fewer than 2 valid samples has
  no baseline: all its advantages are 0 (``remax`` and ``reinforce_pp`` excepted: they use no
  group baseline).
- ``baseline_rewards``: the reward of one extra completion per prompt (ReMax's greedy one);
  required by ``remax``, ignored by the others.
- ``token_counts``: completion lengths; used only by the REINFORCE++ estimators to weight the
  batch statistics by tokens (as verl/OpenRLHF do); ignored by the others.

Every estimator treats its inputs as constants (the result is detached). Pass the *global*
batch (rewards gathered over processes): group and batch statistics must not depend on how the
batch is sharded. Broadcast an outcome advantage to tokens with ``advantages.reshape(-1, 1)``.

``gae`` is token-level (it needs a critic) and has its own signature; its registry entry says so.

Registry names (aliases in brackets): ``grpo`` [``group_norm``: OpenRLHF], ``dr_grpo``, ``rloo``,
``reinforce_pp`` [``reinforce_plus_plus``: verl], ``reinforce_pp_baseline``
[``reinforce_plus_plus_baseline``: verl; ``reinforce_baseline``: OpenRLHF], ``remax``, ``gae``.
Peers' switches that cannot be names: verl ``norm_adv_by_std_in_grpo=False`` and TRL
``scale_rewards="none"`` are ``dr_grpo``; TRL ``scale_rewards="group"`` (its default) is ``grpo``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from posttrain.errors import UserError, problem
from posttrain.registry import Registry


class OutcomeAdvantageFn(Protocol):
    def __call__(
        self,
        rewards: torch.Tensor,
        *,
        valid: torch.Tensor | None = None,
        baseline_rewards: torch.Tensor | None = None,
        token_counts: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class AdvantageEstimator:
    """A registry entry: the function and what a stage must provide to call it.

    ``level``: "outcome" (``fn`` is an ``OutcomeAdvantageFn``, the common signature above) or
    "token" (``gae``: token rewards, values and mask [B, T]). ``needs_baseline_rewards``: the stage must sample one extra (greedy)
    completion per prompt. ``needs_values``: the stage must run a critic.
    """

    fn: Callable[..., Any]
    level: Literal["outcome", "token"]
    needs_baseline_rewards: bool = False
    needs_values: bool = False


ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage estimator")

# TRL adds 1e-4 to the std (``advantages / (std_rewards + 1e-4)`` in GRPOTrainer); verl uses 1e-6.
GRPO_EPS = 1e-4
# Batch whitening follows verl/TRL ``masked_whiten``: (x - mean) * rsqrt(var + 1e-8).
WHITEN_EPS = 1e-8


def _valid_mask(rewards: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [P, G], got shape {tuple(rewards.shape)}")
    if valid is None:
        return torch.ones_like(rewards, dtype=torch.bool)
    if valid.shape != rewards.shape:
        raise ValueError(f"valid {tuple(valid.shape)} must match rewards {tuple(rewards.shape)}")
    return valid.bool()


def _group_moments(
    rewards: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rewards with invalid entries zeroed, valid count [P, 1], valid mean [P, 1])."""
    rewards = torch.where(valid, rewards.detach(), torch.zeros_like(rewards))
    count = valid.to(rewards.dtype).sum(-1, keepdim=True)
    mean = rewards.sum(-1, keepdim=True) / count.clamp(min=1.0)
    return rewards, count, mean


def _finish(advantages: torch.Tensor, valid: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    # Invalid samples, and every sample of a group with < 2 valid ones, get exactly 0.
    keep = valid & (count > 1)
    return torch.where(keep, advantages, torch.zeros_like(advantages))


@torch.no_grad()
def grpo_advantages(
    rewards: torch.Tensor,
    *,
    valid: torch.Tensor | None = None,
    baseline_rewards: torch.Tensor | None = None,
    token_counts: torch.Tensor | None = None,
    eps: float = GRPO_EPS,
    unbiased_std: bool = True,
) -> torch.Tensor:
    """Group-normalised advantage (Shao et al. 2024, DeepSeekMath §4.1.2, outcome supervision,
    used in the GRPO objective eq. 3): A_i = (r_i - mean(r)) / (std(r) + eps) within each group.

    rewards, valid: [P, G] -> advantages [P, G].

    Conventions, chosen to match TRL 1.16 ``GRPOTrainer`` (``scale_rewards="group"``):
    ``std`` is the *sample* std (Bessel-corrected, TRL's ``nanstd``; also ``torch.std`` in verl),
    and ``eps = 1e-4`` is added to the std (not under the square root). ``unbiased_std=False``
    gives the population std (divide by G), the convention under which G = 16 with 4 successes
    gives the often-quoted +sqrt(3) = 1.732 / -1/sqrt(3) = -0.577; TRL's sample std gives
    +1.677 / -0.559 on the same rewards. A group whose rewards are all equal gets 0 (its
    numerator is 0). The paper does not say which std it uses.
    """
    valid = _valid_mask(rewards, valid)
    rewards, count, mean = _group_moments(rewards, valid)
    centred = torch.where(valid, rewards - mean, torch.zeros_like(rewards))
    dof = count - 1 if unbiased_std else count
    std = (centred.pow(2).sum(-1, keepdim=True) / dof.clamp(min=1.0)).sqrt()
    return _finish(centred / (std + eps), valid, count)


@torch.no_grad()
def dr_grpo_advantages(
    rewards: torch.Tensor,
    *,
    valid: torch.Tensor | None = None,
    baseline_rewards: torch.Tensor | None = None,
    token_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Group-mean baseline without the std division (Liu et al. 2025, "Understanding R1-Zero-like
    Training", Dr. GRPO §3: the std term up-weights questions that are too easy or too hard).

    rewards, valid: [P, G] -> advantages [P, G]: A_i = r_i - mean(r). verl spells it
    ``adv_estimator=grpo, norm_adv_by_std_in_grpo=False``; TRL ``scale_rewards="none"``. Pair it with
    the ``constant-norm`` aggregation for the paper's full recipe.
    """
    valid = _valid_mask(rewards, valid)
    rewards, count, mean = _group_moments(rewards, valid)
    return _finish(rewards - mean, valid, count)


@torch.no_grad()
def rloo_advantages(
    rewards: torch.Tensor,
    *,
    valid: torch.Tensor | None = None,
    baseline_rewards: torch.Tensor | None = None,
    token_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for
    free!"; Ahmadian et al. 2024, "Back to Basics", RLOO estimator): each sample's baseline is the
    mean reward of the *other* valid samples of its group.

    rewards, valid: [P, G] -> advantages [P, G]: A_i = r_i - (sum_{j != i} r_j) / (n - 1), which
    equals n / (n - 1) x (r_i - mean(r)) with n valid samples. Same as TRL ``RLOOTrainer`` with
    ``normalize_advantages=False`` (its default) and verl ``rloo``.
    """
    valid = _valid_mask(rewards, valid)
    rewards, count, _ = _group_moments(rewards, valid)
    others_mean = (rewards.sum(-1, keepdim=True) - rewards) / (count - 1).clamp(min=1.0)
    return _finish(rewards - others_mean, valid, count)


def _batch_whiten(
    values: torch.Tensor, weights: torch.Tensor, eps: float = WHITEN_EPS
) -> torch.Tensor:
    """(x - mean) * rsqrt(var + eps) with weighted mean/var (Bessel-corrected over the weight sum,
    as ``masked_whiten`` over tokens); entries with weight 0 come back as 0."""
    total = weights.sum()
    mean = (values * weights).sum() / total.clamp(min=1.0)
    var = ((values - mean).pow(2) * weights).sum() / (total - 1).clamp(min=1.0)
    return whiten(values, weights > 0, mean, var, eps)


def whiten(values: torch.Tensor, mask: torch.Tensor, mean: float | torch.Tensor, var: float | torch.Tensor,
           eps: float = WHITEN_EPS) -> torch.Tensor:
    """(x - mean) * rsqrt(var + eps) where ``mask`` is set, 0 elsewhere, with the moments given:
    the last step of ``masked_whiten``, for moments summed over processes. [B, T] -> [B, T]."""
    var = torch.as_tensor(var, dtype=values.dtype, device=values.device)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


def _reinforce_weights(valid: torch.Tensor, token_counts: torch.Tensor | None) -> torch.Tensor:
    weights = valid.to(torch.float64)
    if token_counts is not None:
        if token_counts.shape != valid.shape:
            raise ValueError(f"token_counts {tuple(token_counts.shape)} must be [P, G] like rewards")
        weights = weights * token_counts.detach().to(torch.float64)
    return weights


@torch.no_grad()
def reinforce_pp_advantages(
    rewards: torch.Tensor,
    *,
    valid: torch.Tensor | None = None,
    baseline_rewards: torch.Tensor | None = None,
    token_counts: torch.Tensor | None = None,
    eps: float = WHITEN_EPS,
) -> torch.Tensor:
    """REINFORCE++ for outcome rewards (Hu 2025, arXiv 2501.03262): no per-prompt baseline; the
    rewards are normalised over the whole global batch, A = (r - mean_B) / sqrt(var_B + eps).

    rewards, valid, token_counts: [P, G] -> advantages [P, G]. Without ``token_counts`` each valid
    *sequence* weighs 1 in mean/var; with them each *token* does (a length-L completion counts L
    times), which is what verl ``reinforce_plus_plus`` and OpenRLHF do by whitening the broadcast
    returns over all tokens - identical to ``masked_whiten`` of the broadcast rewards. The
    variance is Bessel-corrected (over sequences or tokens) like ``masked_whiten``. For token-level
    rewards (KL penalty in the reward) use ``discounted_returns`` then ``masked_whiten``.
    """
    valid = _valid_mask(rewards, valid)
    weights = _reinforce_weights(valid, token_counts)
    values = torch.where(valid, rewards.detach(), torch.zeros_like(rewards)).to(torch.float64)
    return _batch_whiten(values, weights, eps).to(rewards.dtype)


@torch.no_grad()
def reinforce_pp_baseline_advantages(
    rewards: torch.Tensor,
    *,
    valid: torch.Tensor | None = None,
    baseline_rewards: torch.Tensor | None = None,
    token_counts: torch.Tensor | None = None,
    eps: float = WHITEN_EPS,
) -> torch.Tensor:
    """REINFORCE++ with a group baseline (Hu 2025, "REINFORCE++-baseline"): subtract each group's
    valid mean, then normalise over the global batch as ``reinforce_pp_advantages``.

    rewards, valid, token_counts: [P, G] -> advantages [P, G]. A group with < 2 valid samples has
    no baseline: its samples get 0 and are left out of the batch statistics, like invalid ones
    (verl instead keeps a lone sample's raw reward, baseline 0).
    """
    valid = _valid_mask(rewards, valid)
    values, count, mean = _group_moments(rewards, valid)
    valid = valid & (count > 1)
    centred = torch.where(valid, values - mean, torch.zeros_like(values)).to(torch.float64)
    weights = _reinforce_weights(valid, token_counts)
    return _batch_whiten(centred, weights, eps).to(rewards.dtype)


@torch.no_grad()
def remax_advantages(
    rewards: torch.Tensor,
    *,
    valid: torch.Tensor | None = None,
    baseline_rewards: torch.Tensor | None = None,
    token_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """ReMax (Li et al. 2023, arXiv 2310.10505, Algorithm 1): the baseline is the reward of the
    greedy completion of the same prompt. A_i = r_i - b_p.

    rewards, valid: [P, G]; baseline_rewards: [P] -> advantages [P, G]. The paper samples G = 1;
    any G works. Invalid samples get 0. The stage must mask the prompt (valid = False for the
    whole row) when the greedy completion's own reward is None.
    """
    valid = _valid_mask(rewards, valid)
    if baseline_rewards is None:
        raise ValueError("remax needs baseline_rewards [P]: the reward of each prompt's greedy completion")
    if baseline_rewards.shape != rewards.shape[:1]:
        raise ValueError(
            f"baseline_rewards must be [P] = [{rewards.shape[0]}], got {tuple(baseline_rewards.shape)}"
        )
    advantages = rewards.detach() - baseline_rewards.detach().to(rewards.dtype).unsqueeze(-1)
    return torch.where(valid, advantages, torch.zeros_like(advantages))


@torch.no_grad()
def gae(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16):
    A_t = sum_l (gamma lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t; returns = A + V.

    token_rewards, values, mask: [B, T] -> (advantages [B, T], returns [B, T]).

    Padding: the episode ends at a row's last valid token, so V after it is 0 (a completion that
    hit the length limit is treated as terminal too, as TRL/verl/OpenRLHF do). Masked tokens are
    *skipped*, not treated as terminal: the recursion carries V and A across them, so right
    padding is exact and an interior masked span (a tool's output in a multi-turn rollout) joins
    the tokens on either side as in verl. Rewards and values at masked tokens are ignored;
    advantages and returns there are 0. Defaults gamma = 1, lam = 0.95 as in verl/OpenRLHF
    PPO for LLMs. Whitening is a separate step: ``masked_whiten(advantages, mask)``.
    """
    if not (token_rewards.shape == values.shape == mask.shape) or token_rewards.dim() != 2:
        raise ValueError("token_rewards, values and mask must all be [B, T]")
    keep = mask.bool()
    rewards = token_rewards.detach()
    values = values.detach()
    next_value = torch.zeros_like(values[:, 0])
    running = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    # A Python loop over T: the recursion is sequential, and T (hundreds to a few thousand) is
    # small next to the forward pass that produced the values.
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        candidate = delta + gamma * lam * running
        running = torch.where(keep[:, t], candidate, running)
        next_value = torch.where(keep[:, t], values[:, t], next_value)
        advantages[:, t] = running
    advantages = torch.where(keep, advantages, torch.zeros_like(advantages))
    returns = torch.where(keep, advantages + values, torch.zeros_like(advantages))
    return advantages, returns


@torch.no_grad()
def discounted_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Reward-to-go G_t = sum_{k >= t} gamma^(k-t) r_k over valid tokens (REINFORCE++ with the KL
    penalty in the token rewards, Hu 2025); [B, T] -> [B, T], 0 at masked tokens. Whiten the result
    with ``masked_whiten`` over the global batch to get REINFORCE++ advantages."""
    keep = mask.bool()
    running = torch.zeros_like(token_rewards[:, 0])
    returns = torch.zeros_like(token_rewards)
    for t in reversed(range(token_rewards.shape[1])):
        running = torch.where(keep[:, t], token_rewards[:, t].detach() + gamma * running, running)
        returns[:, t] = running
    return torch.where(keep, returns, torch.zeros_like(returns))


@torch.no_grad()
def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = WHITEN_EPS
) -> torch.Tensor:
    """Whiten over the masked entries: (x - mean) * rsqrt(var + eps), var Bessel-corrected.

    values, mask: [B, T] -> [B, T], 0 at masked entries. Same convention as TRL/verl
    ``masked_whiten`` (used for PPO's advantage whitening and REINFORCE++). ``shift_mean=False``
    only rescales (adds the mean back). Pass the global batch: the statistics are over what is
    given.
    """
    weights = mask.to(torch.float64)
    whitened = _batch_whiten(values.detach().to(torch.float64), weights, eps)
    if not shift_mean:
        mean = (values.detach().to(torch.float64) * weights).sum() / weights.sum().clamp(min=1.0)
        whitened = torch.where(mask.bool(), whitened + mean, whitened)
    return whitened.to(values.dtype)


@torch.no_grad()
def outcome_token_rewards(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Place each row's outcome reward on its last valid token (the PPO/GAE convention).

    scores: [B]; mask: [B, T] -> token rewards [B, T] (0 elsewhere; a row with no valid token gets
    nothing). Add a per-token KL penalty with ``kl.kl_penalty_in_reward``.
    """
    keep = mask.bool()
    positions = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
    last = torch.where(keep, positions, torch.full_like(positions, -1)).max(-1).values
    rewards = torch.zeros(keep.shape, dtype=scores.dtype, device=scores.device)
    rows = torch.nonzero(last >= 0).squeeze(-1)
    rewards[rows, last[rows]] = scores.detach()[rows]
    return rewards


def outcome_advantages(
    name: str,
    rewards: torch.Tensor,
    *,
    valid: torch.Tensor | None = None,
    baseline_rewards: torch.Tensor | None = None,
    token_counts: torch.Tensor | None = None,
    **options: Any,
) -> torch.Tensor:
    """Look up the outcome estimator ``name`` and apply it ([P, G] -> [P, G]).

    ``name`` may also be ``"package.module:function"``: user code with the common signature.
    """
    estimator = ADVANTAGE_ESTIMATORS.get(name)
    if not isinstance(estimator, AdvantageEstimator):
        estimator = AdvantageEstimator(estimator, "outcome")
    if estimator.level != "outcome":
        raise UserError(
            problem(
                "advantage estimator",
                f"{name!r} is token-level (it needs a critic's values), not an outcome estimator",
                "call posttrain.losses.advantages.gae(token_rewards, values, mask, gamma, lam)",
            )
        )
    return estimator.fn(
        rewards, valid=valid, baseline_rewards=baseline_rewards, token_counts=token_counts, **options
    )


ADVANTAGE_ESTIMATORS.add("grpo", AdvantageEstimator(grpo_advantages, "outcome"), aliases=("group_norm",))
ADVANTAGE_ESTIMATORS.add("dr_grpo", AdvantageEstimator(dr_grpo_advantages, "outcome"))
ADVANTAGE_ESTIMATORS.add("rloo", AdvantageEstimator(rloo_advantages, "outcome"))
ADVANTAGE_ESTIMATORS.add(
    "reinforce_pp", AdvantageEstimator(reinforce_pp_advantages, "outcome"), aliases=("reinforce_plus_plus",)
)
ADVANTAGE_ESTIMATORS.add(
    "reinforce_pp_baseline",
    AdvantageEstimator(reinforce_pp_baseline_advantages, "outcome"),
    aliases=("reinforce_plus_plus_baseline", "reinforce_baseline"),
)
ADVANTAGE_ESTIMATORS.add(
    "remax", AdvantageEstimator(remax_advantages, "outcome", needs_baseline_rewards=True)
)
ADVANTAGE_ESTIMATORS.add("gae", AdvantageEstimator(gae, "token", needs_values=True))
