"""Checks of a recipe's inputs that need no model weights: files exist and are readable, model
paths exist, eval tasks are known. ``posttrain validate`` runs these after the schema checks."""

from __future__ import annotations

import os

from posttrain.config.components import DataConfig
from posttrain.config.recipe import Recipe
from posttrain.config.stage_base import datasets_in
from posttrain.errors import Problem, problem
from posttrain.evals.base import check_eval_tasks
from posttrain.models.load import check_model_source
from posttrain.stages import STAGE_RUNNERS


def check_inputs(recipe: Recipe) -> list[Problem]:
    problems: list[Problem] = []
    for name, stage in recipe.stages.items():
        where = f"stages.{name}"
        for path, data in datasets_in(stage, where):
            problems.extend(_check_data(data, path, recipe))
        if stage.model is not None:
            problems.extend(check_model_source(stage.model, f"{where}.model", recipe.base_dir))
        runner = STAGE_RUNNERS.get(stage.kind, where=f"{where}.kind")()
        if hasattr(runner, "check"):
            problems.extend(runner.check(stage, where))
        problems.extend(check_eval_tasks(stage.eval, f"{where}.eval"))
    return problems


def _check_data(data: DataConfig, where: str, recipe: Recipe) -> list[Problem]:
    if not data.path:
        return []
    path = recipe.resolve(data.path)
    if not path.exists():
        return [problem(f"{where}.path", f"data file {str(path)!r} does not exist",
                        "check the path (relative paths start at the recipe's folder)")]
    if path.is_dir():
        return [problem(f"{where}.path", f"{str(path)!r} is a directory", "point at a data file")]
    if not os.access(path, os.R_OK):
        return [problem(f"{where}.path", f"cannot read {str(path)!r} (permission denied)",
                        "fix the file's permissions")]
    return []
