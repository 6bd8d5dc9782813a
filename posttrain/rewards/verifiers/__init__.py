"""Verifiers by name: ``get_verifier(kind)(completion, row) -> RewardResult``.

A verifier reads what it needs from the prompt's row (a dict, e.g. one JSONL line):

========  =====================================================================
kind      row fields
========  =====================================================================
math      ``answer`` (optional ``strict``, ``timeout_s``)
json      ``schema`` (a JSON Schema, or null to only require JSON)
regex     ``pattern`` (optional ``ignore_case``)
exact     ``answer`` (optional ``ignore_case``, ``collapse_whitespace``)
choice    ``answer``, a letter (optional ``letters``, ``strict``)
format    optional ``tags`` (default ``["think", "answer"]``), ``partial``
length    ``target_length`` (optional ``length_scale``, ``num_tokens``)
overlong  ``max_length``, ``cache_length`` (optional ``num_tokens``)
========  =====================================================================

A missing field raises `UserError` naming it. ``num_tokens`` is the completion's token count when
the caller knows it (the length rewards fall back to characters and say so in ``meta["unit"]``).

Adding a verifier: write ``posttrain/rewards/verifiers/<kind>.py`` with a row function
``(completion: str, row: Mapping) -> RewardResult`` and a ``register(registry)`` function that
calls ``registry.add("<kind>", fn)``, then list the module in `PLUGIN_MODULES`. Plugin modules are
imported the first time a verifier is looked up, never at package import, and a module that is
absent from the tree is skipped. User code can also be named directly: ``"my_pkg.rewards:fn"``.
"""

from __future__ import annotations

import importlib
import importlib.util
import threading
from collections.abc import Callable, Mapping
from typing import Any

from posttrain.errors import UserError, problem
from posttrain.registry import Registry
from posttrain.rewards.verifiers.math import verify_math_row
from posttrain.rewards.verifiers.structured import (
    length_penalty_row,
    overlong_penalty_row,
    verify_choice_row,
    verify_exact_row,
    verify_format_row,
    verify_json_row,
    verify_regex_row,
)
from posttrain.types import RewardResult

Verifier = Callable[[str, Mapping[str, Any]], RewardResult]

VERIFIERS: Registry[Verifier] = Registry("verifier")
VERIFIERS.add("math", verify_math_row)
VERIFIERS.add("json", verify_json_row, aliases=("json_schema",))
VERIFIERS.add("regex", verify_regex_row)
VERIFIERS.add("exact", verify_exact_row, aliases=("exact_match",))
VERIFIERS.add("choice", verify_choice_row, aliases=("multiple_choice", "mcq"))
VERIFIERS.add("format", verify_format_row)
VERIFIERS.add("length", length_penalty_row, aliases=("length_penalty",))
VERIFIERS.add("overlong", overlong_penalty_row, aliases=("overlong_penalty", "dapo_overlong"))

# Verifiers owned by their own modules (the code sandbox, IFEval). Each defines
# `register(registry)`. The place to add the next one.
PLUGIN_MODULES: tuple[str, ...] = (
    "posttrain.rewards.verifiers.code",
    "posttrain.rewards.verifiers.ifeval",
    "posttrain.demo.world",  # the demo world's exact worked-solution check ("demo")
)

_plugins_lock = threading.Lock()
_plugins_loaded = False
_plugin_failures: dict[str, str] = {}


def _load_plugins() -> None:
    """Import each present plugin module once and let it register its verifiers."""
    global _plugins_loaded
    with _plugins_lock:
        if _plugins_loaded:
            return
        _plugins_loaded = True
        for name in PLUGIN_MODULES:
            if importlib.util.find_spec(name) is None:
                continue  # not written yet in this tree
            try:
                importlib.import_module(name).register(VERIFIERS)
            except Exception as err:  # one broken plugin must not hide the others
                _plugin_failures[name] = f"{type(err).__name__}: {err}"


def get_verifier(kind: str) -> Verifier:
    """The verifier registered as ``kind`` (or ``"package.module:function"``)."""
    if kind not in VERIFIERS and ":" not in kind:
        _load_plugins()
    try:
        return VERIFIERS.get(kind)
    except UserError as err:
        if not _plugin_failures:
            raise
        broken = "; ".join(f"{name} failed to import ({why})" for name, why in _plugin_failures.items())
        raise UserError(err.problems + [problem("verifier plugins", broken, "fix the module")]) from err


def verifier_names() -> list[str]:
    """Every registered verifier name, plugins included."""
    _load_plugins()
    return VERIFIERS.names()


def verify(kind: str, completion: str, row: Mapping[str, Any]) -> RewardResult:
    """Score one completion with the verifier ``kind``."""
    return get_verifier(kind)(completion, row)


__all__ = ["PLUGIN_MODULES", "VERIFIERS", "Verifier", "get_verifier", "verifier_names", "verify"]
