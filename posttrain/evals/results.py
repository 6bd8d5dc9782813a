"""Eval results on disk, and the comparison of two checkpoints' results.

Layout (a stage artifact's ``eval/`` folder, or any folder ``posttrain eval --out`` wrote)::

    metrics.json      {metric: value} of every task run there
    <task>.jsonl      one record per sample: {"id", "scores": {metric: value}, "weights"?, ...}

A record's ``scores`` hold its contribution to each metric that is a (weighted) mean over
samples: the metric is sum(w * score) / sum(w) over records (w = ``weights[metric]``, default 1).
``id`` is the sample's own id (task_id, key, ...) or its line, so the records of two checkpoints
evaluated on the same data align.

Comparison (`compare_results`), per metric present in both: the delta B - A of the stored
metrics and, where both runs have per-sample scores for it on common ids, a paired test on those
samples: the exact McNemar test when every score is 0 or 1 with unit weights (accuracy, pass@1
greedy, ...), else a paired bootstrap of the weighted-mean difference (2000 resamples, seeded),
which also gives a 95% interval of the delta.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.errors import UserError, problem
from posttrain.evals.base import EvalResult
from posttrain.evals.stats import mcnemar_exact, paired_bootstrap

METRICS_FILE = "metrics.json"
SIGNIFICANCE = 0.05


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_results(folder: Path, results: Sequence[tuple[str, EvalResult]]) -> dict[str, float]:
    """Write each task's records and merge its metrics into ``metrics.json``; returns the merged
    metrics. A task run again replaces its records and metrics."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / METRICS_FILE
    metrics: dict[str, float] = json.loads(path.read_text()) if path.exists() else {}
    for task, result in results:
        lines = "".join(json.dumps(record, default=str) + "\n" for record in result.records)
        _atomic_write(folder / f"{task}.jsonl", lines)
        metrics.update(result.metrics)
    _atomic_write(path, json.dumps(metrics, indent=2, sort_keys=True))
    return metrics


@dataclass
class RunResults:
    folder: Path
    metrics: dict[str, float]
    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # task -> records


def eval_folder(path: Path) -> Path | None:
    """The folder holding metrics.json: ``path`` itself, or an artifact's ``eval/``."""
    for candidate in (path, path / "eval"):
        if (candidate / METRICS_FILE).is_file():
            return candidate
    return None


def load_results(path: Path, where: str) -> RunResults:
    folder = eval_folder(Path(path))
    if folder is None:
        raise UserError(problem(where, f"no eval results in {str(path)!r} (no metrics.json there or in eval/)",
                                "point at a stage artifact folder or a folder written by `posttrain eval --out`"))
    try:
        metrics = json.loads((folder / METRICS_FILE).read_text())
    except json.JSONDecodeError as err:
        raise UserError(problem(f"{folder / METRICS_FILE}:{err.lineno}", f"malformed JSON: {err.msg}",
                                "re-run the evaluation")) from err
    records: dict[str, list[dict[str, Any]]] = {}
    for file in sorted(folder.glob("*.jsonl")):
        rows = []
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise UserError(problem(f"{file}:{number}", f"malformed JSON: {err.msg}",
                                            "re-run the evaluation")) from err
        records[file.stem] = rows
    return RunResults(folder, metrics, records)


@dataclass
class MetricComparison:
    metric: str
    a: float
    b: float
    test: str = "none"  # "mcnemar" | "paired bootstrap" | "none" (no aligned per-sample scores)
    p_value: float | None = None
    low: float | None = None  # 95% interval of the delta (bootstrap only)
    high: float | None = None
    paired: int = 0  # samples the test used

    @property
    def delta(self) -> float:
        return self.b - self.a

    @property
    def significant(self) -> bool:
        return self.p_value is not None and self.p_value < SIGNIFICANCE


def per_sample_scores(run: RunResults) -> dict[str, dict[str, tuple[float, float]]]:
    """metric -> sample id -> (score, weight), from every record of the run."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for records in run.records.values():
        for record in records:
            weights = record.get("weights") or {}
            for metric, value in (record.get("scores") or {}).items():
                out.setdefault(metric, {})[str(record.get("id"))] = (float(value), float(weights.get(metric, 1.0)))
    return out


def compare_results(a: RunResults, b: RunResults, *, resamples: int = 2000, seed: int = 0) -> list[MetricComparison]:
    """Every metric in both runs, with a paired test where the samples align."""
    scores_a, scores_b = per_sample_scores(a), per_sample_scores(b)
    rows = []
    for metric in sorted(set(a.metrics) & set(b.metrics)):
        row = MetricComparison(metric, float(a.metrics[metric]), float(b.metrics[metric]))
        common = sorted(set(scores_a.get(metric, {})) & set(scores_b.get(metric, {})))
        if common:
            _paired_test(row, [scores_a[metric][i] for i in common], [scores_b[metric][i] for i in common],
                         resamples, seed)
        rows.append(row)
    return rows


def _paired_test(row: MetricComparison, a: list[tuple[float, float]], b: list[tuple[float, float]],
                 resamples: int, seed: int) -> None:
    values_a, values_b = [v for v, _ in a], [v for v, _ in b]
    weights = [(wa + wb) / 2 for (_, wa), (_, wb) in zip(a, b)]  # equal unless tokenizers differ
    binary = all(v in (0.0, 1.0) for v in values_a + values_b) and all(w == 1.0 for w in weights)
    row.paired = len(a)
    if binary:
        row.test, row.p_value = "mcnemar", mcnemar_exact(values_a, values_b)
        return
    result = paired_bootstrap(values_a, values_b, weights, resamples=resamples, seed=seed)
    row.test, row.p_value, row.low, row.high = "paired bootstrap", result.p_value, result.low, result.high


def format_comparison(rows: list[MetricComparison], label_a: str, label_b: str) -> str:
    """A plain-text table; ``*`` marks p < 0.05."""
    header = ["metric", "A", "B", "delta", "95% CI", "p", "test", "paired"]
    lines = [[r.metric, f"{r.a:.4g}", f"{r.b:.4g}", f"{r.delta:+.4g}" + ("*" if r.significant else ""),
              f"[{r.low:+.3g}, {r.high:+.3g}]" if r.low is not None else "",
              f"{r.p_value:.3g}" if r.p_value is not None else "", r.test if r.test != "none" else "",
              str(r.paired) if r.paired else ""] for r in rows]
    widths = [max(len(x) for x in column) for column in zip(header, *lines)]
    render = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in [header, *lines]]
    notes = [f"A = {label_a}", f"B = {label_b}", "* p < 0.05 (exact McNemar for 0/1 scores, paired bootstrap "
             "otherwise; only samples present in both runs are paired)"]
    return "\n".join(render + [""] + notes)
