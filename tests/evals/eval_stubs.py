"""Stand-ins named by "module:object" in eval entries: a reward model (the ResponseScorer
protocol) and a user task that counts its calls. Importable as ``tests.evals.eval_stubs`` when the
repository root is on sys.path (the ``stubs_importable`` fixture puts it there)."""

from __future__ import annotations

CALLS: list[str] = []


def by_length(prompts, responses) -> list[float]:
    """Longer responses score higher."""
    return [float(len(r)) for r in responses]


def counting_task(ctx, cfg):
    from posttrain.evals.base import EvalResult

    CALLS.append(cfg.task)
    return EvalResult({"count": float(len(CALLS))})
