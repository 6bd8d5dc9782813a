"""Metric sinks: JSONL always; TensorBoard when it is installed.

Each record is ``{"step": int, "stage": str, **metrics}``. On resume the JSONL is cut back to the
checkpoint's step so the file holds every step exactly once.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


class JsonlSink:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(_clean(record)) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardSink:
    def __init__(self, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(folder))

    def write(self, record: dict[str, Any]) -> None:
        step = record.get("step", 0)
        for key, value in record.items():
            if isinstance(value, int | float) and key != "step":
                self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        self._writer.close()


def _clean(record: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN/inf: write them as strings so the record stays valid JSON."""
    out = {}
    for key, value in record.items():
        if isinstance(value, float) and not math.isfinite(value):
            out[key] = str(value)
        else:
            out[key] = value
    return out


class Metrics:
    """Fan-out to every available sink."""

    def __init__(self, folder: Path, stage: str, *, tensorboard: bool = True) -> None:
        self.stage = stage
        self.sinks: list[Any] = [JsonlSink(folder / "metrics.jsonl")]
        if tensorboard:
            try:
                self.sinks.append(TensorBoardSink(folder / "tensorboard"))
            except ImportError:
                pass  # tensorboard is optional

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, "stage": self.stage, "time": round(time.time(), 3), **metrics}
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records after ``last_step`` (written before a crash, about to be redone)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line torn by a crash
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
