"""Evaluation tasks: a registry of functions that score a model and return metrics + records.

The pipeline's gates and ``posttrain eval`` use the same tasks. A task reads its data, generates
with the model (through a Sampler) or scores it directly, and returns named metrics plus one
record per sample (stored with the artifact as JSONL).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from posttrain.config.components import EvalTaskConfig
from posttrain.registry import Registry


@dataclass
class EvalContext:
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    base_dir: Path | None = None  # for resolving relative data paths
    show_progress: bool = True
    seed: int = 0


@dataclass
class EvalResult:
    metrics: dict[str, float]
    records: list[dict[str, Any]] = field(default_factory=list)


EvalTask = Callable[[EvalContext, EvalTaskConfig], EvalResult]
EVAL_TASKS: Registry[EvalTask] = Registry("eval task")
_PROVIDERS = ("posttrain.evals.demo_world",)


def get_task(name: str, where: str) -> EvalTask:
    if name not in EVAL_TASKS:
        for module in _PROVIDERS:
            __import__(module)
    return EVAL_TASKS.get(name, where=where)


def run_evals(ctx: EvalContext, tasks: list[EvalTaskConfig]) -> list[tuple[str, EvalResult]]:
    return [(cfg.task, get_task(cfg.task, "eval")(ctx, cfg)) for cfg in tasks]
