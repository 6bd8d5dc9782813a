"""Online RL stages: ``grpo`` (the GRPO family: Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++, ReMax,
chosen by estimator and loss settings) and ``ppo`` (a learned critic, GAE)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from posttrain.config.base import StrictModel
from posttrain.config.components import DataConfig, NamedSpec, OptimConfig
from posttrain.config.stage_base import STAGE_KINDS, StageConfig
from posttrain.config.stages.data import RewardSpec, SamplingConfig, reward_references


class VLLMEngineConfig(StrictModel):
    """The colocated vLLM engine of ``sampling.engine: vllm``: one per training process, on its GPU,
    in its process, holding its own copy of the weights (reloaded at every rollout step)."""

    gpu_memory_utilization: float = Field(0.3, gt=0, lt=1, description="share of the GPU's memory the engine "
                                          "takes (its weights and KV cache); the trainer needs the rest")
    enforce_eager: bool = Field(False, description="no CUDA graphs: slower decoding, less memory, faster start")
    dtype: Literal["model", "bfloat16", "float16", "float32"] = Field(
        "model", description="the engine's weights: 'model' = the trainer's parameter dtype")


class RolloutSamplingConfig(SamplingConfig):
    """How an online stage samples its rollouts, and with which engine (docs/training.md)."""

    engine: Literal["hf", "vllm"] = Field("hf", description="hf: the trainer's own module (CPU or GPU); vllm: a "
                                          "colocated vLLM engine (a CUDA GPU and the vllm package)")
    vllm: VLLMEngineConfig = Field(default_factory=VLLMEngineConfig, description="settings of engine: vllm")

    # Added after stage keys existed: left out of a stage's key while at their default, so the
    # default hf engine keeps every cached artifact's key (pipeline/artifacts.py).
    key_omits_defaults: ClassVar[tuple[str, ...]] = ("engine", "vllm")

    @model_validator(mode="after")
    def _engine_keys(self) -> RolloutSamplingConfig:
        if self.engine != "vllm" and self.explicitly_set("vllm"):
            raise ValueError("'vllm' has no effect with engine: hf; fix: remove it or set engine: vllm")
        if self.engine == "vllm" and self.explicitly_set("batch_size"):
            raise ValueError("'batch_size' has no effect with engine: vllm (vLLM forms its own batches); "
                             "fix: remove it")
        return self


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
    share_prompt: bool = Field(True, description="pack each micro-batch into one row, the rows of a prompt "
                                                 "sharing one copy of it (same logprobs, fewer tokens; SDPA "
                                                 "models only, others pad)")

    key_omits_defaults: ClassVar[tuple[str, ...]] = ("share_prompt",)


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


class OnlineStage(StageConfig):
    """What every online stage has: prompts, rewards, sampling, the policy loss and its
    aggregation, KL, the sampler-mismatch settings, health checks and optimisation."""

    data: DataConfig = Field(description="prompt rows (prompt + answer/tests/... for the rewards)")
    rewards: list[RewardSpec] = Field(min_length=1, description="verifiers or reward models, weighted")
    sampling: RolloutSamplingConfig = Field(default_factory=lambda: RolloutSamplingConfig(n=8),
                                            description="rollouts per prompt (G = n), their sampling and engine")
    loss: NamedSpec = Field(default_factory=lambda: NamedSpec(name="ppo_clip"),
                            description="ppo_clip | clip_higher | dual_clip | gspo, with eps_low / eps_high / ...")
    aggregation: str = Field("token-mean", description="token-mean | seq-mean-token-mean | seq-mean-token-sum | "
                             "constant-norm (Dr. GRPO)")
    kl: KLConfig = Field(default_factory=KLConfig)
    mask_truncated: bool = Field(False, description="DAPO overlong filtering: no loss on truncated completions")
    tis_cap: float | None = Field(None, gt=0, description="truncated importance sampling cap C (sampler mismatch)")
    health: HealthConfig = Field(default_factory=HealthConfig)
    train: RLTrainConfig = Field(default_factory=lambda: RLTrainConfig(lr=1e-6))

    def references(self) -> list[tuple[str, str, str]]:
        return super().references() + reward_references(self.rewards)


class GRPOStage(OnlineStage):
    """The GRPO family on the online loop."""

    kind: Literal["grpo"]
    advantage: NamedSpec = Field(default_factory=lambda: NamedSpec(name="grpo"),
                                 description="grpo | dr_grpo | rloo | reinforce_pp | reinforce_pp_baseline | remax")
    dynamic_sampling: DynamicSamplingConfig = Field(default_factory=DynamicSamplingConfig)


class PPOKLConfig(KLConfig):
    """KL towards the starting policy, by default as classic RLHF PPO has it: a per-token k1
    penalty in the reward (Ziegler et al. 2019; Ouyang et al. 2022, eq. 2)."""

    estimator: Literal["k1", "k2", "k3"] = Field("k1", description="Schulman's estimators")
    placement: Literal["loss", "reward"] = Field("reward", description="a per-token reward penalty, or a loss term")


class CriticConfig(StrictModel):
    """PPO's value model. Default: a fresh value head on a copy of the policy's starting model.
    It is trained fully (no LoRA) with the stage's train settings except its own lr."""

    from_: str | None = Field(None, alias="from", description="a reward_model stage whose (one-head) model "
                              "initialises the critic")
    path: str | None = Field(None, description="a reward_model artifact folder (or its model/ folder) to "
                             "initialise the critic from, instead of 'from'")
    init_seed: int = Field(0, description="seed of a fresh value head")
    lr: float | None = Field(None, gt=0, description="the critic's peak learning rate (default: train.lr); PPO's "
                             "vf_coef folded in, the critic having its own optimizer")

    @model_validator(mode="after")
    def _one_source(self) -> CriticConfig:
        if self.from_ and self.path:
            raise ValueError("set critic.from or critic.path, not both; fix: remove one")
        if (self.from_ or self.path) and self.explicitly_set("init_seed"):
            raise ValueError("'init_seed' has no effect when the critic is loaded; fix: remove it")
        return self


class PPOStage(OnlineStage):
    """PPO with a learned critic: GAE advantages (whitened over the global batch), the PPO-clip
    policy loss and the clipped value loss, over ``train.ppo_epochs`` x ``train.minibatches``."""

    kind: Literal["ppo"]
    sampling: RolloutSamplingConfig = Field(default_factory=lambda: RolloutSamplingConfig(n=1),
                                            description="rollouts per prompt (the critic is the baseline: n = 1 "
                                            "works), their sampling and engine")
    kl: PPOKLConfig = Field(default_factory=PPOKLConfig)
    critic: CriticConfig = Field(default_factory=CriticConfig)
    gamma: float = Field(1.0, ge=0, le=1, description="discount per token (1 as in LLM PPO: one reward at the end)")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda (bias-variance trade-off of the advantages)")
    value_clip: float | None = Field(0.2, gt=0, description="clip of the value change around the rollout-time "
                                     "value (PPO2); null = plain squared error")
    critic_warmup_steps: int = Field(0, ge=0, description="first rollout steps that train only the critic "
                                     "(counted in train.max_steps)")

    def references(self) -> list[tuple[str, str, str]]:
        found = super().references()
        return found + ([("critic.from", self.critic.from_, "reward_model")] if self.critic.from_ else [])

    @model_validator(mode="after")
    def _warmup_within_run(self) -> PPOStage:
        if self.critic_warmup_steps > self.train.max_steps:
            raise ValueError(f"critic_warmup_steps {self.critic_warmup_steps} > train.max_steps "
                             f"{self.train.max_steps}: the policy would never train; fix: lower it or raise "
                             "train.max_steps")
        return self


STAGE_KINDS.add("grpo", GRPOStage)
STAGE_KINDS.add("ppo", PPOStage)
