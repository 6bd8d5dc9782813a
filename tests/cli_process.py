"""``posttrain run`` in a child process, as a user runs it, for the tests that kill a run (SIGKILL
at a named crash point, ``POSTTRAIN_CRASH_AT``, or from outside) and run it again."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def _command(recipe: Path, work: Path) -> list[str]:
    return [sys.executable, "-m", "posttrain.cli", "run", str(recipe), "--workdir", str(work)]


def _env(crash: str | None) -> dict[str, str]:
    env = {**os.environ, "POSTTRAIN_PROGRESS": "0"}
    # The runs these tests compare bitwise happen in different processes. Intel MKL's AVX-512
    # vector math there sometimes computes a worker thread's share of an elementwise op ~1e-5 off
    # (seen: the cos of RoPE), in some processes and not others; which ones follows the memory
    # layout (the length of the work directory's path was enough). MKL's AVX2 code has not shown
    # it in 24 runs, so pinning it makes these tests test our resume logic, not MKL
    # (docs/training.md, Resume).
    env.setdefault("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    env.pop("POSTTRAIN_CRASH_AT", None)
    if crash:
        env["POSTTRAIN_CRASH_AT"] = crash
    return env


def run_posttrain(recipe: Path, work: Path, crash: str | None = None) -> subprocess.CompletedProcess:
    """Run to the end (or to the SIGKILL at ``crash``, e.g. ``checkpoint.saved:2``)."""
    return subprocess.run(_command(recipe, work), env=_env(crash), capture_output=True, text=True, timeout=600)


def start_posttrain(recipe: Path, work: Path, **popen: Any) -> subprocess.Popen:
    """Start a run without waiting (to be killed from outside)."""
    return subprocess.Popen(_command(recipe, work), env=_env(None), **popen)
