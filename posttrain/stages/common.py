"""Wiring shared by stage kinds: the stage context, the starting model, saving and evals."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from posttrain.config.components import DataConfig, ModelConfig
from posttrain.config.recipe import Recipe
from posttrain.config.stages import StageConfig
from posttrain.config.stages.data import RewardSpec
from posttrain.data.formats import Dataset, load_dataset
from posttrain.errors import UserError, problem
from posttrain.evals.base import EvalContext, run_evals
from posttrain.loops.distributed import DistInfo
from posttrain.loops.state import crash_point
from posttrain.models.load import (
    apply_lora,
    chat_template_text,
    load_model,
    load_saved,
    load_tokenizer,
    resolve_local,
    save_model,
)
from posttrain.registry import Registry
from posttrain.rewards.base import Scorer, build_scorer


@dataclass
class StageContext:
    """What a stage needs to know about its place in the pipeline."""

    name: str
    config: StageConfig
    recipe: Recipe
    out_dir: Path  # this run's folder (created by the runner after prepare succeeded)
    parents: dict[str, Path]  # parent stage name -> its artifact folder (absent if not yet built)
    dist: DistInfo
    show_progress: bool = True

    def load_data(self, cfg: DataConfig, key: str = "data", expect: tuple[str, ...] = ()) -> Dataset:
        """A dataset named in this stage's config (``key`` is its YAML key, for errors)."""
        return load_dataset(cfg, where=f"{self.where}.{key}", base_dir=self.recipe.base_dir, expect=expect,
                            artifacts=self.parents)

    @property
    def workdir(self) -> Path:
        """The pipeline's workdir (out_dir is <workdir>/stages/<stage>/<key>)."""
        return self.out_dir.parents[2]

    @property
    def where(self) -> str:
        return f"stages.{self.name}"

    @property
    def seed(self) -> int:
        train = getattr(self.config, "train", None)
        return train.seed if train is not None and train.seed is not None else self.recipe.seed


@dataclass
class StageOutput:
    metrics: dict[str, float]
    alarms: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # data reports, resolved training numbers


class StageRunner(Protocol):
    """A stage kind's behaviour. ``prepare`` reads and checks every input without writing
    anything (bad input fails here, before any output exists); ``run`` does the work."""

    def prepare(self, ctx: StageContext) -> Any: ...

    def describe(self, ctx: StageContext, prepared: Any) -> dict[str, Any]: ...

    def run(self, ctx: StageContext, prepared: Any) -> StageOutput: ...


STAGE_RUNNERS: Registry[Callable[[], StageRunner]] = Registry("stage kind")


def root_model_config(ctx: StageContext) -> tuple[str, ModelConfig]:
    """The nearest ancestor (or self) that names a model, and its model block."""
    name, stage = ctx.name, ctx.config
    seen = set()
    while stage.from_ and stage.from_ not in seen:
        seen.add(name)
        name, stage = stage.from_, ctx.recipe.stages[stage.from_]
    assert stage.model is not None
    return name, stage.model


def stage_tokenizer(ctx: StageContext) -> PreTrainedTokenizerBase:
    """The tokenizer the stage trains with: its parent's, else the root model's."""
    parent, own = ctx.config.from_, ctx.config.model
    if parent and parent in ctx.parents:
        tokenizer = artifact_tokenizer(ctx.parents[parent])
        if own is not None and own.chat_template:
            tokenizer.chat_template = chat_template_text(own.chat_template, f"{ctx.where}.model",
                                                              ctx.recipe.base_dir)
        return tokenizer
    root, cfg = root_model_config(ctx)
    artifact = None if cfg.tokenizer else pipeline_artifact(cfg.path, ctx.recipe.base_dir)
    if artifact is not None:
        tokenizer = artifact_tokenizer(artifact)
        template = _nearest_template(ctx)
        if template:
            tokenizer.chat_template = chat_template_text(template, f"stages.{root}.model", ctx.recipe.base_dir)
        return tokenizer
    return load_tokenizer(cfg.tokenizer or cfg.path or "", where=f"stages.{root}.model.tokenizer",
                          base_dir=ctx.recipe.base_dir, chat_template=_nearest_template(ctx),
                          revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)


def _nearest_template(ctx: StageContext) -> str | None:
    """The chat template override closest to this stage on its chain of ``from`` parents."""
    stage, seen = ctx.config, set()
    while True:
        if stage.model is not None and stage.model.chat_template:
            return stage.model.chat_template
        if not stage.from_ or stage.from_ in seen:
            return None
        seen.add(stage.from_)
        stage = ctx.recipe.stages[stage.from_]


def pipeline_artifact(spec: str | None, base_dir: Path | None) -> Path | None:
    """A model path that names a posttrain workdir (its head) or a stage artifact, as the
    artifact folder; None for a save_pretrained folder or a hub id. So a recipe can start from
    another pipeline's promoted model: ``model: {path: ../runs/demo}``."""
    if not spec:
        return None
    path = resolve_local(spec, base_dir)
    if path is None:
        return None
    if (path / "HEAD.json").exists():
        return Path(json.loads((path / "HEAD.json").read_text())["artifact"])
    if (path / "manifest.json").exists():
        return path
    return None


def artifact_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder / ("model" if (folder / "model").is_dir() else "adapter")))


def load_artifact_model(folder: Path) -> PreTrainedModel:
    """A model stage's output (full weights, or an adapter merged onto the base it was trained on)."""
    manifest = json.loads((folder / "manifest.json").read_text()) if (folder / "manifest.json").exists() else {}
    base = manifest.get("model_base")
    model, _ = load_saved(folder, base=Path(base) if base else None)
    return model


def starting_model(ctx: StageContext, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """The stage's starting weights: the parent's output, or the model block (no LoRA yet)."""
    if ctx.config.from_:
        folder = ctx.parents.get(ctx.config.from_)
        if folder is None:
            raise UserError(problem(f"{ctx.where}.from", f"stage {ctx.config.from_!r} has no artifact yet",
                                    "run the pipeline from the parent stage"))
        return load_artifact_model(folder)
    assert ctx.config.model is not None
    artifact = pipeline_artifact(ctx.config.model.path, ctx.recipe.base_dir)
    if artifact is not None:
        return load_artifact_model(artifact)
    return load_model(ctx.config.model, tokenizer, where=f"{ctx.where}.model", base_dir=ctx.recipe.base_dir)


def stage_model(ctx: StageContext, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """The policy to train: the starting model, with LoRA and activation checkpointing if asked."""
    own = ctx.config.model
    model = starting_model(ctx, tokenizer)
    if own is not None and own.lora is not None:
        model = apply_lora(model, own.lora)
    train = getattr(ctx.config, "train", None)
    if train is not None and train.gradient_checkpointing:
        enable_activation_checkpointing(model)
    return model


def contamination_guard(ctx: StageContext, examples: list, key: str = "data") -> tuple[list, dict[str, Any]]:
    """Scan a training stage's examples against every eval set of the recipe (before training);
    report, fail or drop per the recipe's ``on_contamination``. Returns (examples, summary)."""
    tasks = ctx.recipe.eval_tasks()
    if not tasks:
        return examples, {}
    from posttrain.evals.contamination import guard_training_data

    kept, report = guard_training_data(examples, tasks, on_contamination=ctx.recipe.on_contamination,
                                       base_dir=ctx.recipe.base_dir, where=f"{ctx.where}.{key}")
    return kept, {"overlapping_rows": len(report.contaminated_train()), "pairs": len(report.overlaps),
                  "dropped": len(examples) - len(kept), "policy": ctx.recipe.on_contamination,
                  "skipped": list(report.skipped), "examples": [o.describe() for o in report.overlaps[:10]]}


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Recompute layer activations in backward (transformers 5 renamed the method)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def finish_model_stage(ctx: StageContext, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
                       ) -> dict[str, float]:
    """Save the model (rank 0) and run the stage's evals; returns the eval metrics."""
    lora = ctx.config.model.lora if ctx.config.model is not None else None
    if ctx.dist.is_main:
        save_model(model, tokenizer, ctx.out_dir, merge_lora=bool(lora and lora.merge_on_save))
    crash_point("model.saved")
    return evaluate(ctx, model, tokenizer)


def evaluate(ctx: StageContext, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> dict[str, float]:
    if not ctx.config.eval or not ctx.dist.is_main:
        return {}
    eval_ctx = EvalContext(model=model, tokenizer=tokenizer, base_dir=ctx.recipe.base_dir,
                           show_progress=ctx.show_progress, seed=ctx.seed,
                           parent=ctx.parents.get(ctx.config.from_ or ""))
    metrics: dict[str, float] = {}
    folder = ctx.out_dir / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    for task, result in run_evals(eval_ctx, ctx.config.eval, where=f"{ctx.where}.eval"):
        metrics.update(result.metrics)
        with open(folder / f"{task}.jsonl", "w", encoding="utf-8") as f:
            for record in result.records:
                f.write(json.dumps(record, default=str) + "\n")
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def reward_scorers(ctx: StageContext, rewards: list[RewardSpec]) -> tuple[dict[str, Scorer], dict[str, float]]:
    """A stage's rewards by name (a repeated name gets ``_2``, ``_3``, ...) and their weights. A
    reward model named by stage (``from``) is read from that stage's artifact."""
    seen: dict[str, int] = {}
    names = []
    for r in rewards:
        base = r.name.split(":")[-1]
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
    scorers = {}
    for i, (name, r) in enumerate(zip(names, rewards)):
        where, path = f"{ctx.where}.rewards.{i}", r.path
        if r.from_:
            folder = ctx.parents.get(r.from_)
            if folder is None:
                raise UserError(problem(f"{where}.from", f"stage {r.from_!r} has no artifact yet",
                                        "run the pipeline from that stage"))
            path = str(folder)
        scorers[name] = build_scorer(r.name, r.params(), where=where, path=path, base_dir=ctx.recipe.base_dir)
    return scorers, {n: r.weight for n, r in zip(names, rewards)}
