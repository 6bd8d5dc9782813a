"""The schema of each stage kind. The stage's run function lives in ``posttrain/stages``.

Stage kinds are registered in ``STAGE_KINDS`` by name; a recipe's ``kind:`` picks one. A user can
register their own config class (``STAGE_KINDS.add("my_kind", MyStage)``) together with a runner.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, BaseModel, Field, model_validator

from posttrain.config.base import StrictModel
from posttrain.config.components import DataConfig, EvalTaskConfig, ModelConfig
from posttrain.config.gates import Gate, parse_gate, produced_by
from posttrain.registry import Registry


def _valid_gate(text: str) -> str:
    parse_gate(text)
    return text


GateText = Annotated[str, AfterValidator(_valid_gate)]


class StageConfig(StrictModel):
    """Fields every stage kind has."""

    produces: ClassVar[str] = "model"  # what the stage's artifact is: model | dataset | eval
    uses_model: ClassVar[bool] = True  # data stages that only transform rows have no model

    kind: str
    from_: str | None = Field(None, alias="from", description="the stage whose model this one starts from")
    model: ModelConfig | None = Field(None, description="the starting model when there is no 'from'")
    eval: list[EvalTaskConfig] = Field(default_factory=list, description="evals run on the output model")
    gate: list[GateText] = Field(
        default_factory=list, description="eval thresholds the output must meet, e.g. 'demo_accuracy >= 0.4' or "
        "'demo_accuracy >= parent - 0.02'; a failed gate stops the stage's descendants")

    def gates(self) -> list[Gate]:
        return [parse_gate(text) for text in self.gate]

    def references(self) -> list[tuple[str, str, str]]:
        """(YAML key, stage name, the artifact kind it must produce) for every stage named here:
        ``from`` (a model) and every ``data: {stage: ...}`` (a dataset), wherever it is nested."""
        found = [("from", self.from_, "model")] if self.from_ else []
        return found + [(f"{path}.stage", data.stage, "dataset") for path, data in datasets_in(self) if data.stage]

    def dependencies(self) -> list[str]:
        """Stages whose artifacts this stage reads (built first; their keys are part of its key)."""
        return [name for _, name, _ in self.references()]

    @model_validator(mode="after")
    def _gates_on_produced_metrics(self) -> StageConfig:
        tasks = [t.task for t in self.eval]
        for gate in self.gates():
            if not produced_by(gate.metric, tasks):
                raise ValueError(f"gate {gate.text!r} is on metric {gate.metric!r}, which no eval of this stage "
                                 f"produces (evals: {', '.join(tasks) or 'none'}); fix: add an eval task that "
                                 "produces it, or gate on one of their metrics")
            if gate.relative and not self.from_:
                raise ValueError(f"gate {gate.text!r} compares with the parent, but the stage has no 'from'; "
                                 "fix: use an absolute threshold")
        return self

    @model_validator(mode="after")
    def _model_source(self) -> StageConfig:
        if not self.uses_model:
            if self.from_ or self.model is not None:
                raise ValueError(f"a {self.kind} stage uses no model; fix: remove 'from' and 'model'")
            return self
        has_own = self.model is not None and (self.model.path or self.model.tiny)
        if self.from_ and has_own:
            raise ValueError(
                "set 'from' or model.path/model.tiny, not both; fix: remove model.path/tiny "
                "to start from the parent stage"
            )
        if not self.from_ and not has_own:
            raise ValueError(
                "the stage has no starting model; fix: add 'from: <stage>' or model.path / model.tiny"
            )
        return self


def datasets_in(value: Any, path: str = "") -> Iterator[tuple[str, DataConfig]]:
    """Every DataConfig inside a config block, with its YAML path."""
    if isinstance(value, DataConfig):
        yield path, value
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from datasets_in(item, f"{path}.{i}" if path else str(i))
    elif isinstance(value, BaseModel):
        for name, field in type(value).model_fields.items():
            yield from datasets_in(getattr(value, name), f"{path}.{field.alias or name}" if path else (field.alias or name))


STAGE_KINDS: Registry[type[StageConfig]] = Registry("stage kind")
