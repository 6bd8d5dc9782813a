"""The offline training loop: fixed batches (pretrain, SFT, reward models, DPO family, KTO).

A stage passes in the rows, a collate function, a per-row normaliser share and an objective;
the loop owns everything else: the step plan, AdamW and the schedule, accumulation, clipping,
the non-finite guard, progress, metrics, atomic checkpoints and exact resume.

Normalisation over the global batch: before any backward of a step, the loop sums the
normaliser shares (e.g. target tokens) of *every* row of the step, over all processes. Each
micro-batch loss is divided by that total, so the summed gradient is the same whatever the
micro-batch size, accumulation or process count.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from posttrain.config.components import OptimConfig, TrainConfig
from posttrain.errors import UserError, problem
from posttrain.loops.distributed import DistInfo, allreduce_gradients, allreduce_sum, barrier
from posttrain.loops.state import (
    crash_point,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    trainable_state,
)
from posttrain.monitoring.progress import StepProgress
from posttrain.monitoring.sinks import Metrics, truncate_metrics

# objective(model, micro_batch, normaliser) -> (loss contribution, stats contributions).
# Contributions are already divided by the step's global normaliser, so summing them over the
# micro-batches and processes of a step gives the step's value. A pair of keys "name/__num" and
# "name/__den" is summed, then reported as "name" = num / den (means over a subset of rows).
Objective = Callable[[torch.nn.Module, Any, float], tuple[torch.Tensor, dict[str, float]]]
# diagnostic(step, metrics) -> alarm messages (empty when healthy)
Diagnostic = Callable[[int, dict[str, float]], list[str]]


class TrainingAborted(UserError):
    """Training stopped on purpose (e.g. too many non-finite steps in a row)."""


@dataclass(frozen=True)
class ResolvedTrain:
    """Quantities derived from the config and the data (printed by ``posttrain plan``)."""

    rows: int
    world_size: int
    rows_per_step: int
    micro_batches_per_step: int
    accumulation: int  # micro-batches per process per step
    total_steps: int
    warmup_steps: int
    epochs: float
    seed: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def resolve_train(cfg: TrainConfig, rows: int, world_size: int, seed: int) -> ResolvedTrain:
    per_process = cfg.micro_batch_size * world_size
    if cfg.global_batch_size % per_process:
        raise UserError(problem("train.global_batch_size", f"{cfg.global_batch_size} is not a multiple of "
                                f"micro_batch_size x processes = {per_process}",
                                f"use a multiple of {per_process}"))
    if cfg.max_steps:
        total = cfg.max_steps
    else:
        total = max(1, math.ceil(cfg.epochs * rows / cfg.global_batch_size))
    micro = cfg.global_batch_size // cfg.micro_batch_size
    return ResolvedTrain(
        rows=rows, world_size=world_size, rows_per_step=cfg.global_batch_size,
        micro_batches_per_step=micro, accumulation=micro // world_size, total_steps=total,
        warmup_steps=warmup_steps(cfg, total), epochs=total * cfg.global_batch_size / rows,
        seed=cfg.seed if cfg.seed is not None else seed,
    )


class StepPlan:
    """Which rows each optimizer step uses, and how they split into micro-batches per process.

    The row stream is the concatenation of per-epoch permutations (seeded by seed and epoch), so
    the plan is a pure function of (rows, config, seed): resume needs only the step number.
    """

    def __init__(self, lengths: Sequence[int], cfg: TrainConfig, resolved: ResolvedTrain) -> None:
        self.lengths = list(lengths)
        self.cfg, self.resolved = cfg, resolved
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            n = len(self.lengths)
            if self.cfg.shuffle:
                g = torch.Generator().manual_seed(self.resolved.seed * 1_000_003 + epoch)
                self._perms[epoch] = torch.randperm(n, generator=g).tolist()
            else:
                self._perms[epoch] = list(range(n))
        return self._perms[epoch]

    def step_rows(self, step: int) -> list[int]:
        n, per = len(self.lengths), self.cfg.global_batch_size
        end_of_stream = (self.resolved.total_steps * per if self.cfg.max_steps
                         else math.ceil(self.cfg.epochs * n))
        start, stop = step * per, min((step + 1) * per, max(end_of_stream, step * per + 1))
        return [self._perm(p // n)[p % n] for p in range(start, stop)]

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """This process's micro-batches of ``step``: rows sorted by length (less padding),
        cut into micro-batches, dealt round-robin to processes."""
        rows = sorted(self.step_rows(step), key=lambda i: (-self.lengths[i], i))
        size = self.cfg.micro_batch_size
        chunks = [rows[i : i + size] for i in range(0, len(rows), size)]
        return chunks[rank :: self.resolved.world_size]


@dataclass
class OfflineJob:
    """Everything a stage hands to the loop."""

    name: str
    model: torch.nn.Module
    rows: Sequence[Any]
    lengths: Sequence[int]  # tokens per row (for padding-aware micro-batching)
    collate: Callable[[list[Any]], Any]  # rows -> micro-batch with .to(device), .tokens
    units: Callable[[Any], float]  # a row's share of the loss normaliser
    objective: Objective
    train: TrainConfig
    resolved: ResolvedTrain
    out_dir: Path
    dist: DistInfo
    diagnostics: list[Diagnostic] = field(default_factory=list)
    show_progress: bool = True
    # Called with this process's collated micro-batches of a step before any backward (e.g. to
    # compute a statistic of the whole step, such as KTO's z0).
    before_step: Callable[[torch.nn.Module, list[Any]], None] | None = None


@dataclass
class TrainResult:
    steps: int
    final_metrics: dict[str, float]
    seconds: float
    tokens: int
    alarms: list[dict[str, Any]]
    resumed_from: int | None


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norm weights (1-D parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError(problem("model", "no trainable parameters", "check the LoRA target modules"))
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel for all parameters instead of one loop iteration per tensor (~10% of a
    # small model's step on CPU); same update up to float rounding.
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
                for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr,
                             betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, fused=fused or None)


def lr_factor(step: int, cfg: OptimConfig, warmup: int, total: int) -> float:
    """Linear warmup from 0, then cosine or linear decay to ``min_lr_ratio`` (or constant)."""
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return floor + (1 - floor) * (1 - progress)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, warmup: int, total: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, warmup, total))


def warmup_steps(cfg: OptimConfig, total: int) -> int:
    if cfg.warmup_steps is not None:
        return min(cfg.warmup_steps, total)
    return min(round((cfg.warmup_ratio or 0.0) * total), total)


def autocast(cfg: OptimConfig, device: torch.device):
    """bf16 autocast when asked for, or on a GPU that supports it with ``precision: auto``."""
    use_bf16 = cfg.precision == "bf16" or (
        cfg.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


def run_offline(job: OfflineJob) -> TrainResult:
    """Train to the end of the plan, resuming from the newest checkpoint in ``out_dir``."""
    model, cfg, resolved, info = job.model, job.train, job.resolved, job.dist
    model.to(info.device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, resolved.warmup_steps, resolved.total_steps)
    plan = StepPlan(job.lengths, cfg, resolved)
    start, resumed_from, tokens_before, last, alarms = _resume(job, optimizer, scheduler)
    metrics = Metrics(job.out_dir, job.name) if info.is_main else None
    progress = StepProgress(job.name, resolved.total_steps, start=start, enabled=info.is_main and job.show_progress)
    bad_in_row, tokens_total, began = 0, tokens_before, time.monotonic()
    try:
        for step in range(start, resolved.total_steps):
            t0 = time.monotonic()
            stats, tokens = _accumulate(job, plan, step, params)
            grad_norm = _grad_norm(params, cfg.max_grad_norm)
            finite = math.isfinite(stats.get("loss", 0.0)) and math.isfinite(grad_norm)
            if finite:
                bad_in_row = 0
                optimizer.step()
            else:
                bad_in_row += 1
                alarms.append(_alarm(step, "non_finite", f"loss {stats.get('loss')} grad_norm {grad_norm}: "
                                     "step skipped"))
                if bad_in_row >= cfg.max_bad_steps:
                    raise TrainingAborted(problem(
                        f"stage {job.name} step {step + 1}", f"{bad_in_row} non-finite steps in a row",
                        "lower train.lr, enable train.max_grad_norm, or check the data for broken rows"))
            with warnings.catch_warnings():  # a skipped first step makes torch warn about the order
                warnings.simplefilter("ignore", UserWarning)
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            tokens_total += tokens
            seconds = time.monotonic() - t0
            last = {**stats, "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0],
                    "tokens": tokens, "tokens_per_s": tokens / max(seconds, 1e-9), "step_s": seconds}
            for diagnostic in job.diagnostics:
                alarms.extend(_alarm(step, "diagnostic", m) for m in diagnostic(step + 1, last))
            if metrics and (step + 1) % cfg.log_every == 0:
                metrics.log(step + 1, last)
            progress.update(1, loss=last.get("loss", float("nan")), tok_s=int(last["tokens_per_s"]))
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < resolved.total_steps:
                _checkpoint(job, step + 1, optimizer, scheduler, tokens_total, last, alarms)
        _checkpoint(job, resolved.total_steps, optimizer, scheduler, tokens_total, last, alarms)
    finally:
        progress.close()
        if metrics:
            for a in alarms:
                metrics.log(a["step"], {"alarm": a["name"], "message": a["message"]})
            metrics.close()
    return TrainResult(resolved.total_steps, last, time.monotonic() - began, tokens_total, alarms, resumed_from)


def _accumulate(job: OfflineJob, plan: StepPlan, step: int, params: list[torch.nn.Parameter]
                ) -> tuple[dict[str, float], int]:
    """Forward/backward this process's micro-batches of ``step``; gradients summed over processes."""
    info = job.dist
    normaliser = sum(job.units(job.rows[i]) for i in plan.step_rows(step))
    stats: dict[str, float] = {}
    tokens = 0
    batches = [job.collate([job.rows[i] for i in indices]).to(info.device)
               for indices in plan.micro_batches(step, info.rank)]
    if job.before_step is not None:
        with autocast(job.train, info.device):
            job.before_step(job.model, batches)
    for batch in batches:
        with autocast(job.train, info.device):
            loss, part = job.objective(job.model, batch, max(normaliser, 1e-12))
        loss.backward()
        tokens += batch.tokens
        for key, value in part.items():
            stats[key] = stats.get(key, 0.0) + float(value)
    allreduce_gradients(params, info)
    stats = _ratios(allreduce_sum({**stats, "_tokens": float(tokens)}, info))
    return stats, int(stats.pop("_tokens"))


def _ratios(stats: dict[str, float]) -> dict[str, float]:
    out = {k: v for k, v in stats.items() if not k.endswith(("/__num", "/__den"))}
    for key in stats:
        if key.endswith("/__num"):
            name = key.removesuffix("/__num")
            den = stats.get(f"{name}/__den", 0.0)
            out[name] = stats[key] / den if den else float("nan")
    return out


def _grad_norm(params: list[torch.nn.Parameter], max_norm: float | None) -> float:
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if max_norm is not None:
        return float(torch.nn.utils.clip_grad_norm_(grads, max_norm))
    return float(torch.nn.utils.get_total_norm([p.grad for p in grads]))


def _alarm(step: int, name: str, message: str) -> dict[str, Any]:
    return {"step": step + 1, "name": name, "message": message}


def _checkpoint(job: OfflineJob, step: int, optimizer, scheduler, tokens: int, last: dict[str, float],
                alarms: list[dict[str, Any]]) -> None:
    if job.dist.is_main:
        payload = {"model": trainable_state(job.model), "optimizer": optimizer.state_dict(),
                   "scheduler": scheduler.state_dict(), "rng": rng_state(),
                   "loop": {"step": step, "tokens": tokens, "last": last, "alarms": alarms}}
        save_checkpoint(job.out_dir / "checkpoints", step, payload, job.train.keep_checkpoints)
    barrier(job.dist)
    crash_point("checkpoint.saved")


def _resume(job: OfflineJob, optimizer, scheduler):
    """(first step to run, the step resumed from or None, tokens trained before it, the last
    step's metrics, the alarms so far)."""
    path = latest_checkpoint(job.out_dir / "checkpoints")
    if path is None:
        return 0, None, 0, {}, []
    state = load_checkpoint(path)
    missing = set(trainable_state(job.model)) - set(state["model"])
    if missing:
        raise UserError(problem(str(path), f"checkpoint lacks {len(missing)} trainable tensors "
                                f"(e.g. {sorted(missing)[0]})", "delete the stage folder to start over"))
    job.model.load_state_dict(state["model"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    step = int(state["loop"]["step"])
    if job.dist.is_main:
        truncate_metrics(job.out_dir / "metrics.jsonl", step)
    loop = state["loop"]
    return step, step, int(loop.get("tokens", 0)), dict(loop.get("last", {})), list(loop.get("alarms", []))
