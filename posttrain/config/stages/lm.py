"""Next-token training stages: ``pretrain`` and ``sft``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from posttrain.config.components import DataConfig, TrainConfig
from posttrain.config.stage_base import STAGE_KINDS, StageConfig


class PretrainStage(StageConfig):
    """Plain causal-LM training on raw text (the demo uses it to make its base model)."""

    kind: Literal["pretrain"]
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)


class SFTStage(StageConfig):
    """Supervised fine-tuning on prompt/completion or conversational data."""

    kind: Literal["sft"]
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    loss_on: Literal["assistant", "last_assistant", "all"] = Field(
        "assistant",
        description="targets: every assistant turn (the completion of prompt/completion rows), "
        "only the last assistant turn, or every token",
    )
    loss_aggregation: Literal["token-mean", "seq-mean-token-mean"] = Field(
        "token-mean", description="average over target tokens of the global batch, or per row then over rows"
    )


STAGE_KINDS.add("pretrain", PretrainStage)
STAGE_KINDS.add("sft", SFTStage)
