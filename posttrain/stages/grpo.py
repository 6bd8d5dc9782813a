"""``grpo``: the GRPO family on the online loop.

Which member is a matter of pure functions chosen in the recipe:
GRPO (advantage grpo, loss ppo_clip, token-mean), Dr. GRPO (dr_grpo, constant-norm), DAPO
(clip_higher, dynamic_sampling, mask_truncated, an overlong reward), GSPO (loss gspo,
seq-mean-token-mean), RLOO (rloo), REINFORCE++ (reinforce_pp[_baseline]), ReMax (remax).
The wiring shared with ``ppo`` is in ``posttrain.stages.online``.
"""

from __future__ import annotations

from contextlib import closing
from typing import Any

from posttrain.config.stages.rl import GRPOStage
from posttrain.errors import Problem
from posttrain.loops.online import Algorithm, run_online
from posttrain.losses.advantages import ADVANTAGE_ESTIMATORS
from posttrain.monitoring.diagnostics import RLHealth
from posttrain.stages.common import StageContext, StageOutput, stage_model
from posttrain.stages.online import (
    PreparedOnline,
    check_algorithm,
    describe_online,
    finish_online,
    online_job,
    prepare_online,
    shared_algorithm,
)


class GRPORunner:
    def check(self, cfg: GRPOStage, where: str) -> list[Problem]:
        return check_algorithm(cfg, where)

    def prepare(self, ctx: StageContext) -> PreparedOnline:
        return prepare_online(ctx, self.check(ctx.config, ctx.where))

    def describe(self, ctx: StageContext, prepared: PreparedOnline) -> dict[str, Any]:
        return describe_online(ctx, prepared)

    def run(self, ctx: StageContext, prepared: PreparedOnline) -> StageOutput:
        cfg: GRPOStage = ctx.config
        model = stage_model(ctx, prepared.tokenizer).to(ctx.dist.device)
        algo = Algorithm(
            advantage=cfg.advantage.name, advantage_params=cfg.advantage.params(),
            needs_baseline=ADVANTAGE_ESTIMATORS.get(cfg.advantage.name).needs_baseline_rewards,
            dynamic_sampling=cfg.dynamic_sampling.enabled, max_rounds=cfg.dynamic_sampling.max_rounds,
            **shared_algorithm(cfg))
        job = online_job(ctx, prepared, model, algo)
        with closing(job.sampler):
            result = run_online(job, RLHealth(cfg.health, ctx.where))
        return finish_online(ctx, model, prepared.tokenizer, result)
