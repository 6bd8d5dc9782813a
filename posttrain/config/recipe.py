"""Recipes: YAML -> typed, validated config, with ``a.b.c=value`` overrides.

Every problem is collected and reported at once, each with its YAML path (and line), the value,
why it is wrong and the fix. The user's recipe is never mutated: derived quantities live in
resolved objects built later (see ``posttrain.pipeline.plan``).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError

from posttrain.config.base import StrictModel, problems_from_validation
from posttrain.config.gates import produced_by
from posttrain.config.stages import STAGE_KINDS, StageConfig
from posttrain.errors import Problem, ProblemCollector, UserError, problem

_STAGE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` as a float (YAML 1.1 wants ``1.0e-4``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


class RecipeHead(StrictModel):
    """The top level of a recipe file."""

    name: str = Field(description="the recipe's name; the default workdir is runs/<name>")
    workdir: str | None = Field(None, description="where artifacts go (relative to the current directory)")
    seed: int = Field(0, description="default seed of every stage")
    description: str = ""
    on_contamination: Literal["report", "fail", "drop"] = Field(
        "report", description="training rows that overlap an eval set of the recipe: list them in the stage's "
        "info and alarms, stop, or drop them")
    stages: dict[str, dict[str, Any]] = Field(description="stage name -> stage config (kind: ...)")


@dataclass
class Recipe:
    """A validated recipe. ``stages`` keeps the file's order."""

    name: str
    seed: int
    stages: dict[str, StageConfig]
    path: Path | None = None  # the YAML file, for resolving relative data paths
    workdir: str | None = None
    description: str = ""
    overrides: list[str] = field(default_factory=list)
    stage_names: list[str] = field(default_factory=list)  # every stage in the file, valid or not
    on_contamination: str = "report"

    def eval_tasks(self) -> list:
        """Every eval task of the recipe (the contamination scan checks training data against them)."""
        seen, out = set(), []
        for stage in self.stages.values():
            for task in stage.eval:
                key = task.model_dump_json()
                if key not in seen:
                    seen.add(key)
                    out.append(task)
        return out

    @property
    def base_dir(self) -> Path:
        return self.path.parent if self.path else Path.cwd()

    def resolve(self, relative: str) -> Path:
        """A path written in the recipe, resolved against the recipe's folder."""
        p = Path(relative).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)

    def default_workdir(self) -> Path:
        return Path(self.workdir) if self.workdir else Path("runs") / self.name

    def raw(self) -> dict[str, Any]:
        """The resolved recipe as plain data (printed by ``posttrain plan``)."""
        return {
            "name": self.name,
            "seed": self.seed,
            "on_contamination": self.on_contamination,
            "stages": {n: s.model_dump(by_alias=True, mode="json") for n, s in self.stages.items()},
        }


def read_yaml(path: Path) -> tuple[Any, dict[tuple[str, ...], int]]:
    """Parse a YAML file; also return the line of every mapping key path (1-based)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise UserError(problem(str(path), "recipe file not found", "check the path")) from err
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(problem(str(path), f"cannot read the recipe: {err}", "check the file")) from err
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(problem(where, f"invalid YAML: {getattr(err, 'problem', err)}",
                                "fix the syntax at that line")) from err
    lines: dict[tuple[str, ...], int] = {}
    if node is not None:
        _collect_lines(node, (), lines)
    return data, lines


def _collect_lines(node: yaml.Node, prefix: tuple[str, ...], out: dict[tuple[str, ...], int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = (*prefix, str(key_node.value))
            out[key] = key_node.start_mark.line + 1
            _collect_lines(value_node, key, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            key = (*prefix, str(i))
            out[key] = item.start_mark.line + 1
            _collect_lines(item, key, out)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> list[Problem]:
    """Apply ``a.b.c=value`` in place (values parsed as YAML). Returns problems for bad ones."""
    problems: list[Problem] = []
    for text in overrides:
        key, sep, value_text = text.partition("=")
        where = f"--set {key}"
        if not sep or not key:
            problems.append(problem(f"--set {text}", "an override must look like a.b.c=value",
                                    "write e.g. --set stages.sft.train.lr=1e-4"))
            continue
        parts = key.split(".")
        if parts[0] == "stages" and len(parts) >= 2 and parts[1] not in (data.get("stages") or {}):
            names = ", ".join(data.get("stages") or {}) or "none"
            problems.append(problem(where, f"there is no stage named {parts[1]!r}",
                                    f"use one of the recipe's stages: {names}"))
            continue
        try:
            value = yaml.load(value_text, Loader=_Loader) if value_text else ""
        except yaml.YAMLError:
            value = value_text
        problem_found = _set_path(data, parts, value)
        if problem_found:
            problems.append(problem(where, problem_found, "override the whole value instead"))
    return problems


def _set_path(data: dict[str, Any], parts: list[str], value: Any) -> str | None:
    """Set ``value`` at ``parts`` (mapping keys, or list indices like ``eval.0.limit``); missing
    mappings are created. Returns why it could not, or None."""
    target: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(target, list):
            if not part.isdigit() or int(part) >= len(target):
                return f"{part!r} is not an index of the list at {'.'.join(parts[:i]) or 'the top'}"
            if last:
                target[int(part)] = value
            else:
                target = target[int(part)]
            continue
        if not isinstance(target, dict):
            return f"{parts[i - 1]!r} is not a mapping or list, cannot set a key inside it"
        if last:
            target[part] = value
        else:
            if target.get(part) is None:
                target[part] = {}
            target = target[part]
    return None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; raise UserError listing every problem."""
    path = Path(path)
    data, lines = read_yaml(path)
    overrides = list(overrides or [])
    if not isinstance(data, dict):
        raise UserError(problem(str(path), "a recipe must be a mapping with name and stages",
                                "see recipes/demo.yaml for the shape"))
    data = copy.deepcopy(data)
    found = ProblemCollector()
    found.extend(apply_overrides(data, overrides))
    recipe = _validate(data, found)
    recipe.path = path.resolve()
    recipe.overrides = overrides
    check_structure(recipe, found)
    if found:
        raise UserError(_locate(found.problems, path, lines, overrides),
                        title=f"{path}: {len(found.problems)} problem(s)")
    return recipe


def _validate(data: dict[str, Any], found: ProblemCollector) -> Recipe:
    """Validate what can be validated; stages that fail are left out (their problems recorded)."""
    try:
        head = RecipeHead.model_validate(data)
    except ValidationError as err:
        found.extend(problems_from_validation(err, RecipeHead))
        head = None
    stages_raw = data.get("stages") if isinstance(data.get("stages"), dict) else {}
    stages: dict[str, StageConfig] = {}
    for name, raw in stages_raw.items():
        stage = _validate_stage(str(name), raw, found)
        if stage is not None:
            stages[str(name)] = stage
    if head is not None and not stages_raw:
        found.add("stages", "the recipe has no stages", "add at least one stage")
    return Recipe(name=head.name if head else "?", seed=head.seed if head else 0, stages=stages,
                  workdir=head.workdir if head else None, description=head.description if head else "",
                  stage_names=[str(n) for n in stages_raw],
                  on_contamination=head.on_contamination if head else "report")


def _validate_stage(name: str, raw: Any, found: ProblemCollector) -> StageConfig | None:
    where = f"stages.{name}"
    if not _STAGE_NAME.match(name):
        found.add(where, f"stage name {name!r} must start with a letter and use letters, digits, _ or -",
                  "rename the stage")
    if not isinstance(raw, dict):
        found.add(where, "a stage must be a mapping with a 'kind'", "add kind: sft (or another kind)",
                  value=raw)
        return None
    kind = raw.get("kind")
    if kind is None:
        found.add(f"{where}.kind", "required key is missing",
                  "add kind: one of " + ", ".join(STAGE_KINDS.names()))
        return None
    try:
        config_class = STAGE_KINDS.get(str(kind), where=f"{where}.kind")
    except UserError as err:
        found.extend(err.problems)
        return None
    try:
        return config_class.model_validate(raw)
    except ValidationError as err:
        found.extend(problems_from_validation(err, config_class, ("stages", name)))
        return None


def check_structure(recipe: Recipe, found: ProblemCollector) -> None:
    """References between stages: ``from`` names an earlier model stage; no cycles."""
    names = recipe.stage_names or list(recipe.stages)
    for name, stage in recipe.stages.items():
        for where, parent, wanted in stage.references():
            if parent not in names:
                found.add(f"stages.{name}.{where}", f"no stage named {parent!r}",
                          "use one of: " + ", ".join(n for n in names if n != name), value=parent)
            elif parent in recipe.stages and recipe.stages[parent].produces != wanted:
                found.add(f"stages.{name}.{where}", f"stage {parent!r} produces a "
                          f"{recipe.stages[parent].produces}, not a {wanted}", f"point it at a {wanted} stage")
    for name, stage in recipe.stages.items():
        parent = recipe.stages.get(stage.from_ or "")
        for i, gate in enumerate(stage.gates()):
            if gate.relative and parent is not None and not produced_by(gate.metric, [t.task for t in parent.eval]):
                found.add(f"stages.{name}.gate.{i}", f"gate {gate.text!r} compares with parent {stage.from_!r}, "
                          f"whose evals do not produce {gate.metric!r}",
                          f"add the same eval task to stage {stage.from_!r}")
    for cycle in _cycles(recipe):
        found.add(f"stages.{cycle[0]}.from", "stages depend on each other in a cycle: "
                  + " -> ".join(cycle + [cycle[0]]), "break the cycle")


def stage_parents(stage: StageConfig) -> list[str]:
    """The stages a stage reads from (its model's source, a reference model, a dataset)."""
    return stage.dependencies()


def _cycles(recipe: Recipe) -> list[list[str]]:
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for parent in stage_parents(recipe.stages[name]):
            if parent not in recipe.stages:
                continue
            if state.get(parent) == 1:
                cycles.append(path[path.index(parent):] if parent in path else [parent])
            elif state.get(parent) is None:
                visit(parent, [*path, parent])
        state[name] = 2

    for name in recipe.stages:
        if state.get(name) is None:
            visit(name, [name])
    return cycles


def topological_order(recipe: Recipe) -> list[str]:
    """Stages in an order where every parent comes before its children (file order on ties)."""
    done: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        for parent in stage_parents(recipe.stages[name]):
            visit(parent)
        done.append(name)

    for name in recipe.stages:
        visit(name)
    return done


def _locate(problems: list[Problem], path: Path, lines: dict[tuple[str, ...], int],
            overrides: list[str]) -> list[Problem]:
    """Prefix each problem with the recipe line of its YAML path (or mark it as from --set)."""
    override_keys = {o.partition("=")[0] for o in overrides}
    located = []
    for p in problems:
        if p.where.startswith("--set") or ":" in p.where.split(".")[0]:
            located.append(p)
            continue
        if any(p.where == k or p.where.startswith(k + ".") or k.startswith(p.where + ".")
               for k in override_keys):
            located.append(Problem(f"--set {p.where}", p.message, p.fix, p.value, p.has_value))
            continue
        parts = tuple(p.where.split("."))
        line = next((lines[parts[:i]] for i in range(len(parts), 0, -1) if parts[:i] in lines), None)
        prefix = f"{path.name}:{line} " if line else f"{path.name} "
        located.append(Problem(prefix + p.where, p.message, p.fix, p.value, p.has_value))
    return located
