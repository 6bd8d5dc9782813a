"""Checkpoints: atomic, resumable, bounded.

A checkpoint is a folder ``step-000042`` holding the trainable weights, optimizer, scheduler,
RNG states and loop position. It is written under a temporary name, every file fsynced, then
renamed into place: a crash (even SIGKILL) during a save leaves the previous checkpoint intact
and loadable, and a half-written folder is never mistaken for a checkpoint.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
from pathlib import Path
from typing import Any

import torch

PREFIX = "step-"
TMP_SUFFIX = ".tmp"


def crash_point(name: str) -> None:
    """Deterministic fault injection for crash-safety tests (``POSTTRAIN_CRASH_AT=name[:count]``).

    The process SIGKILLs itself (no cleanup, no flushing) the ``count``-th time it reaches ``name``.
    """
    spec = os.environ.get("POSTTRAIN_CRASH_AT")
    if not spec:
        return
    target, _, count = spec.partition(":")
    if target != name:
        return
    seen = _crash_counts[name] = _crash_counts.get(name, 0) + 1
    if seen >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


_crash_counts: dict[str, int] = {}


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers see the old content or the new, never a torn one."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights that training changes (all of them, or only adapters under LoRA)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in names}


def save_checkpoint(folder: Path, step: int, payload: dict[str, Any], keep: int) -> Path:
    """Atomically write checkpoint ``step`` under ``folder``; keep the newest ``keep``."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{PREFIX}{step:07d}"
    tmp = folder / (final.name + TMP_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, value in payload.items():
        path = tmp / f"{name}.pt"
        with open(path, "wb") as f:
            torch.save(value, f)
            f.flush()
            os.fsync(f.fileno())
        crash_point("checkpoint.mid_save")
    fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(folder)
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted saves are ignored)."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and not p.name.endswith(TMP_SUFFIX)]
    return sorted(found, key=lambda p: p.name)


def load_checkpoint(path: Path) -> dict[str, Any]:
    # weights_only=False: the payload holds Python RNG state and optimizer dicts written by us.
    return {p.stem: torch.load(p, map_location="cpu", weights_only=False) for p in sorted(path.glob("*.pt"))}


def latest_checkpoint(folder: Path) -> Path | None:
    found = list_checkpoints(folder)
    for tmp in folder.glob(f"*{TMP_SUFFIX}") if folder.is_dir() else []:
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a save that was killed
    return found[-1] if found else None
