"""The online loop: prompts -> G rollouts each -> rewards -> advantages -> mu passes of minibatch
updates -> (weights synced to the sampler). PPO-style stages pass their pure functions in.

Token-in/token-out: the rollout's ids are trained on as sampled. Every process samples its share
of the step's prompts (sampling is batch-invariant, so the split does not change what is
sampled); rewards are gathered so advantages see the whole batch; loss normalisers are summed
over all processes before any backward, so 1 process and N give the same update.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from posttrain.config.stages.rl import HealthConfig, RLTrainConfig
from posttrain.loops.critic import Critic
from posttrain.loops.distributed import DistInfo, allreduce_gradients, allreduce_sum, barrier
from posttrain.loops.offline import (
    TrainResult,
    autocast,
    build_optimizer,
    build_scheduler,
    warmup_steps,
)
from posttrain.loops.rl_batch import RolloutBatch, build_batch, per_micro_batch, policy_logprobs
from posttrain.loops.state import (
    crash_point,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    trainable_state,
)
from posttrain.losses.advantages import outcome_advantages
from posttrain.losses.aggregation import GlobalNormalisers, aggregate
from posttrain.losses.kl import KL_ESTIMATORS, AdaptiveKLController, FixedKLController, kl_penalty_in_loss
from posttrain.losses.policy import POLICY_LOSSES, truncated_is_weights
from posttrain.losses.rl_filters import groups_with_signal
from posttrain.monitoring.progress import StepProgress
from posttrain.monitoring.sinks import Metrics, truncate_metrics
from posttrain.rollout.base import Sampler, SamplingParams
from posttrain.types import Rollout

# (completions, rows) -> [(combined score or None, components)]
RewardFn = Callable[[list[str], list[dict[str, Any]]], list[tuple[float | None, dict[str, float]]]]


@dataclass
class PromptRow:
    key: int  # position in the dataset
    ids: list[int]  # rendered prompt (with the generation prompt for conversations)
    row: dict[str, Any]  # the dataset row (answer, tests, ...) for the rewards


@dataclass
class Algorithm:
    """The pure-function choices of a stage (estimator, loss, aggregation, KL, filters)."""

    advantage: str = "grpo"
    advantage_params: dict[str, Any] = field(default_factory=dict)
    needs_baseline: bool = False  # ReMax: a greedy completion per prompt
    loss: str = "ppo_clip"
    loss_params: dict[str, Any] = field(default_factory=dict)
    aggregation: str = "token-mean"
    kl_beta: float = 0.0
    kl_estimator: str = "k3"
    kl_placement: str = "loss"
    kl_target: float | None = None
    mask_truncated: bool = False
    tis_cap: float | None = None
    dynamic_sampling: bool = False
    max_rounds: int = 3


@dataclass
class OnlineJob:
    name: str
    model: torch.nn.Module
    pad_id: int
    prompts: list[PromptRow]
    sampler: Sampler  # hf or vllm engine; synced with the model at the start of every step
    sampling: SamplingParams
    reward: RewardFn
    algorithm: Algorithm
    train: RLTrainConfig
    health: HealthConfig
    out_dir: Path
    dist: DistInfo
    reference: Callable[[RolloutBatch], torch.Tensor] | None = None  # no-grad ref logprobs [R, L]
    critic: Critic | None = None  # PPO: GAE advantages from a value model trained alongside
    seed: int = 0
    show_progress: bool = True
    share_prompt: bool = False  # micro-batches packed with one copy of each prompt (rl_batch.SharedPromptPack)

    @property
    def on_policy(self) -> bool:
        """One pass, one optimizer step: old logprobs are the current ones (ratio exactly 1)."""
        return self.train.ppo_epochs == 1 and self.train.minibatches == 1


class PromptPlan:
    """Which prompts each step uses: per-epoch seeded permutations, concatenated; extra prompts
    for dynamic sampling come from a separate stream, so refills never change the main plan."""

    def __init__(self, n: int, per_step: int, seed: int, shuffle: bool) -> None:
        self.n, self.per_step, self.seed, self.shuffle = n, per_step, seed, shuffle

    def _at(self, position: int, stream: int) -> int:
        epoch, offset = divmod(position, self.n)
        if not self.shuffle:
            return offset
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 7919 + stream)
        return int(torch.randperm(self.n, generator=g)[offset])

    def step(self, step: int) -> list[int]:
        return [self._at(step * self.per_step + i, 0) for i in range(self.per_step)]

    def refill(self, step: int, round_: int) -> list[int]:
        return [self._at((step * 255 + round_) * self.per_step + i, 1) for i in range(self.per_step)]


# ---------------------------------------------------------------------------- collection


@dataclass
class Collected:
    rollouts: list[Rollout]  # this process's rows, group-major
    scores: list[float | None]
    components: list[dict[str, float]]
    rewards: torch.Tensor  # [P, G] global, 0 where invalid
    valid: torch.Tensor  # [P, G] global
    own_groups: list[int]  # which global groups are this process's
    baseline: torch.Tensor | None = None  # [P] greedy rewards (ReMax)
    stats: dict[str, float] = field(default_factory=dict)


def _sample_and_score(job: OnlineJob, keys: list[int], draw: int, params: SamplingParams
                      ) -> tuple[list[Rollout], list[tuple[float | None, dict[str, float]]]]:
    """This process's share of ``keys`` (dealt round-robin), sampled and scored. ``draw`` makes
    the sampling seeds unique per (step, round): seed key = draw * N + prompt."""
    mine = keys[job.dist.rank :: job.dist.world_size]
    n = len(job.prompts)
    rollouts = job.sampler.generate([job.prompts[k].ids for k in mine], params, keys=[draw * n + k for k in mine])
    scored = job.reward([r.text for r in rollouts], [job.prompts[r.prompt_index % n].row for r in rollouts])
    return rollouts, scored


def _draw(step: int, stream: int) -> int:
    """Seed namespace of a sampling call: main (0), refill rounds (1..), greedy baseline (255)."""
    return step * 256 + stream


def _gather_groups(scored: list[tuple[float | None, dict]], groups: int, n: int, info: DistInfo
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's scores [groups_local, G] -> the global [P, G] (groups in plan order)."""
    local = [[float("nan") if s is None else s for s, _ in scored[g * n : (g + 1) * n]] for g in range(groups)]
    parts: list[list[list[float]]] = [local]
    if info.world_size > 1:
        parts = [[] for _ in range(info.world_size)]
        dist.all_gather_object(parts, local)
    # Plan order: keys were dealt round-robin, so global group i lives on rank i % world.
    total = sum(len(p) for p in parts)
    ordered = [parts[i % info.world_size][i // info.world_size] for i in range(total)]
    values = torch.tensor(ordered, dtype=torch.float64).reshape(total, n)
    valid = ~values.isnan()
    return torch.nan_to_num(values, nan=0.0), valid


def collect(job: OnlineJob, plan: PromptPlan, step: int) -> Collected:
    """Sample and score this step's prompts (refilling zero-variance groups if asked)."""
    info, n = job.dist, job.sampling.n
    keys = plan.step(step)
    rollouts, scored = _sample_and_score(job, keys, _draw(step, 0), job.sampling)
    rewards, valid = _gather_groups(scored, len(keys[info.rank :: info.world_size]), n, info)
    kept_groups = list(range(len(keys)))
    stats = {"zero_variance_share": 1 - float(groups_with_signal(rewards, valid).float().mean())}
    if job.algorithm.dynamic_sampling:
        keys, rollouts, scored, rewards, valid, kept_groups = _refill(job, plan, step, keys, rollouts, scored,
                                                                     rewards, valid)
    own = [g for g in kept_groups if g % info.world_size == info.rank]
    local_index = {g: i for i, g in enumerate(range(info.rank, len(keys), info.world_size))}
    picked = [local_index[g] * n + j for g in own for j in range(n)]
    result = Collected([rollouts[i] for i in picked], [scored[i][0] for i in picked],
                       [scored[i][1] for i in picked], rewards[kept_groups], valid[kept_groups],
                       [kept_groups.index(g) for g in own], stats=stats)
    if job.algorithm.needs_baseline:
        result.baseline = _greedy_baseline(job, [keys[g] for g in kept_groups], step)
    return result


def _refill(job, plan, step, keys, rollouts, scored, rewards, valid):
    """DAPO dynamic sampling: keep groups with reward variance; sample extra prompts until P are
    kept or the rounds run out (then the step trains on fewer groups)."""
    info, n = job.dist, job.sampling.n
    for round_ in range(job.algorithm.max_rounds):
        keep = groups_with_signal(rewards, valid)
        if int(keep.sum()) >= plan.per_step:
            break
        extra = plan.refill(step, round_)
        more_rollouts, more_scored = _sample_and_score(job, extra, _draw(step, round_ + 1), job.sampling)
        more_rewards, more_valid = _gather_groups(more_scored, len(extra[info.rank :: info.world_size]), n, info)
        # Appending keeps the layout (group i on rank i % world) because per_step is a multiple
        # of the process count (checked by the stage).
        keys = keys + extra
        rollouts, scored = rollouts + more_rollouts, scored + more_scored
        rewards, valid = torch.cat([rewards, more_rewards]), torch.cat([valid, more_valid])
    keep = groups_with_signal(rewards, valid).nonzero().squeeze(-1).tolist()[: plan.per_step]
    return keys, rollouts, scored, rewards, valid, keep


def _greedy_baseline(job: OnlineJob, keys: list[int], step: int) -> torch.Tensor:
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=job.sampling.max_new_tokens,
                            stop=job.sampling.stop, seed=job.sampling.seed)
    _, scored = _sample_and_score(job, keys, _draw(step, 255), greedy)
    values, valid = _gather_groups(scored, len(keys[job.dist.rank :: job.dist.world_size]), 1, job.dist)
    return torch.where(valid, values, torch.zeros_like(values)).squeeze(-1)


# ---------------------------------------------------------------------------- scoring passes


@torch.no_grad()
def batch_logprobs(model: torch.nn.Module, batch: RolloutBatch, *, temperature: float, chunk: int,
                   micro_batch_size: int, share_prompt: bool) -> torch.Tensor:
    """Logprobs of the sampled tokens [R, L] without gradient, micro-batch by micro-batch."""
    return per_micro_batch(batch, micro_batch_size, lambda mb: policy_logprobs(
        model, mb, temperature=temperature, chunk=chunk, share_prompt=share_prompt)[0])


def score_passes(job: OnlineJob, batch: RolloutBatch) -> None:
    """Old logprobs (unless on-policy, where they are the first forward's, detached) and the
    reference's, both before any update of this step."""
    temperature, chunk = job.sampling.temperature, job.train.logits_chunk
    if not job.on_policy or job.algorithm.kl_placement == "reward":
        was_training = job.model.training
        job.model.eval()
        batch.old_logp = batch_logprobs(job.model, batch, temperature=temperature, chunk=chunk,
                                        micro_batch_size=job.train.micro_batch_size, share_prompt=job.share_prompt)
        job.model.train(was_training)
    if job.reference is not None:
        batch.ref_logp = job.reference(batch)


def _gather_rows(values: torch.Tensor, collected: Collected, n: int, info: DistInfo) -> torch.Tensor:
    """Per-row values of this process [R_local] -> global [P, G] in plan order."""
    local = values.reshape(-1, n).tolist()
    if info.world_size == 1:
        return torch.tensor(local, dtype=torch.float64)
    parts: list[tuple[list[int], list]] = [([], []) for _ in range(info.world_size)]
    dist.all_gather_object(parts, (collected.own_groups, local))
    out = torch.zeros(collected.rewards.shape, dtype=torch.float64)
    for groups, rows in parts:
        for g, row in zip(groups, rows):
            out[g] = torch.tensor(row, dtype=torch.float64)
    return out


def set_advantages(job: OnlineJob, collected: Collected, batch: RolloutBatch, beta: float) -> dict[str, float]:
    """Advantages over the global [P, G] batch (KL penalty in the reward first, if placed there);
    this process keeps its own rows. With a critic: its GAE advantages [R, L] and returns."""
    algo, n = job.algorithm, job.sampling.n
    if job.critic is not None:
        return job.critic.set_advantages(batch, collected.rewards, collected.valid, beta, algo.kl_estimator,
                                         kl_in_reward=algo.kl_placement == "reward")
    rewards = collected.rewards.clone()
    stats: dict[str, float] = {}
    if algo.kl_placement == "reward" and batch.ref_logp is not None and beta > 0:
        kl = KL_ESTIMATORS.get(algo.kl_estimator)(batch.old_logp, batch.ref_logp) * batch.mask
        seq_kl = _gather_rows(kl.sum(-1).cpu(), collected, n, job.dist)
        rewards = rewards - beta * seq_kl
        stats["kl_seq_penalty"] = float(seq_kl[collected.valid].mean()) if bool(collected.valid.any()) else 0.0
    advantages = outcome_advantages(algo.advantage, rewards, valid=collected.valid,
                                    baseline_rewards=collected.baseline, **algo.advantage_params)
    own = advantages[collected.own_groups].reshape(-1) if collected.own_groups else torch.zeros(0)
    batch.advantages = own.to(batch.mask.device, batch.mask.dtype)
    return stats


# ---------------------------------------------------------------------------- updates


def _normalisers(job: OnlineJob, batch: RolloutBatch, rows: torch.Tensor) -> GlobalNormalisers:
    """Counts of one minibatch over every process (before any backward of it)."""
    local = GlobalNormalisers.from_masks([batch.mask[rows]], max_completion_length=job.sampling.max_new_tokens)
    totals = allreduce_sum({"tokens": float(local.tokens), "sequences": float(local.sequences),
                            "constant": float(local.constant or 0.0)}, job.dist)
    return GlobalNormalisers(totals["tokens"], totals["sequences"], totals["constant"])


def _micro_loss(job: OnlineJob, mb: RolloutBatch, norm: GlobalNormalisers, beta: float, first: bool
                ) -> tuple[torch.Tensor, dict[str, float]]:
    algo = job.algorithm
    logp, entropy = policy_logprobs(job.model, mb, temperature=job.sampling.temperature,
                                    chunk=job.train.logits_chunk, entropy=first, share_prompt=job.share_prompt)
    old = mb.old_logp if mb.old_logp is not None else logp.detach()
    stats: dict[str, float] = {}
    weights = None
    if algo.tis_cap is not None:
        weights, tis = truncated_is_weights(old, mb.sampler_logp, mb.mask, cap=algo.tis_cap)
        stats.update({k: float(v) for k, v in tis.items()})
    per_token, loss_stats = POLICY_LOSSES.get(algo.loss)(logp, old, mb.advantages, mb.mask, is_weights=weights,
                                                         **algo.loss_params)
    if beta > 0 and algo.kl_placement == "loss" and mb.ref_logp is not None:
        per_token, kl_stats = kl_penalty_in_loss(per_token, logp, mb.ref_logp, mb.mask, beta, algo.kl_estimator)
        loss_stats.update(kl_stats)
    loss = aggregate(per_token, mb.mask, norm, algo.aggregation)
    stats.update({k: float(v) for k, v in loss_stats.items()})
    stats["loss"] = float(loss.detach())
    if first:
        keep = mb.completion
        stats["entropy"] = float(entropy[keep].mean()) if bool(keep.any()) else 0.0
        gap = (old - mb.sampler_logp).abs()[keep]
        stats["logprob_gap_max"] = float(gap.max()) if gap.numel() else 0.0
        stats["logprob_gap_mean"] = float(gap.mean()) if gap.numel() else 0.0
    return loss, stats


FIRST_PASS_ONLY = ("entropy", "logprob_gap_max", "logprob_gap_mean")  # before any update of the step


SUMMED = ("loss", "value_loss")  # micro-batch shares of an optimizer step's loss: summed, not averaged


def optimise(job: OnlineJob, batch: RolloutBatch, optimizer, scheduler, beta: float, *, policy: bool = True
             ) -> dict[str, float]:
    """``ppo_epochs`` passes over the rollouts, ``minibatches`` optimizer steps per pass, of the
    policy (unless ``policy`` is False: critic warm-up) and of the critic if there is one. Returns
    the mean over micro-batches of each statistic (the max of ``*_max`` ones), the mean loss per
    optimizer step, and the first pass's entropy and sampler-trainer gap."""
    cfg, info = job.train, job.dist
    params = [p for p in job.model.parameters() if p.requires_grad]
    sums: dict[str, float] = {}
    out: dict[str, float] = {}
    micro_count = updates = 0
    for _epoch in range(cfg.ppo_epochs):
        for rows in torch.arange(batch.rows).tensor_split(cfg.minibatches):
            norm = _normalisers(job, batch, rows)
            for micro in rows.split(cfg.micro_batch_size):
                mb = batch.select(micro)
                stats = {}
                if policy:
                    with autocast(cfg, info.device):
                        loss, stats = _micro_loss(job, mb, norm, beta, first=micro_count == 0)
                    loss.backward()
                if job.critic is not None:
                    stats.update(job.critic.backward(mb, norm, job.algorithm.aggregation))
                micro_count += 1
                for key, value in stats.items():
                    if key in FIRST_PASS_ONLY:
                        out[key] = value
                    elif key.endswith("_max"):
                        out[key] = max(out.get(key, -math.inf), value)
                    else:
                        sums[key] = sums.get(key, 0.0) + value
            if policy:
                allreduce_gradients(params, info)
                if cfg.max_grad_norm is not None and params:
                    out["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if job.critic is not None:
                out.update(job.critic.step())
            updates += 1
    out.update({k: v / max(micro_count, 1) for k, v in sums.items() if k not in SUMMED})
    out.update({k: sums[k] / max(updates, 1) for k in SUMMED if k in sums})
    return out


# ---------------------------------------------------------------------------- the loop


def _step_metrics(collected: Collected, batch: RolloutBatch, update: dict[str, float], info: DistInfo
                  ) -> dict[str, float]:
    lengths = batch.completion.sum(-1).float()
    local = {"rows": float(batch.rows), "truncated": float(batch.truncated.sum()),
             "length_sum": float(lengths.sum()), "empty_mask": float((batch.mask.sum(-1) == 0).sum())}
    total = allreduce_sum(local, info)
    valid = collected.valid
    rewards = collected.rewards[valid]
    rows = max(total["rows"], 1.0)
    metrics = {
        "reward_mean": float(rewards.mean()) if rewards.numel() else float("nan"),
        "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        "masked_reward_share": 1 - float(valid.float().mean()),
        "truncated_share": total["truncated"] / rows,
        "completion_length": total["length_sum"] / rows,
        "empty_mask_share": total["empty_mask"] / rows,
        "groups": float(collected.rewards.shape[0]),
        **collected.stats, **update,
    }
    for name in sorted({k for c in collected.components for k in c}):
        values = [c[name] for c in collected.components if name in c]
        metrics[f"reward/{name}"] = sum(values) / len(values) if values else float("nan")
    return metrics


def run_online(job: OnlineJob, health) -> TrainResult:
    """Train for ``max_steps`` rollout steps, resuming from the newest checkpoint."""
    cfg, info = job.train, job.dist
    job.model.to(info.device).train()
    optimizer = build_optimizer(job.model, cfg)
    warm = job.critic.settings.warmup_steps if job.critic is not None else 0
    total_updates = (cfg.max_steps - warm) * cfg.ppo_epochs * cfg.minibatches
    scheduler = build_scheduler(optimizer, cfg, warmup_steps(cfg, total_updates), total_updates)
    algo = job.algorithm
    controller = (AdaptiveKLController(algo.kl_beta, algo.kl_target) if algo.kl_target
                  else FixedKLController(algo.kl_beta))
    plan = PromptPlan(len(job.prompts), cfg.prompts_per_step, job.seed, cfg.shuffle)
    start, tokens, last, alarms = _resume(job, optimizer, scheduler, controller, health)
    metrics_sink = Metrics(job.out_dir, job.name) if info.is_main else None
    progress = StepProgress(job.name, cfg.max_steps, start=start, enabled=info.is_main and job.show_progress)
    began = time.monotonic()
    try:
        for step in range(start, cfg.max_steps):
            t0 = time.monotonic()
            job.sampler.sync(job.model, step)  # policy version = rollout steps applied (resume too)
            collected = collect(job, plan, step)
            batch = build_batch(collected.rollouts, collected.scores, job.pad_id,
                                mask_truncated=algo.mask_truncated).to(info.device)
            batch.components = collected.components
            score_passes(job, batch)
            beta = controller.beta
            extra = set_advantages(job, collected, batch, beta)
            update = optimise(job, batch, optimizer, scheduler, beta, policy=step >= warm)
            last = {**_step_metrics(collected, batch, update, info), **extra, "kl_beta": beta,
                    "lr": scheduler.get_last_lr()[0], "step_s": time.monotonic() - t0}
            if "kl" in last:
                controller.update(last["kl"])
            tokens += int(batch.lengths.sum())
            for message in health.check(step + 1, last):
                alarms.append({"step": step + 1, "name": "health", "message": message})
                if metrics_sink:
                    metrics_sink.log(step + 1, {"alarm": "health", "message": message})
            if metrics_sink and (step + 1) % cfg.log_every == 0:
                metrics_sink.log(step + 1, last)
            progress.update(1, reward=last["reward_mean"], len=round(last["completion_length"], 1))
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.max_steps:
                _checkpoint(job, step + 1, optimizer, scheduler, controller, health, tokens, last, alarms)
        _checkpoint(job, cfg.max_steps, optimizer, scheduler, controller, health, tokens, last, alarms)
    finally:
        progress.close()
        if metrics_sink:
            metrics_sink.close()
    return TrainResult(cfg.max_steps, last, time.monotonic() - began, tokens, alarms, start or None)


def _checkpoint(job: OnlineJob, step: int, optimizer, scheduler, controller, health, tokens: int,
                last: dict[str, float], alarms: list[dict[str, Any]]) -> None:
    if job.dist.is_main:
        payload = {"model": trainable_state(job.model), "optimizer": optimizer.state_dict(),
                   "scheduler": scheduler.state_dict(), "rng": rng_state(),
                   "loop": {"step": step, "tokens": tokens, "last": last, "alarms": alarms,
                            "kl": controller.state_dict(), "health": health.state_dict()}}
        if job.critic is not None:
            payload["critic"] = job.critic.state_dict()
        save_checkpoint(job.out_dir / "checkpoints", step, payload, job.train.keep_checkpoints)
    barrier(job.dist)
    crash_point("checkpoint.saved")


def _resume(job: OnlineJob, optimizer, scheduler, controller, health):
    """(first step to run, tokens trained before it, the last step's metrics, alarms so far)."""
    path = latest_checkpoint(job.out_dir / "checkpoints")
    if path is None:
        return 0, 0, {}, []
    state = load_checkpoint(path)
    job.model.load_state_dict(state["model"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    controller.load_state_dict(state["loop"]["kl"])
    health.load_state_dict(state["loop"]["health"])
    if job.critic is not None:
        job.critic.load_state_dict(state["critic"])
    step = int(state["loop"]["step"])
    if job.dist.is_main:
        truncate_metrics(job.out_dir / "metrics.jsonl", step)
    loop = state["loop"]
    return step, int(loop.get("tokens", 0)), dict(loop.get("last", {})), list(loop.get("alarms", []))
