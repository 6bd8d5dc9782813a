"""The schema of each stage kind, one module per family. Importing this package registers them
all in ``STAGE_KINDS``; a stage's run function lives in ``posttrain/stages``."""

from posttrain.config.stage_base import STAGE_KINDS, StageConfig
from posttrain.config.stages.data import GenerateStage, ScoreStage, SelectStage
from posttrain.config.stages.lm import PretrainStage, SFTStage
from posttrain.config.stages.preference import KTOStage, PreferenceStage
from posttrain.config.stages.reward import PRMLabelStage, PRMStage, RewardModelStage  # noqa: F401
from posttrain.config.stages.rl import GRPOStage, PPOStage

__all__ = ["STAGE_KINDS", "GRPOStage", "GenerateStage", "KTOStage", "PPOStage", "PreferenceStage",
           "PretrainStage", "SFTStage",
           "ScoreStage", "SelectStage", "StageConfig"]
