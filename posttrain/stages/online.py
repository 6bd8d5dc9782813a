"""The wiring every online stage shares (``grpo``, ``ppo``): prompts rendered and checked, reward
scorers, sampling, the KL reference, the online job, and saving the policy."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from posttrain.config.stages.rl import OnlineStage
from posttrain.data.render import render_prompt
from posttrain.errors import Problem, UserError, problem
from posttrain.loops.critic import Critic
from posttrain.loops.offline import TrainResult
from posttrain.loops.online import Algorithm, OnlineJob, PromptRow, RewardFn, batch_logprobs
from posttrain.loops.rl_batch import RolloutBatch
from posttrain.losses.advantages import ADVANTAGE_ESTIMATORS
from posttrain.losses.aggregation import AGGREGATIONS
from posttrain.losses.policy import POLICY_LOSSES
from posttrain.models.block_attention import use_block_attention
from posttrain.models.load import is_peft
from posttrain.registry import keyword_parameters
from posttrain.rewards.base import Scorer, combine
from posttrain.rollout.engines import build_sampler, engine_problems, sampling_params
from posttrain.stages.common import (
    StageContext,
    StageOutput,
    finish_model_stage,
    reward_scorers,
    stage_tokenizer,
    starting_model,
)
from posttrain.stages.data import _rows


def check_algorithm(cfg: OnlineStage, where: str, keys: tuple[str, ...] = ("advantage", "loss")) -> list[Problem]:
    """Unknown estimator / loss / aggregation names and parameters they do not take, and a
    rollout engine that cannot run here."""
    problems: list[Problem] = []
    registries = {"advantage": ADVANTAGE_ESTIMATORS, "loss": POLICY_LOSSES}
    for key, registry, spec in ((k, registries[k], getattr(cfg, k)) for k in keys):
        try:
            entry = registry.get(spec.name, where=f"{where}.{key}.name")
        except UserError as err:
            problems += err.problems
            continue
        fn = getattr(entry, "fn", entry)
        if getattr(entry, "level", "outcome") != "outcome":
            problems.append(problem(f"{where}.{key}.name", f"{spec.name!r} needs a critic",
                                    "use the ppo stage for GAE, or an outcome estimator here"))
        valid = [k for k in keyword_parameters(fn) if k not in ("valid", "baseline_rewards", "token_counts",
                                                                  "is_weights")]
        problems += [problem(f"{where}.{key}.{k}", f"{spec.name!r} has no parameter {k!r}",
                             "its parameters: " + (", ".join(valid) or "none")) for k in spec.params() if k not in valid]
    if cfg.aggregation not in AGGREGATIONS:
        try:
            AGGREGATIONS.get(cfg.aggregation, where=f"{where}.aggregation")
        except UserError as err:
            problems += err.problems
    return problems + engine_problems(cfg.sampling, f"{where}.sampling")


@dataclass
class PreparedOnline:
    tokenizer: Any
    prompts: list[PromptRow]
    scorers: dict[str, Scorer]
    weights: dict[str, float]


def prepare_online(ctx: StageContext, problems: list[Problem]) -> PreparedOnline:
    """Prompts rendered and checked, reward scorers built; raises the stage's problems at once."""
    cfg: OnlineStage = ctx.config
    if cfg.train.prompts_per_step % ctx.dist.world_size:
        problems.append(problem(f"{ctx.where}.train.prompts_per_step", f"{cfg.train.prompts_per_step} prompts "
                                f"cannot be split over {ctx.dist.world_size} processes",
                                "use a multiple of the process count"))
    if problems:
        raise UserError(problems)
    tokenizer = stage_tokenizer(ctx)
    prompts = []
    for i, (row, src) in enumerate(_rows(ctx)):
        if "prompt" not in row:
            raise UserError(problem(f"{src} field 'prompt'", "missing", "RL data needs prompt rows"))
        ids = render_prompt(tokenizer, row["prompt"], src)
        if len(ids) > cfg.train.max_prompt_length:
            raise UserError(problem(str(src), f"prompt of {len(ids)} tokens > train.max_prompt_length "
                                    f"{cfg.train.max_prompt_length}", "raise it or drop the row"))
        prompts.append(PromptRow(i, ids, row))
    scorers, weights = reward_scorers(ctx, cfg.rewards)
    return PreparedOnline(tokenizer, prompts, scorers, weights)


def describe_online(ctx: StageContext, prepared: PreparedOnline) -> dict[str, Any]:
    cfg: OnlineStage = ctx.config
    t, n = cfg.train, cfg.sampling.n
    return {"prompts": len(prepared.prompts), "prompts_per_step": t.prompts_per_step, "rollouts_per_step":
            t.prompts_per_step * n, "optimizer_steps": t.max_steps * t.ppo_epochs * t.minibatches,
            "max_new_tokens": cfg.sampling.max_new_tokens, "max_tokens_per_step":
            t.prompts_per_step * n * (cfg.sampling.max_new_tokens + t.max_prompt_length)}


def shared_algorithm(cfg: OnlineStage) -> dict[str, Any]:
    """The ``Algorithm`` settings every online stage has (loss, aggregation, KL, mismatch)."""
    return dict(loss=cfg.loss.name, loss_params=cfg.loss.params(), aggregation=cfg.aggregation,
                kl_beta=cfg.kl.beta, kl_estimator=cfg.kl.estimator, kl_placement=cfg.kl.placement,
                kl_target=cfg.kl.target, mask_truncated=cfg.mask_truncated, tis_cap=cfg.tis_cap)


def online_job(ctx: StageContext, prepared: PreparedOnline, model: torch.nn.Module, algo: Algorithm,
               critic: Critic | None = None) -> OnlineJob:
    """Sampler, reference and rewards around ``model``, ready for ``run_online`` (which each stage
    calls itself, so its module holds the call: benchmarks time ``<stage module>.run_online``)."""
    cfg: OnlineStage = ctx.config
    sampling = sampling_params(cfg.sampling, ctx.seed)
    # Before the reference model: a vLLM engine needs its share of the GPU free when it starts.
    sampler = build_sampler(cfg.sampling, sampling, model, prepared.tokenizer,
                            max_model_len=cfg.train.max_prompt_length + cfg.sampling.max_new_tokens)
    share_prompt = cfg.train.share_prompt and use_block_attention(model)
    reference = _reference(ctx, model, prepared.tokenizer, sampling.temperature, share_prompt) \
        if cfg.kl.beta > 0 else None
    job = OnlineJob(
        name=ctx.name, model=model, pad_id=prepared.tokenizer.pad_token_id, prompts=prepared.prompts,
        sampler=sampler, sampling=sampling,
        reward=reward_fn(prepared.scorers, prepared.weights), algorithm=algo, train=cfg.train,
        health=cfg.health, out_dir=ctx.out_dir, dist=ctx.dist, reference=reference, seed=ctx.seed,
        show_progress=ctx.show_progress, critic=critic, share_prompt=share_prompt)
    _announce(ctx, cfg)
    return job


def finish_online(ctx: StageContext, model: torch.nn.Module, tokenizer: Any, result: TrainResult) -> StageOutput:
    model.eval()
    metrics = {f"train_{k}": result.final_metrics[k] for k in ("reward_mean", "completion_length", "kl")
               if k in result.final_metrics}
    metrics.update(finish_model_stage(ctx, model, tokenizer))
    return StageOutput(metrics, result.alarms, {"resumed_from": result.resumed_from})


def reward_fn(scorers: dict[str, Scorer], weights: dict[str, float]) -> RewardFn:
    def score(completions: list[str], rows: list[dict[str, Any]]):
        per_reward = {name: scorer(completions, rows) for name, scorer in scorers.items()}
        return combine(per_reward, weights)

    return score


def _reference(ctx: StageContext, policy: torch.nn.Module, tokenizer, temperature: float, share_prompt: bool):
    """The KL reference: the adapter-free policy under LoRA, else a frozen copy of the start."""
    cfg: OnlineStage = ctx.config
    frozen = None
    if not is_peft(policy):
        frozen = starting_model(ctx, tokenizer).to(ctx.dist.device).eval()
        frozen.requires_grad_(False)
        share_prompt = share_prompt and use_block_attention(frozen)

    def logprobs(batch: RolloutBatch) -> torch.Tensor:
        model = frozen if frozen is not None else policy
        context = policy.disable_adapter() if frozen is None else nullcontext()
        with context:
            return batch_logprobs(model, batch, temperature=temperature, chunk=cfg.train.logits_chunk,
                                  micro_batch_size=cfg.train.micro_batch_size, share_prompt=share_prompt)

    return logprobs


def _announce(ctx: StageContext, cfg: OnlineStage) -> None:
    if ctx.dist.is_main:
        from posttrain.monitoring.progress import console

        t, n = cfg.train, cfg.sampling.n
        console().print(f"{ctx.name}: {t.prompts_per_step} prompts x {n} completions = {t.prompts_per_step * n} "
                        f"rollouts per step, up to {cfg.sampling.max_new_tokens} new tokens each; "
                        f"{t.ppo_epochs} pass(es) x {t.minibatches} optimizer step(s) per rollout step")
