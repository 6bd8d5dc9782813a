"""The schema of each stage kind. The stage's run function lives in ``posttrain/stages``.

Stage kinds are registered in ``STAGE_KINDS`` by name; a recipe's ``kind:`` picks one. A user can
register their own config class (``STAGE_KINDS.add("my_kind", MyStage)``) together with a runner.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator

from posttrain.config.base import StrictModel
from posttrain.config.components import EvalTaskConfig, ModelConfig
from posttrain.registry import Registry


class StageConfig(StrictModel):
    """Fields every stage kind has."""

    produces: ClassVar[str] = "model"  # what the stage's artifact is: model | dataset | eval

    kind: str
    from_: str | None = Field(None, alias="from", description="the stage whose model this one starts from")
    model: ModelConfig | None = Field(None, description="the starting model when there is no 'from'")
    eval: list[EvalTaskConfig] = Field(default_factory=list, description="evals run on the output model")

    def references(self) -> list[tuple[str, str, str]]:
        """(YAML key, stage name, the artifact kind it must produce) for every stage named here."""
        return [("from", self.from_, "model")] if self.from_ else []

    def dependencies(self) -> list[str]:
        """Stages whose artifacts this stage reads (built first; their keys are part of its key)."""
        return [name for _, name, _ in self.references()]

    @model_validator(mode="after")
    def _model_source(self) -> StageConfig:
        if self.produces != "model":
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


STAGE_KINDS: Registry[type[StageConfig]] = Registry("stage kind")
