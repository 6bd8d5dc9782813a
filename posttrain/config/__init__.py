"""Typed, strict configuration: recipes and every component's settings."""

from posttrain.config.components import (
    DataConfig,
    EvalTaskConfig,
    LoraConfig,
    ModelConfig,
    TinyModelConfig,
    TrainConfig,
)
from posttrain.config.recipe import Recipe, load_recipe, topological_order
from posttrain.config.stages import STAGE_KINDS, PretrainStage, SFTStage, StageConfig

__all__ = [
    "STAGE_KINDS",
    "DataConfig",
    "EvalTaskConfig",
    "LoraConfig",
    "ModelConfig",
    "PretrainStage",
    "Recipe",
    "SFTStage",
    "StageConfig",
    "TinyModelConfig",
    "TrainConfig",
    "load_recipe",
    "topological_order",
]
