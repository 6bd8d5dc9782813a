"""The contamination scan between a training stage's data and the recipe's eval sets.

`guard_training_data` is what the pipeline runs before a training stage when the recipe has eval
tasks: it reads each task's eval rows (its ``data``, else its default data, the same rows the task
will score), scans the stage's training examples against them (`posttrain.data.contamination`),
writes the report, and applies ``on_contamination``: ``report`` keeps everything, ``drop``
removes the overlapping training rows, ``fail`` raises a UserError listing them. An eval task
whose data cannot be found (a default file under an unset ``$POSTTRAIN_EVAL_DATA``) is skipped
and named in the report; one without data to read (``reward_hacking``'s built-in probes) is
skipped silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from posttrain.config.components import EvalTaskConfig
from posttrain.data.contamination import (
    ContaminationReport,
    ScanSettings,
    TextRow,
    apply_policy,
    row_from_example,
    scan,
)
from posttrain.data.formats import load_dataset
from posttrain.errors import UserError
from posttrain.evals.base import task_spec
from posttrain.evals.common import resolve_data
from posttrain.types import Example


def eval_rows(tasks: Sequence[EvalTaskConfig], *, base_dir: Path | None = None, where: str = "eval"
              ) -> tuple[dict[str, list[TextRow]], list[str]]:
    """Each task's eval rows as text, keyed ``<task>`` (``<task>#N`` for a repeated task), and the
    tasks skipped with the reason."""
    sets: dict[str, list[TextRow]] = {}
    skipped: list[str] = []
    seen: set[str] = set()
    for i, cfg in enumerate(tasks):
        spec = task_spec(cfg.task)
        if cfg.data is None and spec.data is None:
            continue  # the task brings its own probes, or has nothing to read
        try:
            data = resolve_data(cfg, spec.data, f"{where}.{i}")
        except UserError as err:
            skipped.append(f"{cfg.task}: {err.problems[0].message}")
            continue
        key = repr(data.model_dump())
        if key in seen:
            continue  # two tasks on the same rows are scanned once
        seen.add(key)
        # Benchmark tasks read their rows as prompts (as the task does); others detect the format.
        fmt = "prompt" if data.format == "auto" and spec.data is not None else data.format
        dataset = load_dataset(data.model_copy(update={"format": fmt}), where=f"{where}.{i}.data", base_dir=base_dir)
        name = cfg.task if cfg.task not in sets else f"{cfg.task}#{i}"
        examples = dataset.examples[: cfg.limit] if cfg.limit else dataset.examples
        sets[name] = [row_from_example(e) for e in examples]
    return sets, skipped


def guard_training_data(examples: Sequence[Example], eval_tasks: Sequence[EvalTaskConfig], *,
                        on_contamination: str = "report", base_dir: Path | None = None, where: str = "data",
                        report_path: Path | None = None, settings: ScanSettings | None = None
                        ) -> tuple[list[Example], ContaminationReport]:
    """Scan ``examples`` against the eval sets of ``eval_tasks`` and apply the policy.

    Returns the examples to train on (all of them unless ``drop``) and the report; writes the
    report's pairs as JSONL to ``report_path`` when given. Raises UserError with the overlapping
    rows under ``fail``. ``where`` names the config key in messages (e.g. ``stages.sft.data``).
    """
    sets, skipped = eval_rows(eval_tasks, base_dir=base_dir)
    report = scan([row_from_example(e) for e in examples], sets, settings)
    report.skipped = skipped
    if report_path is not None:
        report.write_jsonl(report_path)
    kept = apply_policy(report, list(examples), [e.source for e in examples], on_contamination, where=where)
    return kept, report
