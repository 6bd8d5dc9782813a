"""``ppo``: PPO with a learned critic on the online loop.

Per step: rollouts and rewards as in ``grpo``; the critic's values on the rollout tokens; token
rewards = the outcome reward on the last token (minus beta KL per token with the KL in the
reward, the default); GAE advantages, whitened over the global batch, and returns; then
``ppo_epochs`` x ``minibatches`` updates of the policy (PPO-clip) and of the critic (clipped value
loss), the critic alone for the first ``critic_warmup_steps`` steps. The critic is checkpointed
with the policy and saved to ``<artifact>/critic`` as a ``value`` reward-model folder, which a
later ppo stage can start from (``critic: {path: ...}``).
"""

from __future__ import annotations

from contextlib import closing
from pathlib import Path
from typing import Any

from posttrain.config.stages.rl import PPOStage
from posttrain.errors import Problem, UserError, problem
from posttrain.loops.critic import Critic, CriticSettings
from posttrain.loops.online import Algorithm, run_online
from posttrain.models.block_attention import use_block_attention
from posttrain.models.heads import (
    RewardModel,
    load_reward_model,
    read_head_info,
    save_reward_model,
    value_model,
)
from posttrain.models.load import resolve_local
from posttrain.monitoring.diagnostics import RLHealth
from posttrain.stages.common import StageContext, StageOutput, stage_model, starting_model
from posttrain.stages.online import (
    PreparedOnline,
    check_algorithm,
    describe_online,
    finish_online,
    online_job,
    prepare_online,
    shared_algorithm,
)

CRITIC_DIR = "critic"


class PPORunner:
    def check(self, cfg: PPOStage, where: str) -> list[Problem]:
        return check_algorithm(cfg, where, keys=("loss",))

    def prepare(self, ctx: StageContext) -> PreparedOnline:
        cfg: PPOStage = ctx.config
        problems = self.check(cfg, ctx.where)
        if cfg.critic.path:
            try:
                _check_critic_heads(ctx, read_head_info(_critic_folder(ctx)).heads)
            except UserError as err:
                problems += err.problems
        return prepare_online(ctx, problems)

    def describe(self, ctx: StageContext, prepared: PreparedOnline) -> dict[str, Any]:
        cfg: PPOStage = ctx.config
        return {**describe_online(ctx, prepared), "critic_warmup_steps": cfg.critic_warmup_steps,
                "critic": cfg.critic.from_ or cfg.critic.path or "fresh value head on the starting model"}

    def run(self, ctx: StageContext, prepared: PreparedOnline) -> StageOutput:
        cfg: PPOStage = ctx.config
        model = stage_model(ctx, prepared.tokenizer).to(ctx.dist.device)
        t = cfg.train
        value = build_critic_model(ctx, prepared.tokenizer)
        settings = CriticSettings(gamma=cfg.gamma, lam=cfg.lam, value_clip=cfg.value_clip,
                                  warmup_steps=cfg.critic_warmup_steps, micro_batch_size=t.micro_batch_size,
                                  share_prompt=t.share_prompt and use_block_attention(value.backbone))
        optim = t.model_copy(update={"lr": cfg.critic.lr or t.lr})
        critic = Critic(value, optim, settings, t.max_steps * t.ppo_epochs * t.minibatches, ctx.dist)
        job = online_job(ctx, prepared, model, Algorithm(**shared_algorithm(cfg)), critic)
        with closing(job.sampler):
            result = run_online(job, RLHealth(cfg.health, ctx.where))
        if ctx.dist.is_main:
            save_reward_model(value.eval(), prepared.tokenizer, ctx.out_dir / CRITIC_DIR)
        out = finish_online(ctx, model, prepared.tokenizer, result)
        for key in ("explained_variance", "value_loss"):
            if key in result.final_metrics:
                out.metrics[f"train_{key}"] = result.final_metrics[key]
        return out


def _critic_folder(ctx: StageContext) -> Path:
    cfg: PPOStage = ctx.config
    if cfg.critic.from_:
        folder = ctx.parents.get(cfg.critic.from_)
        if folder is None:
            raise UserError(problem(f"{ctx.where}.critic.from", f"stage {cfg.critic.from_!r} has no artifact yet",
                                    "run the pipeline from that stage"))
        return folder
    path = resolve_local(cfg.critic.path or "", ctx.recipe.base_dir)
    if path is None or not path.is_dir():
        raise UserError(problem(f"{ctx.where}.critic.path", f"{cfg.critic.path!r} is not a folder",
                                "point it at a reward_model artifact"))
    return path


def _check_critic_heads(ctx: StageContext, heads: list[str]) -> None:
    if len(heads) != 1:
        key = "from" if ctx.config.critic.from_ else "path"
        raise UserError(problem(f"{ctx.where}.critic.{key}", f"the reward model has heads {heads}; a critic has one",
                                "use a one-head reward model"))


def build_critic_model(ctx: StageContext, tokenizer) -> RewardModel:
    """The critic: a reward model's backbone and head (it reads the policy's tokens, so the
    vocabularies must match), or a fresh value head on a copy of the starting model."""
    cfg: PPOStage = ctx.config
    if not (cfg.critic.from_ or cfg.critic.path):
        return value_model(starting_model(ctx, tokenizer), init_seed=cfg.critic.init_seed)
    key = "from" if cfg.critic.from_ else "path"
    loaded, own_tokenizer = load_reward_model(_critic_folder(ctx))
    _check_critic_heads(ctx, loaded.head_names)
    if own_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise UserError(problem(f"{ctx.where}.critic.{key}", "the reward model's vocabulary differs from the "
                                "policy's: it cannot read the policy's tokens", "train the reward model from the "
                                "same base model (or tokenizer) as the policy"))
    critic = value_model(loaded.backbone)
    critic.score.weight.data.copy_(loaded.score.weight.data)
    return critic.train()
