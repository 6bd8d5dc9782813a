"""``sft``: supervised fine-tuning with completion-only / assistant-only masking and packing.

``pretrain`` (posttrain/stages/pretrain.py) is the same stage on raw text with every token a target.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from posttrain.config.components import TrainConfig
from posttrain.data.batching import TOKEN_MEAN, MicroBatch, Row, collate, make_rows, row_units
from posttrain.data.formats import LoadReport
from posttrain.data.render import RenderReport, render_dataset
from posttrain.loops.distributed import DistInfo
from posttrain.loops.offline import OfflineJob, ResolvedTrain, resolve_train, run_offline
from posttrain.losses.sft import sft_loss
from posttrain.models.forward import head_weight, hidden_states
from posttrain.stages.common import (
    StageContext,
    StageOutput,
    contamination_guard,
    finish_model_stage,
    stage_model,
    stage_tokenizer,
)

SFT_FORMATS = ("messages", "prompt_completion", "kto")
TEXT_FORMATS = ("text",)


@dataclass
class PreparedLM:
    tokenizer: PreTrainedTokenizerBase
    rows: list[Row]
    load: LoadReport
    render: RenderReport
    resolved: ResolvedTrain
    aggregation: str
    contamination: dict[str, Any]


def lm_objective(chunk: int):
    """Next-token NLL on a micro-batch (see ``posttrain.losses.sft.sft_loss``)."""

    def objective(model: torch.nn.Module, batch: MicroBatch, normaliser: float):
        hidden = hidden_states(model, batch.input_ids, batch.position_ids)
        return sft_loss(hidden, head_weight(model), batch.input_ids, batch.target_weights, normaliser, chunk=chunk)

    return objective


def lm_job(name: str, model: torch.nn.Module, rows: list[Row], pad_id: int, aggregation: str, train: TrainConfig,
           resolved: ResolvedTrain, out_dir: Path, dist: DistInfo, show_progress: bool = True) -> OfflineJob:
    """The offline-loop job for next-token training on ``rows``."""
    return OfflineJob(
        name=name, model=model, rows=rows, lengths=[len(r) for r in rows],
        collate=lambda batch_rows: collate(batch_rows, pad_id, aggregation),
        units=lambda row: row_units(row, aggregation), objective=lm_objective(train.logits_chunk),
        train=train, resolved=resolved, out_dir=out_dir, dist=dist, show_progress=show_progress,
    )


class TokenLMStage:
    """Next-token training on rendered rows; ``loss_on`` picks which tokens are targets."""

    def __init__(self, formats: tuple[str, ...], loss_on: str | None = None) -> None:
        self.formats, self.fixed_loss_on = formats, loss_on

    def prepare(self, ctx: StageContext) -> PreparedLM:
        cfg, train = ctx.config, ctx.config.train
        tokenizer = stage_tokenizer(ctx)
        data = ctx.load_data(cfg.data, expect=self.formats)
        examples, contamination = contamination_guard(ctx, data.examples)
        loss_on = self.fixed_loss_on or cfg.loss_on
        rendered, report = render_dataset(tokenizer, examples, loss_on=loss_on, max_length=train.max_length,
                                          on_overlong=train.on_overlong,
                                          max_truncated_share=train.max_truncated_share, where=f"{ctx.where}.train")
        rows = make_rows(rendered, packing=train.packing, max_length=train.max_length)
        resolved = resolve_train(train, len(rows), ctx.dist.world_size, ctx.seed)
        aggregation = getattr(cfg, "loss_aggregation", TOKEN_MEAN)
        return PreparedLM(tokenizer, rows, data.report, report, resolved, aggregation, contamination)

    def describe(self, ctx: StageContext, prepared: PreparedLM) -> dict[str, Any]:
        r, render = prepared.resolved, prepared.render
        tokens_per_row = render.tokens / max(1, len(prepared.rows))
        return {
            "data": {**prepared.load.__dict__, **render.as_dict()},
            "rows (packed)" if ctx.config.train.packing else "rows": len(prepared.rows),
            **r.as_dict(),
            "examples_per_step": round(render.rows / max(1, len(prepared.rows)) * r.rows_per_step, 1),
            "tokens_per_step": round(tokens_per_row * r.rows_per_step),
            "targets_per_step": round(render.targets / max(1, len(prepared.rows)) * r.rows_per_step),
            "estimated_tokens": round(tokens_per_row * r.rows_per_step * r.total_steps),
        }

    def run(self, ctx: StageContext, prepared: PreparedLM) -> StageOutput:
        model = stage_model(ctx, prepared.tokenizer)
        job = lm_job(ctx.name, model, prepared.rows, prepared.tokenizer.pad_token_id, prepared.aggregation,
                     ctx.config.train, prepared.resolved, ctx.out_dir, ctx.dist, ctx.show_progress)
        result = run_offline(job)
        model.eval()
        metrics = {"train_loss": result.final_metrics.get("loss", float("nan")),
                   "train_seconds": result.seconds, "train_tokens": float(result.tokens)}
        metrics.update(finish_model_stage(ctx, model, prepared.tokenizer))
        info = {"resolved": prepared.resolved.as_dict(), "render": prepared.render.as_dict(),
                "resumed_from": result.resumed_from}
        return StageOutput(metrics, result.alarms, info)
