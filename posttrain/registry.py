"""One small name -> object registry, used for every kind of variant.

A miss lists the valid names (and the nearest one). Aliases map the peers' names for the same
maths onto ours (TRL ``sigmoid_norm`` = open-instruct ``dpo_norm``). Names of the form
``"package.module:object"`` import user code lazily.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from posttrain.errors import UserError, problem

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[T], T]:
        def decorate(obj: T) -> T:
            self.add(name, obj, aliases=aliases)
            return obj

        return decorate

    def add(self, name: str, obj: T, *, aliases: tuple[str, ...] = ()) -> None:
        if name in self._items or name in self._aliases:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._items[name] = obj
        for alias in aliases:
            if alias in self._items or alias in self._aliases:
                raise ValueError(f"{self.kind} alias {alias!r} registered twice")
            self._aliases[alias] = name

    def canonical(self, name: str) -> str:
        """The registered name behind ``name`` (resolving aliases); raises UserError on a miss."""
        if name in self._items:
            return name
        if name in self._aliases:
            return self._aliases[name]
        raise self._miss(name)

    def get(self, name: str, where: str = "") -> T:
        if ":" in name and name not in self._items:
            return _import_object(name, where or self.kind)
        try:
            return self._items[self.canonical(name)]
        except UserError as err:
            if where:
                raise self._miss(name, where) from err
            raise

    def names(self) -> list[str]:
        return sorted(self._items)

    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    def __contains__(self, name: str) -> bool:
        return name in self._items or name in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def _miss(self, name: str, where: str = "") -> UserError:
        valid = self.names() + sorted(self._aliases)
        near = difflib.get_close_matches(name, valid, n=1)
        fix = f"did you mean {near[0]!r}? " if near else ""
        fix += "valid names: " + ", ".join(self.names())
        return UserError(problem(where or self.kind, f"unknown {self.kind} {name!r}", fix))


def keyword_parameters(fn: Callable[..., object]) -> dict[str, object]:
    """A function's keyword-only parameters and their defaults (what a config block may set)."""
    return {name: p.default for name, p in inspect.signature(fn).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _import_object(spec: str, where: str) -> object:
    """Import ``"package.module:attr"``; errors name the spec and the fix."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(
            problem(where, f"cannot import module {module_name!r}: {err}",
                    "check the module path and that it is on PYTHONPATH")
        ) from err
    try:
        return getattr(module, attr)
    except AttributeError as err:
        raise UserError(
            problem(where, f"module {module_name!r} has no attribute {attr!r}",
                    "check the name after the colon")
        ) from err
