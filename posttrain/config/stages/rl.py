"""Online RL stages: ``grpo`` (the GRPO family: Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++, ReMax,
chosen by estimator and loss settings)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from posttrain.config.base import StrictModel
from posttrain.config.components import DataConfig, NamedSpec, OptimConfig
from posttrain.config.stage_base import STAGE_KINDS, StageConfig
from posttrain.config.stages.data import RewardSpec, SamplingConfig


class RLTrainConfig(OptimConfig):
    """Optimisation of an online stage. One *step* = sample, score, then ``ppo_epochs`` passes
    over the rollouts in ``minibatches`` optimizer steps each."""

    max_steps: int = Field(100, gt=0, description="rollout steps")
    prompts_per_step: int = Field(8, gt=0, description="prompts per step over all processes (x sampling.n rollouts)")
    micro_batch_size: int = Field(8, gt=0, description="sequences per forward/backward on one process")
    ppo_epochs: int = Field(1, gt=0, description="passes over each step's rollouts (mu)")
    minibatches: int = Field(1, gt=0, description="optimizer steps per pass")
    max_prompt_length: int = Field(512, gt=0, description="longer prompts fail (or are dropped, see data)")
    shuffle: bool = Field(True, description="shuffle the prompt order each epoch")
    checkpoint_every: int = Field(10, ge=0, description="rollout steps between checkpoints; 0 = end only")


class KLConfig(StrictModel):
    """KL regularisation towards the starting policy. beta = 0 loads no reference model at all."""

    beta: float = Field(0.0, ge=0, description="KL coefficient (the start value when target is set)")
    estimator: Literal["k1", "k2", "k3"] = Field("k3", description="Schulman's estimators")
    placement: Literal["loss", "reward"] = Field("loss", description="a loss term, or a reward penalty")
    target: float | None = Field(None, gt=0, description="adaptive beta: x1.5 above 2*target, /1.5 below target/2")

    @model_validator(mode="after")
    def _adaptive_needs_beta(self) -> KLConfig:
        if self.target is not None and self.beta == 0:
            raise ValueError("an adaptive KL (target) needs a starting beta > 0; fix: set kl.beta")
        return self


class DynamicSamplingConfig(StrictModel):
    """DAPO dynamic sampling: drop groups whose rewards are all equal, refill with new prompts."""

    enabled: bool = False
    max_rounds: int = Field(3, gt=0, description="extra sampling rounds per step to refill dropped groups")


class HealthConfig(StrictModel):
    """Stop silent failures: thresholds of the per-step health checks."""

    stop_after: int = Field(5, gt=0, description="consecutive bad steps before the run stops")
    truncated_share: float = Field(0.95, gt=0, le=1, description="bad step: this share of completions truncated")
    zero_variance_share: float = Field(0.95, gt=0, le=1, description="bad step: this share of groups with equal rewards")
    logprob_gap: float = Field(0.05, gt=0, description="alarm: sampler vs trainer logprob gap (max abs, nats)")
    max_ratio: float = Field(10.0, gt=1, description="alarm: an importance ratio above this")
    kl: float = Field(1.0, gt=0, description="alarm: mean per-token KL to the reference above this")
    length_growth: float = Field(0.5, gt=0, description="alarm: mean length grew by this share over the window")
    window: int = Field(10, gt=1, description="steps per trend window")


class GRPOStage(StageConfig):
    """The GRPO family on the online loop."""

    kind: Literal["grpo"]
    data: DataConfig = Field(description="prompt rows (prompt + answer/tests/... for the rewards)")
    rewards: list[RewardSpec] = Field(min_length=1, description="verifiers or reward models, weighted")
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(n=8),
                                     description="rollouts per prompt (G = n) and their sampling")
    advantage: NamedSpec = Field(default_factory=lambda: NamedSpec(name="grpo"),
                                 description="grpo | dr_grpo | rloo | reinforce_pp | reinforce_pp_baseline | remax")
    loss: NamedSpec = Field(default_factory=lambda: NamedSpec(name="ppo_clip"),
                            description="ppo_clip | clip_higher | dual_clip | gspo, with eps_low / eps_high / ...")
    aggregation: str = Field("token-mean", description="token-mean | seq-mean-token-mean | seq-mean-token-sum | "
                             "constant-norm (Dr. GRPO)")
    kl: KLConfig = Field(default_factory=KLConfig)
    dynamic_sampling: DynamicSamplingConfig = Field(default_factory=DynamicSamplingConfig)
    mask_truncated: bool = Field(False, description="DAPO overlong filtering: no loss on truncated completions")
    tis_cap: float | None = Field(None, gt=0, description="truncated importance sampling cap C (sampler mismatch)")
    health: HealthConfig = Field(default_factory=HealthConfig)
    train: RLTrainConfig = Field(default_factory=lambda: RLTrainConfig(lr=1e-6))


STAGE_KINDS.add("grpo", GRPOStage)
