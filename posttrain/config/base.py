"""The strict base model and the translation of pydantic errors into user-facing problems."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from posttrain.errors import Problem, problem


class StrictModel(BaseModel):
    """Every config block: unknown keys are errors, values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False,
                              populate_by_name=True)

    def explicitly_set(self, name: str) -> bool:
        """True when the user wrote this key (as opposed to it taking its default)."""
        return name in self.model_fields_set


def field_names(model: type[BaseModel]) -> list[str]:
    """The keys a user may write for this model (aliases where a field has one)."""
    return sorted((f.alias or name) for name, f in model.model_fields.items())


def _resolve_model(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """Walk ``loc`` through nested model fields; return the model that owns the last key."""
    current: Any = model
    for key in loc[:-1]:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = _field_by_key(current, key)
        if field is None:
            return None
        current = _inner_model(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return current
    return None


def _field_by_key(model: type[BaseModel], key: Any):
    for name, field in model.model_fields.items():
        if key in (name, field.alias):
            return field
    return None


def _inner_model(annotation: Any) -> Any:
    """The BaseModel inside ``X | None``, ``list[X]`` or ``dict[str, X]``, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


# What users of TRL / transformers call our keys: a better hint than spelling distance.
PEER_KEY_NAMES = {
    "learning_rate": "lr",
    "num_train_epochs": "epochs",
    "per_device_train_batch_size": "micro_batch_size",
    "gradient_accumulation_steps": "global_batch_size (= micro_batch_size x accumulation x processes)",
    "max_seq_length": "max_length",
    "lr_scheduler_type": "schedule",
    "bf16": "precision",
    "gradient_checkpointing_kwargs": "gradient_checkpointing",
    "completion_only_loss": "loss_on",
    "assistant_only_loss": "loss_on",
}

_FIXES = {
    "missing": "add this key",
    "int_parsing": "write a whole number",
    "int_type": "write a whole number",
    "float_parsing": "write a number, e.g. 1e-4",
    "float_type": "write a number, e.g. 1e-4",
    "bool_parsing": "write true or false",
    "bool_type": "write true or false",
    "string_type": "write a string",
    "dict_type": "write a mapping (key: value lines)",
    "model_type": "write a mapping (key: value lines)",
    "list_type": "write a list",
    "greater_than": "use a larger value",
    "greater_than_equal": "use a larger value",
    "less_than": "use a smaller value",
    "less_than_equal": "use a smaller value",
}


def problems_from_validation(
    err: ValidationError, model: type[BaseModel], prefix: tuple[Any, ...] = ()
) -> list[Problem]:
    """One Problem per pydantic error, with the YAML path, the value, why and the fix."""
    out: list[Problem] = []
    for item in err.errors(include_url=False):
        loc = tuple(item["loc"])
        # Discriminated unions and function validators add tags to the loc; drop them.
        loc = tuple(part for part in loc if not (isinstance(part, str) and part.startswith("function-")))
        where = ".".join(str(part) for part in prefix + loc) or "(top level)"
        kind = item["type"]
        message = item["msg"]
        fix = _FIXES.get(kind, "")
        if kind == "extra_forbidden":
            owner = _resolve_model(model, loc)
            valid = field_names(owner) if owner else []
            near = [PEER_KEY_NAMES[str(loc[-1])]] if str(loc[-1]) in PEER_KEY_NAMES else (
                difflib.get_close_matches(str(loc[-1]), valid, n=1))
            message = f"unknown key {loc[-1]!r}"
            fix = (f"did you mean {near[0]!r}? " if near else "remove it; ") + (
                "valid keys here: " + ", ".join(valid) if valid else ""
            )
            out.append(problem(where, message, fix))
            continue
        if kind == "literal_error":
            expected = item.get("ctx", {}).get("expected", "")
            fix = f"use one of {expected}"
        if kind == "value_error":
            # Our own validators phrase "what is wrong; fix: what to do".
            message = message.removeprefix("Value error, ")
            if "; fix: " in message:
                message, fix = message.split("; fix: ", 1)
        if kind == "missing":
            out.append(problem(where, "required key is missing", fix))
            continue
        value = item.get("input")
        if isinstance(value, dict):  # a whole block: the path already says which
            out.append(problem(where, message, fix))
        else:
            out.append(problem(where, message, fix, value=value))
    return out
