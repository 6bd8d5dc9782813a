"""Progress bars for anything that takes more than a few seconds (rich, on stderr)."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

_console = Console(stderr=True)


def console() -> Console:
    return _console


def progress_enabled() -> bool:
    return os.environ.get("POSTTRAIN_PROGRESS", "1") != "0"


class StepProgress:
    """A bar with free-form fields (loss, tokens/s); on a non-terminal, a line every ``every`` s."""

    def __init__(self, title: str, total: int, *, start: int = 0, enabled: bool = True,
                 every_s: float = 10.0) -> None:
        self.enabled = enabled and progress_enabled()
        self.total, self.done, self.title = total, start, title
        self._fields = ""
        self._last_line = time.monotonic()
        self._every_s = every_s
        self._bar = None
        if self.enabled and _console.is_terminal:
            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=_console,
                                 transient=False)
            self._task = self._bar.add_task(title, total=total, completed=start, info="")
            self._bar.start()

    def update(self, advance: int = 1, **fields: Any) -> None:
        self.done += advance
        self._fields = "  ".join(f"{k} {_fmt(v)}" for k, v in fields.items())
        if self._bar is not None:
            self._bar.update(self._task, advance=advance, info=self._fields)
        elif self.enabled and (time.monotonic() - self._last_line > self._every_s or self.done >= self.total):
            self._last_line = time.monotonic()
            print(f"{self.title}: {self.done}/{self.total}  {self._fields}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
