"""Run a recipe: stages in topological order, cached by content key, resumable, locked, gated.

Before anything is written, every stage that will run is *prepared* (its data read, rendered and
checked), so bad input in the last stage fails in seconds with no partial output, instead of
after hours of training the first ones. Stages that read an earlier stage's output are prepared
when it exists.

After a stage, its gates are evaluated; a failed gate is recorded in its manifest, its
descendants are *blocked* (not run), and the pipeline head (``HEAD.json``) stays on the last good
model.
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
from posttrain.errors import UserError, problem
from posttrain.loops.distributed import DistInfo, barrier, init_distributed
from posttrain.loops.state import crash_point
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
from posttrain.pipeline.head import update_head
from posttrain.provenance import code_version, source_hash
from posttrain.stages.common import STAGE_RUNNERS, StageContext, StageRunner

DEFERRED = object()  # prepared when the data it reads exists (after its parent stages ran)


@dataclass
class StageReport:
    name: str
    kind: str
    key: str
    status: str  # ran | cached | blocked
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    folder: Path | None = None
    alarms: list[dict[str, Any]] = field(default_factory=list)
    gates: list[dict[str, Any]] = field(default_factory=list)
    config: Any = None  # the stage's config (for display)

    @property
    def passed(self) -> bool:
        return self.status != "blocked" and all(g["passed"] for g in self.gates)


@dataclass(frozen=True)
class Selection:
    """``--only`` / ``--from`` / ``--until``: which stages this invocation may run."""

    only: str | None = None
    from_: str | None = None
    until: str | None = None

    def stages(self, recipe: Recipe) -> list[str]:
        order = topological_order(recipe)
        for flag, name in (("--only", self.only), ("--from", self.from_), ("--until", self.until)):
            if name is not None and name not in recipe.stages:
                raise UserError(problem(flag, f"no stage named {name!r}", "stages: " + ", ".join(order)))
        if self.only:
            return [self.only]
        chosen = set(order)
        if self.from_:
            chosen &= {self.from_} | _descendants(recipe, self.from_)
        if self.until:
            chosen &= {self.until} | _ancestors(recipe, self.until)
        return [n for n in order if n in chosen]


def _ancestors(recipe: Recipe, name: str) -> set[str]:
    found: set[str] = set()
    stack = list(stage_parents(recipe.stages[name]))
    while stack:
        parent = stack.pop()
        if parent not in found:
            found.add(parent)
            stack.extend(stage_parents(recipe.stages[parent]))
    return found


def _descendants(recipe: Recipe, name: str) -> set[str]:
    return {n for n in recipe.stages if name in _ancestors(recipe, n)}


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
    return StageContext(name=name, config=stage, recipe=recipe,
                        out_dir=artifact_for(workdir, name, keys[name]).folder, parents=parents, dist=info,
                        show_progress=show_progress)


def _runner(recipe: Recipe, name: str) -> StageRunner:
    return STAGE_RUNNERS.get(recipe.stages[name].kind, where=f"stages.{name}.kind")()


def _waits_for_data(recipe: Recipe, name: str, workdir: Path, keys: dict[str, str]) -> bool:
    """True when the stage reads, while it is prepared, a dataset or a reward model another stage
    has not produced yet (a ``from`` model is only loaded when the stage runs)."""
    return any(kind != "model" and not artifact_for(workdir, parent, keys[parent]).complete
               for _, parent, kind in recipe.stages[name].references())


def prepare_all(recipe: Recipe, workdir: Path, info: DistInfo, show_progress: bool = True,
                stages: list[str] | None = None) -> tuple[dict[str, str], dict[str, tuple[StageRunner, Any]]]:
    """Keys of every stage, and the prepared inputs of every selected stage that is not cached."""
    keys = stage_keys(recipe)
    prepared: dict[str, tuple[StageRunner, Any]] = {}
    for name in stages or topological_order(recipe):
        if artifact_for(workdir, name, keys[name]).complete:
            continue
        runner = _runner(recipe, name)
        if _waits_for_data(recipe, name, workdir, keys):
            prepared[name] = (runner, DEFERRED)
            continue
        prepared[name] = (runner, runner.prepare(_context(recipe, name, workdir, keys, info, show_progress)))
    return keys, prepared


def _check_outside_parents(recipe: Recipe, selected: list[str], workdir: Path, keys: dict[str, str]) -> None:
    """Stages left out of the selection must already exist when a selected stage needs them."""
    missing = [(name, p) for name in selected for p in stage_parents(recipe.stages[name])
               if p not in selected and not artifact_for(workdir, p, keys[p]).complete]
    if missing:
        name, parent = missing[0]
        raise UserError(problem(f"stages.{name}", f"needs stage {parent!r}, which has not run in this workdir",
                                f"run it first (posttrain run ... --until {parent}) or drop --only/--from"))


def run_recipe(recipe: Recipe, workdir: Path, *, show_progress: bool = True, info: DistInfo | None = None,
               selection: Selection | None = None) -> list[StageReport]:
    """Run every selected stage that has no complete artifact; one report per selected stage."""
    info = info or init_distributed()
    selected = (selection or Selection()).stages(recipe)
    keys, prepared = prepare_all(recipe, workdir, info, show_progress, selected)
    _check_outside_parents(recipe, selected, workdir, keys)
    reports: dict[str, StageReport] = {}
    lock = WorkdirLock(workdir) if info.is_main else None
    if lock:
        lock.__enter__()
        if lock.took_over_from:
            console().print(f"[yellow]took over a stale lock ({lock.took_over_from}): that run was killed")
        _snapshot(recipe, workdir, keys)
    try:
        for name in selected:
            reports[name] = _one_stage(recipe, name, keys, prepared, workdir, info, show_progress, reports)
            reports[name].config = recipe.stages[name]
        if info.is_main:
            update_head(workdir, recipe, keys)
    finally:
        if lock:
            lock.__exit__(None, None, None)
    return list(reports.values())


def _one_stage(recipe: Recipe, name: str, keys: dict[str, str], prepared: dict, workdir: Path, info: DistInfo,
               show_progress: bool, reports: dict[str, StageReport]) -> StageReport:
    artifact = artifact_for(workdir, name, keys[name])
    failed_parent = next((p for p in stage_parents(recipe.stages[name])
                          if (p in reports and not reports[p].passed) or _failed_on_disk(workdir, p, keys[p])), None)
    if failed_parent is not None:
        if info.is_main:
            append_ledger(workdir, {"event": "blocked", "stage": name, "key": artifact.key, "by": failed_parent})
        return StageReport(name, recipe.stages[name].kind, artifact.key, "blocked")
    if artifact.complete:
        return _cached(recipe, name, artifact, workdir, info)
    runner, ready = prepared[name]
    return _run_stage(recipe, name, artifact, runner, ready, keys, workdir, info, show_progress)


def _failed_on_disk(workdir: Path, stage: str, key: str) -> bool:
    """A parent outside this run's selection whose artifact failed its gates."""
    artifact = artifact_for(workdir, stage, key)
    return artifact.complete and not artifact.manifest().get("passed", True)


def _snapshot(recipe: Recipe, workdir: Path, keys: dict[str, str]) -> None:
    """The recipe as run, for ``posttrain status`` and ``lineage``."""
    workdir.mkdir(parents=True, exist_ok=True)
    snapshot = {**recipe.raw(), "keys": keys, "order": topological_order(recipe),
                "parents": {n: stage_parents(s) for n, s in recipe.stages.items()},
                "path": str(recipe.path) if recipe.path else None, "overrides": recipe.overrides}
    (workdir / "recipe.json").write_text(json.dumps(snapshot, indent=2))


def _cached(recipe: Recipe, name: str, artifact: Artifact, workdir: Path, info: DistInfo) -> StageReport:
    manifest = artifact.manifest()
    if info.is_main:
        append_ledger(workdir, {"event": "cached", "stage": name, "key": artifact.key})
    return StageReport(name, recipe.stages[name].kind, artifact.key, "cached", manifest.get("metrics", {}),
                       manifest.get("seconds", 0.0), artifact.folder, manifest.get("alarms", []),
                       manifest.get("gates", []))


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
    _record_contamination(ready, output)
    verdicts = _gate_verdicts(recipe, name, output.metrics, ctx)
    if info.is_main:
        crash_point("manifest.before_write")
        write_manifest(artifact, _manifest(recipe, name, artifact, keys, output, seconds, ctx, verdicts))
        append_ledger(workdir, {"event": "completed", "stage": name, "key": artifact.key, "metrics": output.metrics,
                                "alarms": output.alarms, "gates": verdicts, "seconds": seconds})
        for v in verdicts:
            if not v["passed"]:
                console().print(f"[red]gate failed[/] {name}: {v['gate']} (value {v['value']}, bound {v['bound']})")
    barrier(info)
    return StageReport(name, stage.kind, artifact.key, "ran", output.metrics, seconds, artifact.folder,
                       output.alarms, verdicts)


def _record_contamination(ready: Any, output) -> None:
    """The stage's contamination scan (done in prepare) goes to its info, and to its alarms when
    training rows overlap an eval set."""
    summary = getattr(ready, "contamination", None)
    if not summary:
        return
    output.info["contamination"] = summary
    if summary["overlapping_rows"]:
        output.alarms.append({"step": 0, "name": "contamination", "message": (
            f"{summary['overlapping_rows']} training rows overlap the recipe's eval sets "
            f"({summary['pairs']} pairs, policy {summary['policy']}); e.g. {summary['examples'][:2]}")})


def _gate_verdicts(recipe: Recipe, name: str, metrics: dict[str, float], ctx: StageContext) -> list[dict]:
    stage = recipe.stages[name]
    parent_folder = ctx.parents.get(stage.from_ or "")
    parent = None
    if parent_folder is not None and (parent_folder / "manifest.json").exists():
        parent = json.loads((parent_folder / "manifest.json").read_text()).get("metrics", {})
    return [gate.evaluate(metrics, parent) for gate in stage.gates()]


def _manifest(recipe: Recipe, name: str, artifact: Artifact, keys: dict[str, str], output, seconds: float,
              ctx: StageContext, verdicts: list[dict]) -> dict[str, Any]:
    stage = recipe.stages[name]
    parents = {p: keys[p] for p in stage_parents(stage)}
    model_base = None
    if (artifact.folder / "adapter").is_dir() and stage.from_:
        model_base = str(ctx.parents.get(stage.from_, ""))
    return {
        "kind": stage.produces, "stage": name, "stage_kind": stage.kind, "key": artifact.key,
        "parents": parents, "config": stage.model_dump(by_alias=True, mode="json"),
        "data": data_fingerprints(stage, recipe), "tokenizer": _tokenizer_hash(artifact.folder),
        "code_version": code_version(), "source_hash": source_hash(), "metrics": output.metrics,
        "alarms": output.alarms, "gates": verdicts, "passed": all(v["passed"] for v in verdicts),
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
