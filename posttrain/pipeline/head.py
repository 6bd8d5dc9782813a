"""The pipeline head: the model a run promotes (``<workdir>/HEAD.json``), and rollback.

After a run the head is the last model stage, in topological order, whose artifact is complete
and whose gates (and every ancestor's) passed: a stage that fails its gate is never promoted.
``posttrain rollback WORKDIR STAGE`` points the head at an earlier good artifact in a single
atomic write; every move is appended to the ledger.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from posttrain.config.recipe import Recipe, stage_parents, topological_order
from posttrain.errors import UserError, problem
from posttrain.loops.state import atomic_write_bytes
from posttrain.pipeline.artifacts import append_ledger, artifact_for

HEAD = "HEAD.json"


def read_head(workdir: Path) -> dict[str, Any] | None:
    path = workdir / HEAD
    return json.loads(path.read_text()) if path.exists() else None


def _write_head(workdir: Path, stage: str, key: str, reason: str) -> dict[str, Any]:
    previous = read_head(workdir)
    history = (previous or {}).get("history", [])
    if previous:
        history = [*history, {k: previous[k] for k in ("stage", "key", "time", "reason")}][-50:]
    head = {"stage": stage, "key": key, "artifact": str(artifact_for(workdir, stage, key).folder),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "reason": reason, "history": history}
    atomic_write_bytes(workdir / HEAD, json.dumps(head, indent=2).encode())
    append_ledger(workdir, {"event": "head", "stage": stage, "key": key, "reason": reason})
    return head


def _good(workdir: Path, recipe: Recipe, keys: dict[str, str], name: str, memo: dict[str, bool]) -> bool:
    if name not in memo:
        artifact = artifact_for(workdir, name, keys[name])
        ok = artifact.complete and artifact.manifest().get("passed", True)
        memo[name] = ok and all(_good(workdir, recipe, keys, p, memo) for p in stage_parents(recipe.stages[name]))
    return memo[name]


def update_head(workdir: Path, recipe: Recipe, keys: dict[str, str]) -> dict[str, Any] | None:
    """Promote the last good model stage (no change when it is already the head)."""
    memo: dict[str, bool] = {}
    good = [n for n in topological_order(recipe)
            if recipe.stages[n].produces == "model" and _good(workdir, recipe, keys, n, memo)]
    if not good:
        return read_head(workdir)
    current = read_head(workdir)
    if current and current["stage"] == good[-1] and current["key"] == keys[good[-1]]:
        return current
    return _write_head(workdir, good[-1], keys[good[-1]], "run")


def rollback(workdir: Path, stage: str) -> dict[str, Any]:
    """Point the head at ``stage``'s artifact from the last run of this workdir."""
    snapshot_path = workdir / "recipe.json"
    if not snapshot_path.exists():
        raise UserError(problem(str(workdir), "no run recorded here", "check the workdir"))
    snapshot = json.loads(snapshot_path.read_text())
    keys = snapshot["keys"]
    if stage not in keys:
        raise UserError(problem(stage, "no such stage in the last run", "stages: " + ", ".join(keys)))
    artifact = artifact_for(workdir, stage, keys[stage])
    if not artifact.complete:
        raise UserError(problem(stage, "this stage has no complete artifact", "roll back to a stage that ran"))
    manifest = artifact.manifest()
    if manifest.get("kind") != "model":
        raise UserError(problem(stage, f"a {manifest.get('kind')} stage cannot be the head", "pick a model stage"))
    if not manifest.get("passed", True):
        raise UserError(problem(stage, "this stage failed its gates", "roll back to a stage that passed"))
    return _write_head(workdir, stage, keys[stage], "rollback")
