"""Every module imports on a CPU machine without optional backends (vLLM, DeepSpeed, Ray)."""

from __future__ import annotations

import importlib
import pkgutil

import posttrain


def test_every_module_imports():
    failures = []
    for module in pkgutil.walk_packages(posttrain.__path__, prefix="posttrain."):
        try:
            importlib.import_module(module.name)
        except Exception as err:  # report every failure, not just the first
            failures.append(f"{module.name}: {type(err).__name__}: {err}")
    assert not failures, "\n".join(failures)
