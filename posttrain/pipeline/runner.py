"""Run a recipe: stages in topological order, cached by content key, resumable, locked.

Before anything is written, every stage that will run is *prepared* (its data read, rendered and
checked), so bad input in the last stage fails in seconds with no partial output, instead of
after hours of training the first ones.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import posttrain.stages  # noqa: F401  (registers the stage runners)
from posttrain.config.recipe import Recipe, stage_parents, topological_order
from posttrain.loops.distributed import DistInfo, barrier, init_distributed
from posttrain.monitoring.progress import console
from posttrain.pipeline.artifacts import (
    Artifact,
    WorkdirLock,
    append_ledger,
    artifact_for,
    data_fingerprints,
    stage_key,
    write_manifest,
)
from posttrain.provenance import code_version, source_hash
from posttrain.stages.common import STAGE_RUNNERS, StageContext, StageRunner


@dataclass
class StageReport:
    name: str
    kind: str
    key: str
    status: str  # ran | cached
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    folder: Path | None = None
    alarms: list[dict[str, Any]] = field(default_factory=list)


def stage_keys(recipe: Recipe) -> dict[str, str]:
    keys: dict[str, str] = {}
    for name in topological_order(recipe):
        stage = recipe.stages[name]
        keys[name] = stage_key(stage, recipe, {p: keys[p] for p in stage_parents(stage)})
    return keys


def _context(recipe: Recipe, name: str, workdir: Path, keys: dict[str, str], info: DistInfo,
             show_progress: bool) -> StageContext:
    stage = recipe.stages[name]
    parents = {}
    for p in stage_parents(stage):
        artifact = artifact_for(workdir, p, keys[p])
        if artifact.complete:
            parents[p] = artifact.folder
    return StageContext(name=name, config=stage, recipe=recipe, out_dir=artifact_for(workdir, name, keys[name]).folder,
                        parents=parents, dist=info, show_progress=show_progress)


def _runner(recipe: Recipe, name: str) -> StageRunner:
    return STAGE_RUNNERS.get(recipe.stages[name].kind, where=f"stages.{name}.kind")()


def prepare_all(recipe: Recipe, workdir: Path, info: DistInfo, show_progress: bool = True
                ) -> tuple[dict[str, str], dict[str, tuple[StageRunner, Any]]]:
    """Keys of every stage, and the prepared inputs of every stage that is not cached."""
    keys = stage_keys(recipe)
    prepared: dict[str, tuple[StageRunner, Any]] = {}
    for name in topological_order(recipe):
        if artifact_for(workdir, name, keys[name]).complete:
            continue
        runner = _runner(recipe, name)
        if _waits_for_data(recipe, name, workdir, keys):
            prepared[name] = (runner, DEFERRED)
            continue
        ctx = _context(recipe, name, workdir, keys, info, show_progress)
        prepared[name] = (runner, runner.prepare(ctx))
    return keys, prepared


DEFERRED = object()  # prepared when the data it reads exists (after its parent stages ran)


def _waits_for_data(recipe: Recipe, name: str, workdir: Path, keys: dict[str, str]) -> bool:
    """True when the stage reads a dataset another stage has not produced yet."""
    return any(kind == "dataset" and not artifact_for(workdir, parent, keys[parent]).complete
               for _, parent, kind in recipe.stages[name].references())


def run_recipe(recipe: Recipe, workdir: Path, *, show_progress: bool = True,
               info: DistInfo | None = None) -> list[StageReport]:
    """Run every stage that has no complete artifact; return one report per stage."""
    info = info or init_distributed()
    keys, prepared = prepare_all(recipe, workdir, info, show_progress)
    reports: list[StageReport] = []
    lock = WorkdirLock(workdir) if info.is_main else None
    if lock:
        lock.__enter__()
        if lock.took_over_from:
            console().print(f"[yellow]took over a stale lock ({lock.took_over_from}): that run was killed")
    try:
        for name in topological_order(recipe):
            artifact = artifact_for(workdir, name, keys[name])
            if artifact.complete:
                reports.append(_cached(recipe, name, artifact, workdir, info))
                continue
            runner, ready = prepared[name]
            reports.append(_run_stage(recipe, name, artifact, runner, ready, keys, workdir, info, show_progress))
    finally:
        if lock:
            lock.__exit__(None, None, None)
    return reports


def _cached(recipe: Recipe, name: str, artifact: Artifact, workdir: Path, info: DistInfo) -> StageReport:
    manifest = artifact.manifest()
    if info.is_main:
        append_ledger(workdir, {"event": "cached", "stage": name, "key": artifact.key})
    return StageReport(name, recipe.stages[name].kind, artifact.key, "cached", manifest.get("metrics", {}),
                       manifest.get("seconds", 0.0), artifact.folder, manifest.get("alarms", []))


def _run_stage(recipe: Recipe, name: str, artifact: Artifact, runner: StageRunner, ready: Any,
               keys: dict[str, str], workdir: Path, info: DistInfo, show_progress: bool) -> StageReport:
    stage = recipe.stages[name]
    ctx = _context(recipe, name, workdir, keys, info, show_progress)
    if ready is DEFERRED:
        ready = runner.prepare(ctx)
    if info.is_main:
        artifact.folder.mkdir(parents=True, exist_ok=True)
        (artifact.folder / "config.json").write_text(json.dumps(stage.model_dump(by_alias=True, mode="json"),
                                                                 indent=2))
        append_ledger(workdir, {"event": "started", "stage": name, "key": artifact.key})
    barrier(info)
    console().print(f"[bold]stage {name}[/] ({stage.kind}) key {artifact.key}")
    began = time.monotonic()
    try:
        output = runner.run(ctx, ready)
    except BaseException as err:
        if info.is_main:
            append_ledger(workdir, {"event": "failed", "stage": name, "key": artifact.key,
                                    "error": f"{type(err).__name__}: {err}"[:2000]})
        raise
    seconds = time.monotonic() - began
    if info.is_main:
        write_manifest(artifact, _manifest(recipe, name, artifact, keys, output, seconds, ctx))
        append_ledger(workdir, {"event": "completed", "stage": name, "key": artifact.key,
                                "metrics": output.metrics, "alarms": output.alarms, "seconds": seconds})
    barrier(info)
    return StageReport(name, stage.kind, artifact.key, "ran", output.metrics, seconds, artifact.folder,
                       output.alarms)


def _manifest(recipe: Recipe, name: str, artifact: Artifact, keys: dict[str, str], output, seconds: float,
              ctx: StageContext) -> dict[str, Any]:
    stage = recipe.stages[name]
    parents = {p: keys[p] for p in stage_parents(stage)}
    model_base = None
    if (artifact.folder / "adapter").is_dir() and stage.from_:
        model_base = str(ctx.parents.get(stage.from_, ""))
    return {
        "kind": stage.produces, "stage": name, "stage_kind": stage.kind, "key": artifact.key,
        "parents": parents, "config": stage.model_dump(by_alias=True, mode="json"),
        "data": data_fingerprints(stage, recipe), "tokenizer": _tokenizer_hash(artifact.folder),
        "code_version": code_version(), "source_hash": source_hash(), "metrics": output.metrics, "alarms": output.alarms,
        "info": output.info, "seconds": seconds, "model_base": model_base,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _tokenizer_hash(folder: Path) -> str | None:
    for sub in ("model", "adapter"):
        files = sorted((folder / sub).glob("tokenizer*")) + sorted((folder / sub).glob("chat_template*"))
        if files:
            digest = hashlib.sha256()
            for f in files:
                digest.update(f.read_bytes())
            return digest.hexdigest()[:16]
    return None
