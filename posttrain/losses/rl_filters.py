"""DAPO's sample filters as pure tensor functions: dynamic sampling and overlong filtering.

Shapes (letters from ``posttrain.types``): P prompts, G completions per prompt, B = P x G rows
(prompt-major: row p * G + g), T completion tokens.

The soft overlong *penalty* (DAPO §3.4, a reward that decreases over the last tokens before the
limit) is a reward, not a filter: it lives in ``posttrain.rewards.verifiers.structured``.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def groups_with_signal(
    rewards: torch.Tensor, valid: torch.Tensor | None = None, *, atol: float = 0.0
) -> torch.Tensor:
    """Dynamic sampling (Yu et al. 2025, DAPO §3.2): keep only groups whose rewards differ.

    rewards, valid: [P, G] -> keep [P] bool. A group whose valid rewards are all equal (all
    correct or all wrong: max - min <= atol) has zero advantage under every group-baseline
    estimator, so it only dilutes the batch; a group with fewer than 2 valid samples has no
    baseline at all. Both are dropped (keep False). The stage over-samples prompts until it has
    enough kept groups; this function only says which ones. Invalid entries of ``rewards`` may
    hold anything (0, NaN). TRL logs the same condition as ``frac_reward_zero_std``.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [P, G], got shape {tuple(rewards.shape)}")
    valid = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid.bool()
    rewards = rewards.detach()
    highest = torch.where(valid, rewards, torch.full_like(rewards, -torch.inf)).max(-1).values
    lowest = torch.where(valid, rewards, torch.full_like(rewards, torch.inf)).min(-1).values
    enough = valid.sum(-1) >= 2
    # With < 2 valid samples highest - lowest is -inf or NaN; `enough` decides those rows.
    spread = torch.nan_to_num(highest - lowest, nan=0.0, neginf=0.0)
    return enough & (spread > atol)


@torch.no_grad()
def overlong_filter(truncated: torch.Tensor) -> torch.Tensor:
    """Overlong filtering (Yu et al. 2025, DAPO §3.4): a completion cut off by the length limit
    has no trustworthy reward, so its loss is masked out.

    truncated: [B] bool (``Rollout.truncated``, finish reason "length") -> keep [B] bool. TRL's
    ``mask_truncated_completions=True`` does the same. Apply with ``mask_rows``; count the kept
    rows in ``GlobalNormalisers`` (rows left with an all-zero mask are not counted as sequences).
    """
    if truncated.dim() != 1:
        raise ValueError(f"truncated must be [B], got shape {tuple(truncated.shape)}")
    return ~truncated.bool()


def mask_rows(mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Zero the token mask of dropped rows: mask [B, T], keep [B] -> [B, T] (same dtype as mask)."""
    if keep.shape != mask.shape[:1]:
        raise ValueError(f"keep {tuple(keep.shape)} must be [B] for mask {tuple(mask.shape)}")
    return mask * keep.to(mask.dtype).unsqueeze(-1) if mask.dtype != torch.bool else mask & keep.unsqueeze(-1)
