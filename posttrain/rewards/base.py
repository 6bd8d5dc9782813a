"""Rewards by spec: verifiers, reward models, user functions, and their weighted combination.

A reward scores completions given their prompt rows: ``(completions, rows) -> [RewardResult]``.
``None`` masks a sample (a sandbox that could not start, an ensemble too uncertain); it is never
turned into 0 or NaN. The combined score of several rewards is their weighted sum, or None when
any of them masked the sample.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.errors import UserError, problem
from posttrain.registry import Registry
from posttrain.rewards.verifiers import Verifier, get_verifier
from posttrain.types import RewardResult

Scorer = Callable[[Sequence[str], Sequence[Mapping[str, Any]]], list[RewardResult]]
# name -> builder(params, path, where, base_dir) for rewards that are models, not verifiers.
MODEL_REWARDS: Registry[Callable[..., Scorer]] = Registry("model reward")
_MODEL_REWARD_PROVIDERS = ("posttrain.rewards.reward_model",)


@dataclass
class VerifierScorer:
    """A verifier applied to each completion; the spec's extra keys are added to every row."""

    verifier: Verifier
    params: dict[str, Any]

    def __call__(self, completions: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> list[RewardResult]:
        return [self.verifier(c, {**row, **self.params}) for c, row in zip(completions, rows)]


def build_scorer(name: str, params: dict[str, Any], *, where: str, path: str | None = None,
                 base_dir: Path | None = None) -> Scorer:
    """A scorer for a reward spec (a verifier kind, a model reward, or ``pkg.mod:fn``)."""
    if name not in MODEL_REWARDS:
        for module in _MODEL_REWARD_PROVIDERS:
            try:
                __import__(module)
            except ModuleNotFoundError:
                pass
    if name in MODEL_REWARDS:
        return MODEL_REWARDS.get(name)(params=params, path=path, where=where, base_dir=base_dir)
    if path is not None:
        raise UserError(problem(f"{where}.path", f"reward {name!r} takes no path", "remove 'path'"))
    try:
        return VerifierScorer(get_verifier(name), params)
    except UserError as err:
        raise UserError([problem(f"{where}.name", p.message, p.fix) for p in err.problems]) from err


def combine(per_reward: dict[str, list[RewardResult]], weights: dict[str, float]
            ) -> list[tuple[float | None, dict[str, float]]]:
    """Weighted sum per sample, with each reward's score as a component; None if any is None."""
    names = list(per_reward)
    count = len(per_reward[names[0]]) if names else 0
    out = []
    for i in range(count):
        components = {}
        total: float | None = 0.0
        for name in names:
            score = per_reward[name][i].score
            if score is None:
                total = None
                continue
            components[name] = float(score)
            if total is not None:
                total += weights[name] * float(score)
        out.append((total, components))
    return out
