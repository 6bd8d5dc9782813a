"""``kto``: KTO on unpaired (prompt, completion, desirable?) rows, on the offline loop.

The KL reference point z0 (Ethayarajh et al. 2024, Sec. 4.1) is estimated from mismatched
(prompt, another row's completion) sequences. The partner of row i is row i - 1 of the dataset
(a fixed rotation, like TRL's per-batch rotation), so the reference side can be cached with the
rest. z0 is computed once per optimizer step over *all* the step's rows (every process, before
any backward), so it does not change with the micro-batch size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

from posttrain.config.stages.preference import KTOStage
from posttrain.data.pairs import SequenceBatch, collate_sequences
from posttrain.data.render import fit_length, render_prompt_completion
from posttrain.errors import UserError
from posttrain.loops.distributed import DistInfo
from posttrain.loops.offline import OfflineJob, ResolvedTrain, resolve_train, run_offline
from posttrain.losses.kto import UNPAIRED_LOSSES, kto_kl_baseline
from posttrain.models.forward import sequence_logprobs
from posttrain.stages.common import (
    StageContext,
    StageOutput,
    contamination_guard,
    finish_model_stage,
    stage_model,
    stage_tokenizer,
)
from posttrain.stages.preference import check_losses
from posttrain.stages.reference import cached_reference_logprobs
from posttrain.types import KTOExample, TokenizedExample


@dataclass
class KTORow:
    target: TokenizedExample  # prompt + own completion
    mismatched: TokenizedExample  # prompt + the previous row's completion (for z0)
    label: bool
    index: int

    def __len__(self) -> int:
        return len(self.target) + len(self.mismatched)


@dataclass
class KTOBatch:
    targets: SequenceBatch  # index = row index
    mismatched: SequenceBatch  # index = N + row index
    labels: torch.Tensor  # [B] bool
    tokens: int

    def to(self, device: torch.device) -> KTOBatch:
        return KTOBatch(self.targets.to(device), self.mismatched.to(device), self.labels.to(device), self.tokens)


def collate_kto(rows: list[KTORow], pad_id: int, n: int) -> KTOBatch:
    targets = collate_sequences([r.target for r in rows], [r.index for r in rows], pad_id)
    mismatched = collate_sequences([r.mismatched for r in rows], [n + r.index for r in rows], pad_id)
    return KTOBatch(targets, mismatched, torch.tensor([r.label for r in rows]), targets.tokens)


@dataclass
class PreparedKTO:
    tokenizer: PreTrainedTokenizerBase
    rows: list[KTORow]
    resolved: ResolvedTrain
    desirable_share: float
    contamination: dict[str, Any]


def _render(tokenizer, examples: list[KTOExample], max_length: int, on_overlong: str) -> list[KTORow]:
    rows = []
    for i, e in enumerate(examples):
        partner = examples[i - 1]
        target = fit_length(render_prompt_completion(tokenizer, e.prompt, e.completion, "assistant", e.source),
                            max_length, on_overlong)
        mismatched = fit_length(render_prompt_completion(tokenizer, e.prompt, partner.completion, "assistant",
                                                         e.source), max_length, "truncate")
        if target is None or mismatched is None:
            raise UserError(f"{e.source}: longer than max_length {max_length}; raise train.max_length")
        rows.append(KTORow(target, mismatched, e.label, i))
    return rows


class KTORunner:
    def check(self, cfg: KTOStage, where: str):
        return check_losses([cfg.loss], f"{where}.loss", registry_get=UNPAIRED_LOSSES.get)

    def prepare(self, ctx: StageContext) -> PreparedKTO:
        cfg: KTOStage = ctx.config
        problems = self.check(cfg, ctx.where)
        if problems:
            raise UserError(problems)
        tokenizer = stage_tokenizer(ctx)
        data = ctx.load_data(cfg.data, expect=("kto",))
        if len(data.examples) < 2:
            raise UserError(f"{ctx.where}.data: KTO needs at least 2 rows (z0 pairs each prompt with another "
                            "row's completion)")
        examples, contamination = contamination_guard(ctx, data.examples)
        rows = _render(tokenizer, examples, cfg.train.max_length, cfg.train.on_overlong)
        share = sum(r.label for r in rows) / len(rows)
        resolved = resolve_train(cfg.train, len(rows), ctx.dist.world_size, ctx.seed)
        return PreparedKTO(tokenizer, rows, resolved, share, contamination)

    def describe(self, ctx: StageContext, prepared: PreparedKTO) -> dict[str, Any]:
        return {"rows": len(prepared.rows), "desirable_share": prepared.desirable_share, **prepared.resolved.as_dict()}

    def run(self, ctx: StageContext, prepared: PreparedKTO) -> StageOutput:
        cfg: KTOStage = ctx.config
        loss = UNPAIRED_LOSSES.get(cfg.loss.name)
        model = stage_model(ctx, prepared.tokenizer)
        model.to(ctx.dist.device)
        sequences = [r.target for r in prepared.rows] + [r.mismatched for r in prepared.rows]
        reference, hit = cached_reference_logprobs(ctx, model, prepared.tokenizer, sequences,
                                                   batch_size=cfg.reference.batch_size, chunk=cfg.train.logits_chunk)
        pad, n = prepared.tokenizer.pad_token_id, len(prepared.rows)
        objective = KTOObjective(loss, cfg.loss.params(), reference, cfg.train.logits_chunk, ctx.dist)
        job = OfflineJob(
            name=ctx.name, model=model, rows=prepared.rows, lengths=[len(r) for r in prepared.rows],
            collate=lambda rows: collate_kto(rows, pad, n), units=lambda _row: 1.0, objective=objective,
            train=cfg.train, resolved=prepared.resolved, out_dir=ctx.out_dir, dist=ctx.dist,
            before_step=objective.before_step if loss.needs_kl_baseline else None,
            show_progress=ctx.show_progress,
        )
        result = run_offline(job)
        model.eval()
        metrics = {"train_loss": result.final_metrics.get("loss", float("nan"))}
        metrics.update(finish_model_stage(ctx, model, prepared.tokenizer))
        info = {"resolved": prepared.resolved.as_dict(), "reference_cache": "hit" if hit else "computed",
                "desirable_share": prepared.desirable_share, "resumed_from": result.resumed_from}
        return StageOutput(metrics, result.alarms, info)


class KTOObjective:
    """Per micro-batch KTO loss; z0 comes from ``before_step`` (the whole step, all processes)."""

    def __init__(self, loss, params: dict[str, object], reference: torch.Tensor, chunk: int, info: DistInfo):
        self.loss, self.params, self.reference, self.chunk, self.info = loss, params, reference, chunk, info
        self.z0: torch.Tensor | None = None

    @torch.no_grad()
    def before_step(self, model: torch.nn.Module, batches: list[KTOBatch]) -> None:
        total = torch.zeros(2, dtype=torch.float64)
        for b in batches:
            m = b.mismatched
            sums, _ = sequence_logprobs(model, m.input_ids, m.position_ids, m.target_mask, chunk=self.chunk)
            ref = self.reference.to(sums.device)[m.index]
            total += torch.tensor([float((sums.float() - ref).sum()), float(sums.numel())], dtype=torch.float64)
        if self.info.world_size > 1:
            dist.all_reduce(total)
        self.z0 = kto_kl_baseline(torch.tensor([total[0] / total[1]]), torch.zeros(1))

    def __call__(self, model: torch.nn.Module, batch: KTOBatch, normaliser: float):
        t = batch.targets
        sums, _ = sequence_logprobs(model, t.input_ids, t.position_ids, t.target_mask, chunk=self.chunk)
        ref = self.reference.to(sums.device)[t.index]
        z0 = self.z0.to(sums.device) if self.z0 is not None else None
        losses, stats = self.loss(sums, ref, batch.labels, z0, **self.params)
        loss = losses.sum() / normaliser
        desirable = stats["is_desirable"]
        rewards = stats["rewards"]
        rows = float(len(batch.labels))
        # Keys ending in /__num and /__den are summed over the step, then divided by the loop.
        out = {"loss": float(loss.detach()),
               "kl_baseline/__num": (float(z0) if z0 is not None else 0.0) * rows, "kl_baseline/__den": rows,
               "rewards/chosen/__num": float((rewards * desirable).sum()),
               "rewards/chosen/__den": float(desirable.sum()),
               "rewards/rejected/__num": float((rewards * (1 - desirable)).sum()),
               "rewards/rejected/__den": float((1 - desirable).sum())}
        return loss, out
