"""Policy-gradient losses for online RL (PPO family), as pure tensor functions.

Shapes (letters from ``posttrain.types``): B rows, T completion tokens per row (right-padded).
Inputs are per-token log-probabilities of the sampled tokens: ``logp`` [B, T] from the policy
being trained (carries the gradient), ``old_logp`` [B, T] from the trainer's forward pass of the
policy that sampled (detached; "trainer_old_logp"), ``advantages`` [B, T] or [B] (one per row,
broadcast over its tokens), ``mask`` [B, T] 1 where the token is trained on.

Every loss returns ``(per_token_loss [B, T], stats)``: the loss *unreduced*, 0 at masked tokens,
to be reduced by ``posttrain.losses.aggregation`` with global normalisers; ``stats`` are detached
0-d tensors (local masked means over this micro-batch, for logging; no ``.item()`` sync here).

Registry ``POLICY_LOSSES`` (all share ``fn(logp, old_logp, advantages, mask, **options)``):

==============  ==========================================  =====================================
ours            maths                                       peers
==============  ==========================================  =====================================
``ppo_clip``    PPO-clip, symmetric eps (Schulman 2017)     TRL ``loss_type`` grpo/bnpo/dr_grpo/
                                                            dapo (the per-token part); OpenRLHF
                                                            ``PolicyLoss``
``clip_higher`` PPO-clip, eps_low = 0.2, eps_high = 0.28    TRL ``epsilon_high``; verl
                (DAPO)                                      ``clip_ratio_high``
``dual_clip``   PPO-clip + cap c|A| for A < 0 (Ye 2020)     verl ``vanilla`` (always dual-clip,
                                                            ``clip_ratio_c`` = 3)
``gspo``        sequence-level ratio (Zheng 2025)           TRL ``importance_sampling_level=
                                                            "sequence"``; verl ``gspo``
==============  ==========================================  =====================================

The sampler/trainer mismatch correction (``truncated_is_weights``, Yao et al. 2025) is not a
separate loss: compute the weights once per rollout and pass them as ``is_weights`` to any of
the losses above (TRL ``vllm_importance_sampling_correction`` with mode ``token_truncate``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from posttrain.losses.aggregation import masked_mean
from posttrain.registry import Registry

Stats = dict[str, torch.Tensor]

# exp() of a log-ratio beyond +-20 overflows float16/bf16 ranges and gives inf * 0 = NaN
# gradients; verl clamps at the same bound. Ratios that far out are clipped by PPO anyway.
LOG_RATIO_CLAMP = 20.0


# fn(logp, old_logp, advantages, mask, **options) -> (per_token_loss [B, T], stats)
PolicyLossFn = Callable[..., tuple[torch.Tensor, Stats]]

POLICY_LOSSES: Registry[PolicyLossFn] = Registry("policy loss")


def _per_token_advantages(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    return advantages.detach().to(like.dtype).expand_as(like)


def _valid_only(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    # Padding may hold NaN/inf log-probs. Replacing them *before* any arithmetic keeps them out
    # of the backward pass too (torch.where after the fact still multiplies 0 by a NaN gradient).
    return torch.where(keep, values, torch.zeros_like(values))


def _check_shapes(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> None:
    if logp.dim() != 2 or logp.shape != old_logp.shape or logp.shape != mask.shape:
        raise ValueError(
            f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and mask {tuple(mask.shape)} "
            "must all be [B, T]"
        )


def _clipped_surrogate(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip_c: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-min(r A, clip(r) A) per token, optionally dual-clipped; also where each clip binds."""
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    # Where the clipped branch wins the gradient is zero: r fell below 1 - eps_low with A < 0, or
    # rose above 1 + eps_high with A > 0.
    low = (ratio < 1.0 - eps_low) & (advantages < 0)
    high = (ratio > 1.0 + eps_high) & (advantages > 0)
    dual = torch.zeros_like(low)
    if dual_clip_c is not None:
        cap = -advantages * dual_clip_c
        dual = (advantages < 0) & (loss > cap)
        loss = torch.where(advantages < 0, torch.minimum(loss, cap), loss)
    return loss, low, high, dual


def _ratio_stats(log_ratio: torch.Tensor, ratio: torch.Tensor, mask: torch.Tensor) -> Stats:
    keep = mask.bool()
    log_ratio = log_ratio.detach()
    ratio = ratio.detach()
    # k3 = (r - 1) - log r estimates KL(old || new) without bias from samples of the old policy
    # and is never negative (Schulman 2020); k1 = -log r is logged too because peers log it.
    stats = {
        "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, keep),
        "approx_kl_k1": masked_mean(-log_ratio, keep),
        "ratio_mean": masked_mean(ratio, keep),
    }
    stats["ratio_max"] = _masked_extreme(ratio, keep, largest=True, empty=1.0)
    stats["ratio_min"] = _masked_extreme(ratio, keep, largest=False, empty=1.0)
    return stats


def _masked_extreme(values: torch.Tensor, mask: torch.Tensor, *, largest: bool, empty: float) -> torch.Tensor:
    """Max (or min) over the masked entries as a 0-d tensor, ``empty`` when there are none.
    Written without boolean indexing or ``if mask.any()``, which would sync a GPU every step."""
    fill = -torch.inf if largest else torch.inf
    filled = torch.where(mask, values, torch.full_like(values, fill))
    extreme = filled.max() if largest else filled.min()
    return torch.where(mask.any(), extreme, torch.full_like(extreme, empty))


def _finish(
    loss: torch.Tensor, mask: torch.Tensor, is_weights: torch.Tensor | None
) -> torch.Tensor:
    if is_weights is not None:
        loss = loss * is_weights.detach().to(loss.dtype)
    # 0 at masked tokens, even where padding produced NaN/inf log-probabilities.
    return torch.where(mask.bool(), loss, torch.zeros_like(loss))


def ppo_clip_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    dual_clip_c: float | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Stats]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), per token, as a loss:
    l_t = -min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t), r_t = exp(logp_t - old_logp_t).

    logp, old_logp, mask: [B, T]; advantages: [B, T] or [B]; is_weights: [B, T] or None ->
    (per_token_loss [B, T], stats). ``eps_high=None`` means eps_high = eps_low (the paper's
    symmetric clip); a larger eps_high is DAPO's clip-higher. ``dual_clip_c`` (> 1) adds dual-clip:
    for A < 0 the loss is capped at c |A| (Ye et al. 2020). ``is_weights`` multiplies the loss
    (detached): the truncated importance weights of ``truncated_is_weights``.

    On-policy (logp == old_logp in value) the ratio is exactly 1, nothing is clipped, and the
    gradient is the vanilla policy gradient -A grad(logp). Stats: ``clip_frac`` (tokens whose
    gradient the clip zeroes), ``clip_frac_low`` / ``clip_frac_high`` (A < 0 below 1 - eps_low /
    A > 0 above 1 + eps_high), ``dual_clip_frac``, ``approx_kl`` (k3 of KL(old || new)),
    ``approx_kl_k1``, ``ratio_mean`` / ``ratio_max`` / ``ratio_min`` (over valid tokens).
    """
    _check_shapes(logp, old_logp, mask)
    eps_high = eps_low if eps_high is None else eps_high
    if dual_clip_c is not None and dual_clip_c <= 1.0:
        raise ValueError(f"dual_clip_c must be > 1 (Ye et al. 2020 use 3), got {dual_clip_c}")
    keep = mask.bool()
    advantages = _valid_only(_per_token_advantages(advantages, logp), keep)
    logp, old_logp = _valid_only(logp, keep), _valid_only(old_logp.detach(), keep)
    log_ratio = (logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    loss, low, high, dual = _clipped_surrogate(ratio, advantages, eps_low, eps_high, dual_clip_c)
    stats = _ratio_stats(log_ratio, ratio, keep)
    stats["clip_frac"] = masked_mean((low | high).to(logp.dtype), keep)
    stats["clip_frac_low"] = masked_mean(low.to(logp.dtype), keep)
    stats["clip_frac_high"] = masked_mean(high.to(logp.dtype), keep)
    stats["dual_clip_frac"] = masked_mean(dual.to(logp.dtype), keep)
    return _finish(loss, keep, is_weights), stats


def clip_higher_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip_c: float | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Stats]:
    """DAPO clip-higher (Yu et al. 2025, §3.1): PPO-clip with decoupled bounds, the upper one
    wider (defaults 0.2 / 0.28 from the paper) so low-probability tokens can gain mass and
    entropy does not collapse. Same shapes and stats as ``ppo_clip_loss``."""
    return ppo_clip_loss(
        logp, old_logp, advantages, mask,
        eps_low=eps_low, eps_high=eps_high, dual_clip_c=dual_clip_c, is_weights=is_weights,
    )


def dual_clip_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    dual_clip_c: float = 3.0,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Stats]:
    """Dual-clip PPO (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL",
    §3): for A < 0 the objective is max(min(r A, clip(r) A), c A), i.e. the loss is capped at
    c |A| so a huge ratio on a bad token cannot blow up the update (c = 3 as in the paper and
    verl). Same shapes and stats as ``ppo_clip_loss``."""
    return ppo_clip_loss(
        logp, old_logp, advantages, mask,
        eps_low=eps_low, eps_high=eps_high, dual_clip_c=dual_clip_c, is_weights=is_weights,
    )


def sequence_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Length-normalised sequence log-ratio (GSPO's log s_i): mean over the row's valid tokens of
    logp - old_logp. [B, T] -> [B]; 0 for a row without valid tokens."""
    return masked_mean(logp - old_logp.detach(), mask.bool(), dim=-1)


def gspo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Stats]:
    """GSPO (Zheng et al. 2025, arXiv 2507.18071, objective eq. 5): clip a *sequence* ratio
    s_i = (pi(y_i|x) / pi_old(y_i|x))^(1/|y_i|) = exp(mean_t (logp_t - old_logp_t)).

    logp, old_logp, mask: [B, T]; advantages: [B] or [B, T] -> (per_token_loss [B, T], stats).
    Written in the paper's GSPO-token form: s_i,t = sg[s_i] * pi(y_t) / sg[pi(y_t)], equal in value
    to s_i on every token of row i, so each valid token carries the sequence loss
    -min(s_i A, clip(s_i, 1 - eps_low, 1 + eps_high) A); with one advantage per row its gradient
    equals GSPO's under any aggregation that weighs a row's tokens equally (all of ours), and with
    ``seq-mean-token-mean`` the value is the paper's objective exactly. Defaults 3e-4 / 4e-4 are
    the paper's clip ranges. Stats as ``ppo_clip_loss`` (clip fractions count tokens, so a long
    clipped row weighs more) plus ``seq_clip_frac``, ``seq_ratio_mean`` / ``seq_ratio_max``.
    """
    _check_shapes(logp, old_logp, mask)
    keep = mask.bool()
    advantages = _valid_only(_per_token_advantages(advantages, logp), keep)
    logp, old_logp = _valid_only(logp, keep), _valid_only(old_logp.detach(), keep)
    seq_log_ratio = sequence_log_ratio(logp, old_logp, keep)
    log_ratio = (seq_log_ratio.detach().unsqueeze(-1) + logp - logp.detach()).clamp(
        -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP
    )
    ratio = torch.exp(log_ratio)
    loss, low, high, _ = _clipped_surrogate(ratio, advantages, eps_low, eps_high, None)
    stats = _ratio_stats(log_ratio, ratio, keep)
    stats["clip_frac"] = masked_mean((low | high).to(logp.dtype), keep)
    stats["clip_frac_low"] = masked_mean(low.to(logp.dtype), keep)
    stats["clip_frac_high"] = masked_mean(high.to(logp.dtype), keep)
    rows = keep.any(-1)
    seq_ratio = torch.exp(seq_log_ratio.detach())
    seq_clipped = ((low | high) & keep).any(-1)
    stats["seq_clip_frac"] = masked_mean(seq_clipped.to(logp.dtype), rows)
    stats["seq_ratio_mean"] = masked_mean(seq_ratio, rows)
    stats["seq_ratio_max"] = _masked_extreme(seq_ratio, rows, largest=True, empty=1.0)
    return _finish(loss, keep, is_weights), stats


@torch.no_grad()
def truncated_is_weights(
    old_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor, *, cap: float = 2.0
) -> tuple[torch.Tensor, Stats]:
    """Truncated importance sampling for the sampler/trainer mismatch (Yao et al. 2025, "Your
    Efficient RL Framework Secretly Brings You Off-Policy RL Training"): per-token weight
    w_t = min(exp(old_logp_t - sampler_logp_t), C), detached.

    old_logp: the *trainer's* log-probs of the sampled tokens under the sampling weights;
    sampler_logp: the inference engine's (``Rollout.logprobs``); mask: [B, T] -> (weights [B, T],
    stats). Multiply the per-token policy loss by the weights (``is_weights=``). The ratio is only
    truncated from above, as in the paper; C = 2 is the "TIS-2" setting of the blog (TRL's
    ``vllm_importance_sampling_clip_max`` defaults to 3). Masked tokens, and tokens whose sampler
    log-prob is NaN (unavailable), get weight 1, as in TRL. Stats: ``is_weight_mean``,
    ``is_truncated_frac`` (tokens where C binds), ``sampler_kl_k3`` (k3 estimate of
    KL(sampler || trainer)) and ``sampler_logp_abs_diff_max``: the mismatch to log each step.
    """
    if cap <= 0:
        raise ValueError(f"cap must be positive, got {cap}")
    keep = mask.bool()
    diff = torch.nan_to_num(old_logp.detach() - sampler_logp.detach(), nan=0.0)
    diff = torch.where(keep, diff, torch.zeros_like(diff))
    # min(exp(d), C) = exp(min(d, log C)): never overflows however large d is.
    weights = torch.exp(diff.clamp(max=math.log(cap)))
    stats = {
        "is_weight_mean": masked_mean(weights, keep),
        "is_truncated_frac": masked_mean((diff > math.log(cap)).to(weights.dtype), keep),
        "sampler_kl_k3": masked_mean(torch.expm1(diff.clamp(max=LOG_RATIO_CLAMP)) - diff, keep),
        "sampler_logp_abs_diff_max": _masked_extreme(diff.abs(), keep, largest=True, empty=0.0),
    }
    return weights, stats


POLICY_LOSSES.add("ppo_clip", ppo_clip_loss, aliases=("ppo", "ppo-clip"))
POLICY_LOSSES.add("clip_higher", clip_higher_loss, aliases=("clip-higher",))
POLICY_LOSSES.add("dual_clip", dual_clip_loss, aliases=("dual-clip",))
POLICY_LOSSES.add("gspo", gspo_loss)
