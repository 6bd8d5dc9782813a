"""Preference stages: ``preference`` (the DPO family, paired) and ``kto`` (unpaired, binary)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from posttrain.config.base import StrictModel
from posttrain.config.components import DataConfig, NamedSpec, TrainConfig
from posttrain.config.stage_base import STAGE_KINDS, StageConfig


class LossSpec(NamedSpec):
    """A named loss and its parameters, e.g. ``{name: dpo, beta: 0.1}``, with a weight for
    combinations."""

    weight: float = Field(1.0, description="weight when several losses are combined")


class ReferenceConfig(StrictModel):
    """The reference policy. Default: the stage's starting model (the adapter-free model with LoRA).

    Its log-probabilities are computed once, before training, and cached on disk keyed by the
    reference model, the data and the tokenisation; the reference is not in memory while training.
    """

    from_: str | None = Field(None, alias="from", description="use another stage's model as reference")
    batch_size: int = Field(16, gt=0, description="pairs per forward of the caching pass")


class AlarmConfig(StrictModel):
    """Diagnostics that turn silent failures into alarms (in the metrics stream and the summary)."""

    window: int = Field(20, gt=1, description="optimizer steps per diagnostic window")
    margin_collapse_nats: float = Field(
        0.5, gt=0, description="alarm when chosen log-probs per token fall this much over a window "
        "while rejected ones fall too")
    length_bias_correlation: float = Field(
        0.6, gt=0, le=1, description="alarm when the margin correlates with the length gap above this")


def _losses(value: LossSpec | list[LossSpec]) -> list[LossSpec]:
    return value if isinstance(value, list) else [value]


class ReferencedStage(StageConfig):
    """A stage whose loss compares the policy with a reference policy."""

    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(lr=5e-7, global_batch_size=32))

    def references(self) -> list[tuple[str, str, str]]:
        found = super().references()
        return found + ([("reference.from", self.reference.from_, "model")] if self.reference.from_ else [])


class PreferenceStage(ReferencedStage):
    """The DPO family on (prompt, chosen, rejected) pairs, or on ranked responses turned into pairs."""

    kind: Literal["preference"]
    data: DataConfig
    loss: LossSpec | list[LossSpec] = Field(default_factory=lambda: LossSpec(name="dpo"),
                                            description="one loss, or a list combined with weights")
    max_prompt_length: int | None = Field(None, gt=0, description="pairs with longer prompts are bad pairs")
    on_bad_pair: Literal["error", "drop"] = Field(
        "error", description="identical or empty responses, over-long prompts: fail naming the row, or drop")
    max_dropped_share: float = Field(0.1, ge=0, le=1, description="fail if more pairs than this are dropped")
    rankings: Literal["best_vs_rest", "all_pairs"] = Field(
        "best_vs_rest", description="how rows with several scored responses become pairs")
    alarms: AlarmConfig = Field(default_factory=AlarmConfig)

    @property
    def losses(self) -> list[LossSpec]:
        return _losses(self.loss)

    @model_validator(mode="after")
    def _drop_share_needs_drop(self) -> PreferenceStage:
        if self.on_bad_pair == "error" and self.explicitly_set("max_dropped_share"):
            raise ValueError("'max_dropped_share' has no effect with on_bad_pair: error; fix: set on_bad_pair: drop")
        return self


class KTOStage(ReferencedStage):
    """KTO on unpaired (prompt, completion, label) rows."""

    kind: Literal["kto"]
    data: DataConfig
    loss: LossSpec = Field(default_factory=lambda: LossSpec(name="kto"),
                           description="kto (default) or apo_zero_unpaired, with its parameters")


STAGE_KINDS.add("preference", PreferenceStage)
STAGE_KINDS.add("kto", KTOStage)
