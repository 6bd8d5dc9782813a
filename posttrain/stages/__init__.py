"""Stage kinds: each wires a loop, a loss and data. Runners are registered by kind name."""

from posttrain.stages.common import STAGE_RUNNERS, StageContext, StageOutput, StageRunner
from posttrain.stages.data import FilterRunner, GenerateRunner, MixRunner, ScoreRunner, SelectRunner
from posttrain.stages.grpo import GRPORunner
from posttrain.stages.kto import KTORunner
from posttrain.stages.ppo import PPORunner
from posttrain.stages.preference import PreferenceRunner
from posttrain.stages.pretrain import pretrain_stage
from posttrain.stages.prm import PRMLabelRunner, PRMRunner
from posttrain.stages.reward_model import RewardModelRunner
from posttrain.stages.sft import SFT_FORMATS, TokenLMStage

STAGE_RUNNERS.add("pretrain", pretrain_stage)
STAGE_RUNNERS.add("sft", lambda: TokenLMStage(SFT_FORMATS))
STAGE_RUNNERS.add("preference", PreferenceRunner)
STAGE_RUNNERS.add("kto", KTORunner)
STAGE_RUNNERS.add("generate", GenerateRunner)
STAGE_RUNNERS.add("score", ScoreRunner)
STAGE_RUNNERS.add("select", SelectRunner)
STAGE_RUNNERS.add("reward_model", RewardModelRunner)
STAGE_RUNNERS.add("prm", PRMRunner)
STAGE_RUNNERS.add("prm_labels", PRMLabelRunner)
STAGE_RUNNERS.add("grpo", GRPORunner)
STAGE_RUNNERS.add("ppo", PPORunner)
STAGE_RUNNERS.add("filter", FilterRunner)
STAGE_RUNNERS.add("mix", MixRunner)

__all__ = ["STAGE_RUNNERS", "StageContext", "StageOutput", "StageRunner"]
