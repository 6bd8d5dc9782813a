"""``reward_model``: outcome reward models (one scalar head, or several named heads) on the
offline loop.

Each head learns from its own data with its own loss from ``posttrain.losses.reward_model``:
pairs under Bradley-Terry (with an optional per-pair margin and reward centring), or scored
responses under regression. The rows of every head are mixed into one stream; a micro-batch
scores all its sequences in one forward (no vocabulary projection at all: the head reads the
final hidden state of each response's last token) and each row's loss uses its own head's output.
The loss is the weighted sum over rows divided by the step's row count. Metrics: loss, pair
accuracy and margin, reward mean and mean square (std = sqrt(mean_sq - mean^2)), accuracy per
category when pairs carry one, per head when there are several.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from posttrain.config.stages.reward import RewardHead, RewardModelStage
from posttrain.data.formats import read_rows, to_example
from posttrain.data.pairs import PairReport, render_pairs
from posttrain.data.render import fit_length, render_prompt_completion
from posttrain.data.reward_data import RewardBatch, RewardRow, collate_reward_rows, cut_at_last_target
from posttrain.data.shared_prompt import collate_shared_prompt
from posttrain.errors import Problem, UserError, problem
from posttrain.loops.offline import OfflineJob, ResolvedTrain, resolve_train, run_offline
from posttrain.losses.reward_model import RewardLoss, get_reward_loss
from posttrain.models.block_attention import use_block_attention
from posttrain.models.forward import head_weight
from posttrain.models.heads import RewardModel, save_reward_model
from posttrain.models.logprobs import token_logprobs
from posttrain.stages.common import StageContext, StageOutput, evaluate, stage_model, stage_tokenizer
from posttrain.stages.preference import PAIR_FORMATS, check_losses, expand_rankings


def _head_where(cfg: RewardModelStage, index: int) -> str:
    return f"heads.{index}" if cfg.heads is not None else ""


def _at(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


class RewardModelRunner:
    def check(self, cfg: RewardModelStage, where: str) -> list[Problem]:
        problems: list[Problem] = []
        for i, head in enumerate(cfg.head_specs):
            at = ".".join(p for p in (where, _head_where(cfg, i)) if p)
            found = check_losses([head.loss], f"{at}.loss", registry_get=get_reward_loss)
            problems += found
            if found:
                continue
            pairwise = get_reward_loss(head.loss.name).pairwise
            if head.use_margin and not pairwise:
                problems.append(problem(f"{at}.use_margin", "a margin needs a pairwise loss",
                                        "remove use_margin, or use loss: bradley_terry"))
            if head.lm_coefficient and not pairwise:
                problems.append(problem(f"{at}.lm_coefficient", "the regulariser reads pairs' chosen responses",
                                        "remove lm_coefficient, or use loss: bradley_terry"))
            if head.target is not None and pairwise:
                problems.append(problem(f"{at}.target", "a target score is read by regression heads only",
                                        "remove target, or use loss: regression"))
        return problems

    def prepare(self, ctx: StageContext) -> PreparedRewardModel:
        cfg: RewardModelStage = ctx.config
        problems = self.check(cfg, ctx.where)
        if problems:
            raise UserError(problems)
        tokenizer = stage_tokenizer(ctx)
        rows: list[RewardRow] = []
        reports: dict[str, dict[str, Any]] = {}
        categories: list[str] = []
        for h, head in enumerate(cfg.head_specs):
            where = _head_where(cfg, h)
            if get_reward_loss(head.loss.name).pairwise:
                found, reports[head.name] = _pair_rows(ctx, tokenizer, head, h, where, categories)
            else:
                found, reports[head.name] = _point_rows(ctx, tokenizer, head, h, where)
            rows += found
        resolved = resolve_train(cfg.train, len(rows), ctx.dist.world_size, ctx.seed)
        return PreparedRewardModel(tokenizer, rows, [h.name for h in cfg.head_specs], categories, reports, resolved)

    def describe(self, ctx: StageContext, prepared: PreparedRewardModel) -> dict[str, Any]:
        r = prepared.resolved
        tokens = sum(len(row) for row in prepared.rows) / len(prepared.rows)
        return {"heads": prepared.heads, "data": prepared.reports, **r.as_dict(),
                "tokens_per_step": round(tokens * r.rows_per_step),
                "estimated_tokens": round(tokens * r.rows_per_step * r.total_steps)}

    def run(self, ctx: StageContext, prepared: PreparedRewardModel) -> StageOutput:
        cfg: RewardModelStage = ctx.config
        model = RewardModel(stage_model(ctx, prepared.tokenizer), prepared.heads, init_seed=ctx.seed)
        objective = RewardObjective([HeadObjective(get_reward_loss(h.loss.name), h.loss.params(), h.weight,
                                                   h.use_margin, h.lm_coefficient) for h in cfg.head_specs],
                                    prepared.heads, prepared.categories, cfg.train.logits_chunk)
        pad = prepared.tokenizer.pad_token_id
        # Shared-prompt batches need the block attention, which wraps SDPA; eager or flash
        # attention models train on padded batches instead (same rewards, more tokens).
        shared = cfg.share_prompt and use_block_attention(model.backbone)
        collate = (lambda rows: collate_shared_prompt(rows, pad)) if shared else (
            lambda rows: collate_reward_rows(rows, pad))
        job = OfflineJob(name=ctx.name, model=model, rows=prepared.rows, lengths=[len(r) for r in prepared.rows],
                         collate=collate, units=lambda _row: 1.0, objective=objective, train=cfg.train,
                         resolved=prepared.resolved, out_dir=ctx.out_dir, dist=ctx.dist,
                         show_progress=ctx.show_progress)
        result = run_offline(job)
        model.eval()
        if ctx.dist.is_main:
            save_reward_model(model, prepared.tokenizer, ctx.out_dir)
        metrics = train_summary(result.final_metrics)
        metrics.update(evaluate(ctx, model, prepared.tokenizer))
        info = {"resolved": prepared.resolved.as_dict(), "data": prepared.reports, "heads": prepared.heads,
                "shared_prompt_batches": shared, "resumed_from": result.resumed_from}
        return StageOutput(metrics, result.alarms, info)


@dataclass
class PreparedRewardModel:
    tokenizer: PreTrainedTokenizerBase
    rows: list[RewardRow]
    heads: list[str]
    categories: list[str]
    reports: dict[str, dict[str, Any]]
    resolved: ResolvedTrain


def train_summary(final: dict[str, float]) -> dict[str, float]:
    """The last step's headline numbers, with the reward std recovered from its moments."""
    out = {f"train_{k}": v for k, v in final.items() if k in ("loss", "accuracy", "margin") or k.endswith("/accuracy")}
    for key, mean in final.items():
        if key.endswith("rewards/mean") and key + "_sq" in final:
            out[f"train_{key}"] = mean
            out[f"train_{key.removesuffix('mean')}std"] = math.sqrt(max(0.0, final[key + "_sq"] - mean * mean))
    return out


def _pair_rows(ctx: StageContext, tokenizer: PreTrainedTokenizerBase, head: RewardHead, h: int, where: str,
               categories: list[str]) -> tuple[list[RewardRow], dict[str, Any]]:
    cfg: RewardModelStage = ctx.config
    data = ctx.load_data(head.data, key=_at(where, "data"), expect=PAIR_FORMATS)
    pairs, report = render_pairs(
        tokenizer, expand_rankings(data.examples, cfg.rankings), max_length=cfg.train.max_length,
        max_prompt_length=cfg.max_prompt_length, on_overlong=cfg.train.on_overlong, on_bad_pair=cfg.on_bad_pair,
        max_dropped_share=cfg.max_dropped_share if cfg.on_bad_pair == "drop" else 0.0,
        where=".".join(p for p in (ctx.where, where) if p))
    rows = []
    for pair in pairs:
        margin = math.nan
        if head.use_margin:
            if not isinstance(pair.extra.get("margin"), int | float):
                raise UserError(problem(f"{pair.source} field 'margin'", "missing or not a number (use_margin is on)",
                                        "give every pair a numeric margin, or turn use_margin off"))
            margin = float(pair.extra["margin"])
        category = pair.extra.get(cfg.category_field)
        index = -1
        if category is not None:
            if str(category) not in categories:
                categories.append(str(category))
            index = categories.index(str(category))
        sequences = (cut_at_last_target(pair.chosen), cut_at_last_target(pair.rejected))
        rows.append(RewardRow(h, sequences, margin, index, pair.source))
    return rows, {"load": data.report.__dict__, "pairs": report.as_dict()}


def _point_rows(ctx: StageContext, tokenizer: PreTrainedTokenizerBase, head: RewardHead, h: int,
                where: str) -> tuple[list[RewardRow], dict[str, Any]]:
    """Scored responses for a regression head: (prompt, completion, <target>) rows."""
    cfg: RewardModelStage = ctx.config
    field = head.target or head.name
    raw, _ = read_rows(head.data, where=".".join(p for p in (ctx.where, _at(where, "data")) if p),
                       base_dir=ctx.recipe.base_dir, artifacts=ctx.parents)
    rows, report = [], PairReport(pairs=len(raw))
    for row, source in raw:
        try:
            example = to_example(row, "prompt_completion", source)
            target = float(row[field]) if isinstance(row.get(field), int | float) else None
            if target is None:
                raise UserError(problem(f"{source} field {field!r}", "missing or not a number",
                                        f"give every row a numeric {field!r}, or set the head's target"))
        except UserError as err:
            if head.data.on_bad_row == "error":
                raise
            report.drop(err.problems[0].message.split(":")[0], source)
            continue
        rendered = fit_length(render_prompt_completion(tokenizer, example.prompt, example.completion, "assistant",
                                                       source), cfg.train.max_length, cfg.train.on_overlong)
        if rendered is None or not rendered.n_targets:
            report.drop(f"longer than max_length {cfg.train.max_length}", source)
            continue
        report.truncated += int(rendered.truncated)
        rows.append(RewardRow(h, (cut_at_last_target(rendered),), target, -1, source))
    if not rows:
        raise UserError(problem(f"{ctx.where}.{_at(where, 'data')}", "no usable scored rows", "check the data"))
    return rows, {"rows": len(raw), "kept": len(rows), "truncated": report.truncated, "dropped": dict(report.dropped),
                  "dropped_examples": dict(report.examples)}


@dataclass(frozen=True)
class HeadObjective:
    """What one head is trained with (from its config)."""

    loss: RewardLoss
    params: dict[str, object]
    weight: float = 1.0
    use_margin: bool = False
    lm_coefficient: float = 0.0  # weight of the chosen responses' next-token NLL (GRM regulariser)


class RewardObjective:
    """The micro-batch objective: every sequence scored in one forward, then each head's loss on
    its own rows. Stats are sums over the global batch (``__num``/``__den`` pairs for means over
    a subset of rows: pairs, a head, a category).

    ``lm_coefficient`` > 0 adds, per pair, that weight times the mean next-token NLL of its
    chosen response, computed from the same forward's hidden states (the text-generation
    regulariser of Yang et al. 2024, "Regularizing hidden states enables learning generalizable
    reward models" (GRM), their SFT variant): it keeps the backbone's language features, which
    the pairwise loss alone can wash out, and speeds up learning where the reward needs them."""

    def __init__(self, heads: list[HeadObjective], names: list[str], categories: list[str], chunk: int = 1024
                 ) -> None:
        self.heads, self.names, self.categories, self.chunk = heads, names, categories, chunk

    def _key(self, h: int, name: str) -> str:
        return name if len(self.names) == 1 else f"{self.names[h]}/{name}"

    def __call__(self, model: torch.nn.Module, batch: RewardBatch, normaliser: float
                 ) -> tuple[torch.Tensor, dict[str, float]]:
        hidden = model.hidden(batch.input_ids, batch.position_ids, batch.blocks)
        scores = model.score(hidden[batch.read_rows, batch.read_cols]).float()
        nll = self._chosen_nll(model, hidden, batch) if any(h.lm_coefficient for h in self.heads) else None
        total = scores.new_zeros(())
        stats: dict[str, float] = {}
        for h, head in enumerate(self.heads):
            if head.loss.pairwise:
                chosen_of = batch.pair_head == h
                if not bool(chosen_of.any()):
                    continue
                chosen = scores[batch.pair_chosen[chosen_of], h]
                rejected = scores[batch.pair_rejected[chosen_of], h]
                margin = batch.pair_margin[chosen_of] if head.use_margin else None
                losses, part = head.loss(chosen, rejected, margin, **head.params)
                self._pair_stats(stats, h, part, batch.pair_category[chosen_of])
                if head.lm_coefficient and nll is not None:
                    losses = losses + head.lm_coefficient * nll[chosen_of]
                    _ratio(stats, self._key(h, "chosen_nll"), nll[chosen_of].detach())
                rewards = torch.cat([chosen, rejected]).detach()
            else:
                mine = batch.point_head == h
                if not bool(mine.any()):
                    continue
                predicted = scores[batch.point_index[mine], h]
                losses, part = head.loss(predicted, batch.point_target[mine], **head.params)
                _ratio(stats, self._key(h, "abs_error"), part["abs_error"])
                rewards = predicted.detach()
            total = total + head.weight * losses.sum()
            _ratio(stats, self._key(h, "loss"), losses.detach())
            _ratio(stats, self._key(h, "rewards/mean"), rewards)
            _ratio(stats, self._key(h, "rewards/mean_sq"), rewards * rewards)
        loss_value = total / normaliser
        stats["loss"] = float(loss_value.detach())
        if len(self.names) == 1:  # one head: its mean loss is the loss
            del stats["loss/__num"], stats["loss/__den"]
        return loss_value, stats

    def _chosen_nll(self, model: torch.nn.Module, hidden: torch.Tensor, batch: RewardBatch) -> torch.Tensor:
        """Each pair's mean next-token NLL over its chosen response [P] (chunked projection)."""
        logp = token_logprobs(hidden[batch.lm_rows, batch.lm_cols], head_weight(model.backbone), batch.lm_targets,
                              chunk=self.chunk)
        pairs = batch.pair_head.shape[0]
        total = torch.zeros(pairs, dtype=logp.dtype, device=logp.device).index_add(0, batch.lm_pair, -logp)
        count = torch.zeros(pairs, dtype=logp.dtype, device=logp.device).index_add(
            0, batch.lm_pair, torch.ones_like(logp))
        return total / count.clamp(min=1.0)

    def _pair_stats(self, stats: dict[str, float], h: int, part: dict[str, torch.Tensor],
                    category: torch.Tensor) -> None:
        _ratio(stats, "accuracy", part["accuracy"])
        _ratio(stats, "margin", part["margin"])
        if len(self.names) > 1:
            _ratio(stats, self._key(h, "accuracy"), part["accuracy"])
        _ratio(stats, self._key(h, "rewards/chosen"), part["chosen_rewards"])
        _ratio(stats, self._key(h, "rewards/rejected"), part["rejected_rewards"])
        for c, name in enumerate(self.categories):
            of = category == c
            if bool(of.any()):
                _ratio(stats, f"accuracy/{name}", part["accuracy"][of])


def _ratio(stats: dict[str, float], key: str, values: torch.Tensor) -> None:
    """Add a subset mean's numerator and denominator (summed over micro-batches and processes)."""
    stats[f"{key}/__num"] = stats.get(f"{key}/__num", 0.0) + float(values.double().sum())
    stats[f"{key}/__den"] = stats.get(f"{key}/__den", 0.0) + float(values.numel())
