"""Evaluation tasks: a registry of functions that score a model and return metrics + records.

The pipeline's gates and ``posttrain eval`` use the same tasks. A task reads its data, generates
with the model (through a Sampler) or scores it directly, and returns named metrics plus one
record per sample (stored with the artifact as JSONL; see ``posttrain.evals.results``).

Each task registers a `TaskSpec` next to its function: the schema of its ``options`` and the
`EvalTaskConfig` fields it reads. `check_task_config` turns an unknown option, a bad option value
or a field the task would ignore into problems naming ``eval.N.options.KEY`` and the fix, before
any model is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ValidationError
from transformers import PreTrainedTokenizerBase

from posttrain.config.base import StrictModel, problems_from_validation
from posttrain.config.components import EvalTaskConfig
from posttrain.errors import Problem, UserError, problem
from posttrain.registry import Registry

if TYPE_CHECKING:
    from posttrain.evals.common import DataDefault


@dataclass
class EvalContext:
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    base_dir: Path | None = None  # for resolving relative data paths
    show_progress: bool = True
    seed: int = 0
    parent: Path | None = None  # the parent checkpoint's folder: win_rate's default baseline


@dataclass
class EvalResult:
    metrics: dict[str, float]
    records: list[dict[str, Any]] = field(default_factory=list)


EvalTask = Callable[[EvalContext, EvalTaskConfig], EvalResult]
EVAL_TASKS: Registry[EvalTask] = Registry("eval task")
_PROVIDERS = (
    "posttrain.evals.demo_world",
    "posttrain.evals.math_tasks",
    "posttrain.evals.code_tasks",
    "posttrain.evals.ifeval_task",
    "posttrain.evals.refusal",
    "posttrain.evals.win_rate",
    "posttrain.evals.probes",
    "posttrain.evals.calibration",
    "posttrain.evals.perplexity",
    "posttrain.evals.reward_model_tasks",
)

# EvalTaskConfig fields besides ``task`` and ``options`` that a task may read.
CONFIG_FIELDS = ("data", "limit", "max_new_tokens", "batch_size")


class NoOptions(StrictModel):
    """A task without options."""


@dataclass(frozen=True)
class TaskSpec:
    """What a task accepts (its options schema, the EvalTaskConfig fields it reads) and its
    default data (read by the contamination scan too)."""

    options: type[BaseModel] = NoOptions
    uses: tuple[str, ...] = CONFIG_FIELDS
    data: DataDefault | None = None


TASK_SPECS: dict[str, TaskSpec] = {}


def register_task(name: str, task: EvalTask, *, options: type[BaseModel] = NoOptions,
                  uses: tuple[str, ...] = CONFIG_FIELDS, data: DataDefault | None = None,
                  aliases: tuple[str, ...] = ()) -> None:
    EVAL_TASKS.add(name, task, aliases=aliases)
    TASK_SPECS[name] = TaskSpec(options, uses, data)


def _load_providers(name: str) -> None:
    if name not in EVAL_TASKS:
        for module in _PROVIDERS:
            __import__(module)


def get_task(name: str, where: str) -> EvalTask:
    _load_providers(name)
    return EVAL_TASKS.get(name, where=where)


def task_spec(name: str) -> TaskSpec:
    """The task's spec; user tasks (``"pkg.mod:fn"``) without one take no options."""
    _load_providers(name)
    return TASK_SPECS.get(EVAL_TASKS.canonical(name), TaskSpec()) if name in EVAL_TASKS else TaskSpec()


def check_task_config(cfg: EvalTaskConfig, where: str) -> list[Problem]:
    """Problems with one eval entry: unknown task, unknown or bad options, ignored fields."""
    try:
        get_task(cfg.task, f"{where}.task")
    except UserError as err:
        return err.problems
    spec = task_spec(cfg.task)
    problems = [
        problem(f"{where}.{name}", f"task {cfg.task!r} does not use {name!r}",
                f"remove it (task {cfg.task!r} reads: {', '.join(spec.uses) or 'none of these'})")
        for name in CONFIG_FIELDS if name not in spec.uses and cfg.explicitly_set(name)
    ]
    if spec.options is NoOptions and cfg.options:
        problems.append(problem(f"{where}.options", f"task {cfg.task!r} takes no options",
                                "remove options", value=sorted(cfg.options)))
        return problems
    try:
        spec.options.model_validate(cfg.options)
    except ValidationError as err:
        problems.extend(problems_from_validation(err, spec.options, prefix=(where, "options")))
    return problems


def task_options(cfg: EvalTaskConfig, where: str) -> Any:
    """The validated options of ``cfg``; raises UserError listing every problem."""
    problems = check_task_config(cfg, where)
    if problems:
        raise UserError(problems, title=f"{where} ({cfg.task}): {len(problems)} problem(s)")
    return task_spec(cfg.task).options.model_validate(cfg.options)


def check_eval_tasks(tasks: list[EvalTaskConfig], where: str = "eval") -> list[Problem]:
    """Problems with every entry of an eval list (``where.N...``); run before any model loads."""
    return [p for i, cfg in enumerate(tasks) for p in check_task_config(cfg, f"{where}.{i}")]


def run_evals(ctx: EvalContext, tasks: list[EvalTaskConfig], where: str = "eval"
              ) -> list[tuple[str, EvalResult]]:
    """Run each task in order; all entries are checked first, so a bad option in the last task
    fails before the first one generates."""
    problems = check_eval_tasks(tasks, where)
    if problems:
        raise UserError(problems, title=f"eval: {len(problems)} problem(s)")
    return [(cfg.task, get_task(cfg.task, "eval")(ctx, cfg)) for cfg in tasks]
