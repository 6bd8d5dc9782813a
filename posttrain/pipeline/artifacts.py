"""Content-addressed stage artifacts, the workdir lock and the lineage ledger.

Layout of a workdir::

    .lock                      held (flock) by the running ``posttrain run``
    ledger.jsonl               append-only: every stage start, completion, cache hit, failure
    stages/<stage>/<key>/      one run of a stage; complete iff manifest.json exists
        manifest.json          written LAST, atomically
        model/ | adapter/      save_pretrained output
        checkpoints/           resume state while the stage runs
        metrics.jsonl, eval/   training metrics, eval records
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from posttrain.config.components import DataConfig
from posttrain.config.recipe import Recipe
from posttrain.config.stage_base import datasets_in
from posttrain.config.stages import StageConfig
from posttrain.data.formats import file_fingerprint
from posttrain.errors import UserError, problem
from posttrain.loops.state import atomic_write_bytes
from posttrain.provenance import code_version

MANIFEST = "manifest.json"
KEY_LENGTH = 16
# Settings that change how a stage reports, not what it produces: not part of its key.
NON_SEMANTIC = {"log_every", "checkpoint_every", "keep_checkpoints"}


def _semantic(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _semantic(v) for k, v in value.items() if k not in NON_SEMANTIC}
    if isinstance(value, list):
        return [_semantic(v) for v in value]
    return value


def key_config(stage: StageConfig) -> dict[str, Any]:
    """The stage's resolved config as its key sees it: without the report-only settings, and
    without the fields a config class lists in ``key_omits_defaults`` while they hold their
    default (fields added after keys existed: adding them leaves cached artifacts valid)."""
    dumped = stage.model_dump(by_alias=True, mode="json")
    _omit_new_defaults(stage, dumped)
    return _semantic(dumped)


def _omit_new_defaults(model: BaseModel, dumped: dict[str, Any]) -> None:
    omitted = getattr(type(model), "key_omits_defaults", ())
    for name, field in type(model).model_fields.items():
        key, value = field.alias or name, getattr(model, name)
        if name in omitted and _json(value) == _json(field.get_default(call_default_factory=True)):
            dumped.pop(key, None)
            continue
        for item, out in _sub_models(value, dumped.get(key)):
            _omit_new_defaults(item, out)


def _sub_models(value: Any, dumped: Any) -> list[tuple[BaseModel, dict[str, Any]]]:
    """The config blocks inside a field's value (itself, list items, mapping values), each with
    its dump."""
    if isinstance(value, BaseModel):
        pairs = [(value, dumped)]
    elif isinstance(value, list) and isinstance(dumped, list):
        pairs = list(zip(value, dumped))
    elif isinstance(value, dict) and isinstance(dumped, dict):
        pairs = [(v, dumped.get(k)) for k, v in value.items()]
    else:
        pairs = []
    return [(v, d) for v, d in pairs if isinstance(v, BaseModel) and isinstance(d, dict)]


def _json(value: Any) -> Any:
    return value.model_dump(by_alias=True, mode="json") if isinstance(value, BaseModel) else value


def data_fingerprints(stage: StageConfig, recipe: Recipe) -> dict[str, str]:
    """Content fingerprints of every dataset a stage reads (file bytes; builtin name + args; a
    data stage's output is covered by that stage's key, which is among the parent keys)."""
    return {path: _fingerprint(data, recipe) for path, data in datasets_in(stage)}


def model_fingerprint(stage: StageConfig, recipe: Recipe) -> str | None:
    """What a local ``model.path`` holds (see ``folder_fingerprint``). None for hub ids and tiny
    models (their config is the key)."""
    path_spec = stage.model.path if stage.model is not None else None
    return folder_fingerprint(path_spec, recipe.base_dir) if path_spec else None


def weight_fingerprints(stage: StageConfig, recipe: Recipe) -> dict[str, str | None]:
    """What the other model folders a stage reads hold: reward models (``rewards.N.path``, an
    ensemble's ``rewards.N.paths``) and a PPO critic's ``critic.path``. Without them a retrained
    reward model saved to the same folder would leave the stage's cached output in place."""
    found: dict[str, str | None] = {}
    for i, reward in enumerate(getattr(stage, "rewards", None) or []):
        paths = reward.params().get("paths")
        specs = ([("path", reward.path)] if reward.path else []) + [
            (f"paths.{j}", p) for j, p in enumerate(paths if isinstance(paths, list) else [])]
        for name, spec in specs:
            found[f"rewards.{i}.{name}"] = folder_fingerprint(str(spec), recipe.base_dir)
    critic = getattr(stage, "critic", None)
    if critic is not None and critic.path:
        found["critic.path"] = folder_fingerprint(critic.path, recipe.base_dir)
    return found


def folder_fingerprint(path_spec: str, base_dir: Path) -> str | None:
    """Another pipeline's artifact key when ``path_spec`` is a workdir (so a recipe built on
    ``../runs/demo`` re-runs when that pipeline's head moves), else the relative names, sizes and
    modification times (ns) of the folder's files; None for what is not a local folder (a hub id)."""
    from posttrain.models.load import resolve_local
    from posttrain.stages.common import pipeline_artifact

    artifact = pipeline_artifact(path_spec, base_dir)
    if artifact is not None:
        return f"artifact:{artifact.name}"
    path = resolve_local(path_spec, base_dir)
    if path is None or not path.is_dir():
        return None
    stats = [(str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns)
             for f in sorted(path.rglob("*")) if f.is_file()]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]


def _fingerprint(cfg: DataConfig, recipe: Recipe) -> str:
    if cfg.stage:
        return f"stage:{cfg.stage}"
    if cfg.path:
        path = recipe.resolve(cfg.path)
        return file_fingerprint(path) if path.is_file() else "missing"
    return hashlib.sha256(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def stage_key(stage: StageConfig, recipe: Recipe, parent_keys: dict[str, str]) -> str:
    """hash(resolved stage config, parent artifact keys, data and model-folder fingerprints, seed, code
    version)."""
    payload = {
        "config": key_config(stage),
        "parents": parent_keys,
        "data": data_fingerprints(stage, recipe),
        "model": model_fingerprint(stage, recipe),
        "seed": recipe.seed,
        "code": code_version(),
    }
    weights = weight_fingerprints(stage, recipe)
    if weights:  # only then: stages without such folders keep the keys they had
        payload["weights"] = weights
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:KEY_LENGTH]


@dataclass
class Artifact:
    stage: str
    key: str
    folder: Path

    @property
    def manifest_path(self) -> Path:
        return self.folder / MANIFEST

    @property
    def complete(self) -> bool:
        return self.manifest_path.exists()

    def manifest(self) -> dict[str, Any]:
        return json.loads(self.manifest_path.read_text())


def artifact_for(workdir: Path, stage: str, key: str) -> Artifact:
    return Artifact(stage, key, workdir / "stages" / stage / key)


def write_manifest(artifact: Artifact, content: dict[str, Any]) -> None:
    """The last write of a stage: its presence means the artifact is complete."""
    atomic_write_bytes(artifact.manifest_path, json.dumps(content, indent=2, default=str).encode())


class WorkdirLock:
    """An exclusive ``flock`` on ``<workdir>/.lock``.

    The kernel releases a flock when its process dies, so a lock left by a killed run is stale by
    construction: the next run takes it over (and says so).
    """

    def __init__(self, workdir: Path) -> None:
        self.path = workdir / ".lock"
        self._fd: int | None = None
        self.took_over_from: str | None = None

    def __enter__(self) -> WorkdirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            raise UserError(problem(str(self.path.parent), f"the workdir is in use by another run ({holder})",
                                    "wait for it to finish, or use another --workdir")) from err
        previous = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if previous:
            self.took_over_from = previous
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def append_ledger(workdir: Path, record: dict[str, Any]) -> None:
    """Append one event to the ledger (one line, flushed and fsynced)."""
    line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}, default=str) + "\n"
    with open(workdir / "ledger.jsonl", "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
