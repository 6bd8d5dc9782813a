"""PPO's critic: the clipped value loss and the explained variance, as pure tensor functions.

Shapes (letters from ``posttrain.types``): B rows, T completion tokens per row (right-padded).
``values`` [B, T] are the critic's predictions V(s_t) at the state before token t (with gradient),
``old_values`` [B, T] the same critic's predictions at rollout time (detached), ``returns`` [B, T]
the GAE returns A + V_old (``advantages.gae``), ``mask`` [B, T] 1 where the token is trained on.

Like the policy losses, ``value_loss`` returns the loss *unreduced* (0 at masked tokens) with
detached 0-d stats; reduce it with ``posttrain.losses.aggregation`` and the step's global
normalisers, so the critic's loss, like the policy's, does not change with the micro-batch split
or the process count.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from posttrain.losses.aggregation import masked_mean

Stats = dict[str, torch.Tensor]


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None,
) -> tuple[torch.Tensor, Stats]:
    """Clipped value loss for PPO's critic, per token:
    l_t = 0.5 max((V_t - R_t)^2, (V_old_t + clip(V_t - V_old_t, -c, c) - R_t)^2).

    values (with gradient), old_values, returns, mask: [B, T] -> (per_token_loss [B, T], stats).
    The PPO paper (Schulman et al. 2017, eq. 9, the L^VF term) uses the plain squared error
    (V - V^targ)^2; the clipped form and the 0.5 come from OpenAI baselines ``ppo2`` (and Ilyas et
    al. 2020, "A Closer Look at Deep Policy Gradients", study it) and are what TRL
    (``cliprange_value``), verl (``cliprange_value``) and OpenRLHF (``value_clip``) use. The PPO
    paper's c_1 (vf_coef) is not here: our critic has its own optimizer, so its scale is the
    critic's learning rate. ``clip=None`` gives the plain 0.5 (V - R)^2. Where the clipped error
    is the larger, the gradient is 0 once V has moved more than c from V_old.

    Stats (local masked means): ``value_clip_frac`` (tokens where the clipped error is the larger),
    ``value_mean``, ``value_error`` (mean squared error, unclipped).
    """
    if not (values.shape == old_values.shape == returns.shape == mask.shape) or values.dim() != 2:
        raise ValueError("values, old_values, returns and mask must all be [B, T]")
    keep = mask.bool()
    # Padding may hold anything; zero it before any arithmetic so no NaN reaches the gradient.
    values = torch.where(keep, values, torch.zeros_like(values))
    returns = torch.where(keep, returns.detach(), torch.zeros_like(values))
    unclipped = (values - returns).pow(2)
    if clip is None:
        loss = 0.5 * unclipped
        clipped_frac = torch.zeros((), dtype=values.dtype, device=values.device)
    else:
        if clip <= 0:
            raise ValueError(f"clip must be > 0 (or None for no clipping), got {clip}")
        old_values = torch.where(keep, old_values.detach(), torch.zeros_like(values))
        clipped_values = old_values + (values - old_values).clamp(-clip, clip)
        clipped = (clipped_values - returns).pow(2)
        loss = 0.5 * torch.maximum(unclipped, clipped)
        clipped_frac = masked_mean((clipped > unclipped).to(values.dtype), keep)
    stats = {
        "value_clip_frac": clipped_frac,
        "value_mean": masked_mean(values.detach(), keep),
        "value_error": masked_mean(unclipped.detach(), keep),
    }
    return torch.where(keep, loss, torch.zeros_like(loss)), stats


@torch.no_grad()
def value_moments(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Sums over the masked tokens from which ``explained_variance`` is computed: add the dicts of
    several micro-batches or processes (``allreduce_sum``) to get the global batch's.

    values, returns, mask: [B, T] -> {tokens, returns, returns_sq, error, error_sq} (error = R - V).
    """
    keep = mask.bool()
    returns = torch.where(keep, returns.detach(), torch.zeros_like(returns)).to(torch.float64)
    error = returns - torch.where(keep, values.detach(), torch.zeros_like(values)).to(torch.float64)
    return {"tokens": float(keep.sum()), "returns": float(returns.sum()), "returns_sq": float(returns.pow(2).sum()),
            "error": float(error.sum()), "error_sq": float(error.pow(2).sum())}


def explained_variance(moments: Mapping[str, float]) -> float:
    """1 - Var(R - V) / Var(R) over the tokens summed in ``moments`` (``value_moments``); the
    population variance (the 1/N factors cancel). 1 = the critic predicts the returns exactly,
    0 = no better than a constant, < 0 = worse. NaN when the returns do not vary (or no tokens).
    The diagnostic of baselines ``ppo2``, logged by TRL, verl and OpenRLHF alike."""
    n = moments["tokens"]
    if n <= 0:
        return float("nan")
    var_returns = moments["returns_sq"] / n - (moments["returns"] / n) ** 2
    var_error = moments["error_sq"] / n - (moments["error"] / n) ** 2
    # Sums of squares cancel to ~1e-17 (not 0) for constant returns: treat that as no variance.
    return 1.0 - var_error / var_returns if var_returns > 1e-12 else float("nan")
