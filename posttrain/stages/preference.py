"""``preference``: the DPO family on the offline loop.

One forward per micro-batch scores the chosen and rejected sequences together; reference
log-probabilities come from the on-disk cache filled before training (none for reference-free
losses); the named losses of ``posttrain.losses.preference`` are combined with their weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from posttrain.config.stages.preference import LossSpec, PreferenceStage
from posttrain.data.formats import LoadReport
from posttrain.data.pairs import (
    PairReport,
    SequenceBatch,
    TokenizedPair,
    collate_pairs,
    pairs_from_ranking,
    render_pairs,
)
from posttrain.errors import Problem, UserError, problem
from posttrain.loops.offline import OfflineJob, ResolvedTrain, resolve_train, run_offline
from posttrain.losses.preference import PreferenceLogps, combine_losses, get_preference_loss
from posttrain.models.forward import sequence_logprobs
from posttrain.monitoring.diagnostics import LengthBiasAlarm, MarginCollapseAlarm
from posttrain.stages.common import (
    StageContext,
    StageOutput,
    contamination_guard,
    finish_model_stage,
    stage_model,
    stage_tokenizer,
)
from posttrain.stages.reference import cached_reference_logprobs
from posttrain.types import PreferencePair, RankedExample

PAIR_FORMATS = ("preference", "ranked")


def check_losses(specs: list[LossSpec], where: str, registry_get=get_preference_loss) -> list[Problem]:
    """Unknown loss names and parameters a loss does not take, all at once."""
    problems: list[Problem] = []
    for i, spec in enumerate(specs):
        at = f"{where}.{i}" if len(specs) > 1 else where
        try:
            loss = registry_get(spec.name, f"{at}.name")
        except UserError as err:
            problems.extend(err.problems)
            continue
        valid = loss.params
        for key in spec.params():
            if key not in valid:
                problems.append(problem(f"{at}.{key}", f"loss {loss.name!r} has no parameter {key!r}",
                                        "its parameters: " + (", ".join(valid) or "none")))
    return problems


@dataclass
class PreparedPreference:
    tokenizer: PreTrainedTokenizerBase
    pairs: list[TokenizedPair]
    load: LoadReport
    report: PairReport
    resolved: ResolvedTrain
    specs: list[tuple[str, float, dict[str, object]]]
    needs_reference: bool
    contamination: dict[str, Any]


def expand_rankings(examples: list[Any], mode: str) -> list[PreferencePair]:
    pairs: list[PreferencePair] = []
    for e in examples:
        if isinstance(e, RankedExample):
            pairs += pairs_from_ranking(e.prompt, e.responses, e.scores, mode=mode, source=e.source)
        else:
            pairs.append(e)
    return pairs


class PreferenceRunner:
    def check(self, cfg: PreferenceStage, where: str) -> list[Problem]:
        return check_losses(cfg.losses, f"{where}.loss")

    def prepare(self, ctx: StageContext) -> PreparedPreference:
        cfg: PreferenceStage = ctx.config
        problems = self.check(cfg, ctx.where)
        if problems:
            raise UserError(problems)
        tokenizer = stage_tokenizer(ctx)
        data = ctx.load_data(cfg.data, expect=PAIR_FORMATS)
        examples, contamination = contamination_guard(ctx, data.examples)
        pairs, report = render_pairs(
            tokenizer, expand_rankings(examples, cfg.rankings), max_length=cfg.train.max_length,
            max_prompt_length=cfg.max_prompt_length, on_overlong=cfg.train.on_overlong,
            on_bad_pair=cfg.on_bad_pair, max_dropped_share=cfg.max_dropped_share if cfg.on_bad_pair == "drop" else 0.0,
            where=ctx.where)
        specs = [(s.name, s.weight, s.params()) for s in cfg.losses]
        needs_reference = any(get_preference_loss(s.name).needs_reference for s in cfg.losses)
        resolved = resolve_train(cfg.train, len(pairs), ctx.dist.world_size, ctx.seed)
        return PreparedPreference(tokenizer, pairs, data.report, report, resolved, specs, needs_reference,
                                  contamination)

    def describe(self, ctx: StageContext, prepared: PreparedPreference) -> dict[str, Any]:
        tokens = sum(len(p) for p in prepared.pairs) / len(prepared.pairs)
        r = prepared.resolved
        return {"data": prepared.report.as_dict(), **r.as_dict(), "reference": prepared.needs_reference,
                "tokens_per_step": round(tokens * r.rows_per_step),
                "estimated_tokens": round(tokens * r.rows_per_step * r.total_steps)}

    def run(self, ctx: StageContext, prepared: PreparedPreference) -> StageOutput:
        cfg: PreferenceStage = ctx.config
        model = stage_model(ctx, prepared.tokenizer)
        model.to(ctx.dist.device)
        reference, cache_hit = None, None
        if prepared.needs_reference:
            sequences = [s for p in prepared.pairs for s in (p.chosen, p.rejected)]
            reference, cache_hit = cached_reference_logprobs(
                ctx, model, prepared.tokenizer, sequences, batch_size=cfg.reference.batch_size,
                chunk=cfg.train.logits_chunk)
        pad = prepared.tokenizer.pad_token_id
        job = OfflineJob(
            name=ctx.name, model=model, rows=prepared.pairs, lengths=[len(p) for p in prepared.pairs],
            collate=lambda rows: collate_pairs(rows, pad), units=lambda _pair: 1.0,
            objective=preference_objective(prepared.specs, reference, cfg.train.logits_chunk),
            train=cfg.train, resolved=prepared.resolved, out_dir=ctx.out_dir, dist=ctx.dist,
            diagnostics=[MarginCollapseAlarm(cfg.alarms.window, cfg.alarms.margin_collapse_nats),
                         LengthBiasAlarm(cfg.alarms.window, cfg.alarms.length_bias_correlation)],
            show_progress=ctx.show_progress,
        )
        result = run_offline(job)
        model.eval()
        metrics = {f"train_{k}": v for k, v in result.final_metrics.items()
                   if k in ("loss", "rewards/margin", "rewards/accuracy")}
        metrics.update(finish_model_stage(ctx, model, prepared.tokenizer))
        info = {"resolved": prepared.resolved.as_dict(), "pairs": prepared.report.as_dict(),
                "reference_cache": None if cache_hit is None else ("hit" if cache_hit else "computed"),
                "resumed_from": result.resumed_from}
        return StageOutput(metrics, result.alarms, info)


def preference_objective(specs: list[tuple[str, float, dict[str, object]]], reference: torch.Tensor | None,
                         chunk: int):
    """The micro-batch objective: sequence logps of chosen and rejected in one forward, then the
    combined losses; stats are per-pair means over the global batch (and raw moments for the
    length-bias alarm)."""

    def objective(model: torch.nn.Module, batch: SequenceBatch, normaliser: float):
        sums, counts = sequence_logprobs(model, batch.input_ids, batch.position_ids, batch.target_mask, chunk=chunk)
        pairs = sums.shape[0] // 2
        lengths = counts.float()
        ref_c = ref_r = None
        if reference is not None:
            ref = reference.to(sums.device)[batch.index]
            ref_c, ref_r = ref[:pairs], ref[pairs:]
        logps = PreferenceLogps(sums[:pairs], sums[pairs:], lengths[:pairs], lengths[pairs:], ref_c, ref_r)
        losses, stats = combine_losses(logps, specs)
        loss = losses.sum() / normaliser
        out = {"loss": float(loss.detach())}
        out.update({key: float(value.float().sum()) / normaliser for key, value in stats.items()})
        out.update(_headline(stats, logps, normaliser))
        return loss, out

    return objective


def _headline(stats: dict[str, torch.Tensor], logps: PreferenceLogps, normaliser: float) -> dict[str, float]:
    """Loss-independent metrics: logps, lengths, the first loss's rewards, length-bias moments."""
    first = next(iter(stats)).split("/")[0]
    chosen_lengths, rejected_lengths = logps.chosen_lengths, logps.rejected_lengths
    out = {
        "logps/chosen": float(logps.policy_chosen.detach().sum()) / normaliser,
        "logps/rejected": float(logps.policy_rejected.detach().sum()) / normaliser,
        "logps_per_token/chosen": float((logps.policy_chosen.detach() / chosen_lengths).sum()) / normaliser,
        "logps_per_token/rejected": float((logps.policy_rejected.detach() / rejected_lengths).sum()) / normaliser,
        "length/chosen": float(chosen_lengths.sum()) / normaliser,
        "length/rejected": float(rejected_lengths.sum()) / normaliser,
    }
    if logps.ref_chosen is not None:
        out["ref_logps/chosen"] = float(logps.ref_chosen.sum()) / normaliser
        out["ref_logps/rejected"] = float(logps.ref_rejected.sum()) / normaliser
    for name in ("chosen_rewards", "rejected_rewards", "margin", "accuracy"):
        if f"{first}/{name}" in stats:
            out[f"rewards/{name.removesuffix('_rewards')}"] = float(stats[f"{first}/{name}"].sum()) / normaliser
    margin = stats.get(f"{first}/margin")
    if margin is not None:
        x, y = (chosen_lengths - rejected_lengths).double(), margin.detach().double()
        out.update({"length_bias/sum_x": float(x.sum()), "length_bias/sum_y": float(y.sum()),
                    "length_bias/sum_xy": float((x * y).sum()), "length_bias/sum_xx": float((x * x).sum()),
                    "length_bias/sum_yy": float((y * y).sum()), "length_bias/sum_n": float(x.numel())})
    return out
