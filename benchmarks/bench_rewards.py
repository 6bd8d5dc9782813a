"""The reward both sides of benchmarks/grpo.py use: one deterministic function of the completion text.

``digit_share`` is the share of a completion's characters that are digits or arithmetic signs (a
number in [0, 1]; 0 for an empty completion). It means little for a random model, but it is cheap,
deterministic, side-effect free and varies within a group, so group-normalised advantages are not
all zero. Ours names it ``bench_rewards:digit_share_row`` (a verifier: completion, row ->
RewardResult); TRL gets ``digit_share_reward`` (completions, **kwargs -> list of floats).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MATHY = frozenset("0123456789+-*/=.%$")


def digit_share(text: str) -> float:
    return sum(c in MATHY for c in text) / len(text) if text else 0.0


def digit_share_row(completion: str, row: Mapping[str, Any]):
    """posttrain verifier form."""
    from posttrain.types import RewardResult

    score = digit_share(completion)
    return RewardResult(score, {"digit_share": score})


def digit_share_reward(completions: list[str], **kwargs: Any) -> list[float]:
    """TRL reward-function form."""
    return [digit_share(c) for c in completions]
