"""``prm``: a process reward model on the offline loop, and ``prm_labels``: step labels induced
from outcomes (Math-Shepherd, Wang et al. 2024).

``prm``: each solution is rendered with ``render_steps`` (the one function training, label
induction and scoring share), the head reads the last token of every step, and the loss
(``posttrain.losses.prm``) is computed at those positions only, normalised by the step's count of
labelled steps over the global batch. Metrics: loss, step accuracy, mean predicted probability,
mean label.

``prm_labels``: for every solution and every step but the last, the model samples ``n``
continuations of the prompt + the steps so far; the verifier judges prefix + continuation. A
soft label is the share judged correct, a hard one whether any is. The last step's label is the
verifier's verdict on the solution itself (no sampling needed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from posttrain.config.stages.reward import PRMLabelStage, PRMStage
from posttrain.data.formats import read_rows
from posttrain.data.pairs import PairReport
from posttrain.data.reward_data import StepBatch, StepRow, collate_step_rows, render_steps, split_steps
from posttrain.errors import Problem, UserError, problem
from posttrain.loops.offline import Objective, OfflineJob, ResolvedTrain, resolve_train, run_offline
from posttrain.losses.prm import prm_step_loss
from posttrain.models.forward import head_weight
from posttrain.models.heads import RewardModel, save_reward_model
from posttrain.models.logprobs import token_logprobs
from posttrain.rewards.verifiers import get_verifier
from posttrain.rollout.hf import HFSampler, SamplingParams
from posttrain.stages.common import (
    StageContext,
    StageOutput,
    evaluate,
    stage_model,
    stage_tokenizer,
    starting_model,
)
from posttrain.stages.data import write_rows
from posttrain.types import RowSource, Text


def row_steps(row: dict[str, Any], source: RowSource, separator: str) -> tuple[Text, list[str]]:
    """A row's prompt and steps (``steps`` as a list, or ``completion`` split at the separator)."""
    if "prompt" not in row:
        raise UserError(problem(f"{source} field 'prompt'", "missing", "add the prompt"))
    steps = row.get("steps")
    if steps is None:
        completion = row.get("completion")
        if not isinstance(completion, str):
            raise UserError(problem(f"{source} field 'completion'", "missing: rows need steps or a completion",
                                    "add steps: [...] or completion: '...'"))
        steps = split_steps(completion, separator)
    if not isinstance(steps, list) or not steps or not all(isinstance(s, str) and s.strip() for s in steps):
        raise UserError(problem(f"{source} field 'steps'", "must be a non-empty list of non-empty strings",
                                "fix the row, or check the separator"))
    return row["prompt"], steps


def _labels(row: dict[str, Any], source: RowSource, count: int) -> list[float]:
    labels = row.get("labels")
    if not isinstance(labels, list) or len(labels) != count:
        raise UserError(problem(f"{source} field 'labels'", f"needs one label per step ({count} steps)",
                                "give a label per step, or fix the separator"))
    try:
        values = [float(x) for x in labels]
    except (TypeError, ValueError) as err:
        raise UserError(problem(f"{source} field 'labels'", "labels must be numbers or booleans",
                                "write 0/1, true/false or a probability")) from err
    if any(not 0.0 <= v <= 1.0 for v in values):
        raise UserError(problem(f"{source} field 'labels'", "labels must lie in [0, 1]", "fix the labels"))
    return values


@dataclass
class PreparedPRM:
    tokenizer: PreTrainedTokenizerBase
    rows: list[StepRow]
    report: PairReport
    resolved: ResolvedTrain


class PRMRunner:
    def prepare(self, ctx: StageContext) -> PreparedPRM:
        cfg: PRMStage = ctx.config
        tokenizer = stage_tokenizer(ctx)
        raw, _ = read_rows(cfg.data, where=f"{ctx.where}.data", base_dir=ctx.recipe.base_dir, artifacts=ctx.parents)
        rows, report = [], PairReport(pairs=len(raw))
        for row, source in raw:
            try:
                prompt, steps = row_steps(row, source, cfg.separator)
                labels = _labels(row, source, len(steps))
                sequence, ends = render_steps(tokenizer, prompt, steps, cfg.separator, source)
            except UserError as err:
                if cfg.on_bad_row == "error":
                    raise
                report.drop(err.problems[0].message.split(":")[0], source)
                continue
            if len(sequence) > cfg.train.max_length:
                report.drop(f"longer than max_length {cfg.train.max_length}", source)
                continue
            rows.append(StepRow(sequence, ends, labels))
        if not rows:
            raise UserError(problem(f"{ctx.where}.data", f"no usable rows ({report.dropped})", "check the data"))
        report.kept = len(rows)
        resolved = resolve_train(cfg.train, len(rows), ctx.dist.world_size, ctx.seed)
        return PreparedPRM(tokenizer, rows, report, resolved)

    def describe(self, ctx: StageContext, prepared: PreparedPRM) -> dict[str, Any]:
        steps = sum(len(r.step_ends) for r in prepared.rows)
        return {"data": prepared.report.as_dict(), "steps": steps, **prepared.resolved.as_dict()}

    def run(self, ctx: StageContext, prepared: PreparedPRM) -> StageOutput:
        cfg: PRMStage = ctx.config
        model = RewardModel(stage_model(ctx, prepared.tokenizer), ("step",), kind="prm",
                            meta={"separator": cfg.separator}, init_seed=ctx.seed)
        pad = prepared.tokenizer.pad_token_id
        job = OfflineJob(name=ctx.name, model=model, rows=prepared.rows, lengths=[len(r) for r in prepared.rows],
                         collate=lambda rows: collate_step_rows(rows, pad), units=lambda row: float(len(row.step_ends)),
                         objective=prm_objective(cfg.lm_coefficient, cfg.train.logits_chunk), train=cfg.train, resolved=prepared.resolved, out_dir=ctx.out_dir,
                         dist=ctx.dist, show_progress=ctx.show_progress)
        result = run_offline(job)
        model.eval()
        if ctx.dist.is_main:
            save_reward_model(model, prepared.tokenizer, ctx.out_dir)
        metrics = {f"train_{k}": v for k, v in result.final_metrics.items() if k in ("loss", "step_accuracy")}
        metrics.update(evaluate(ctx, model, prepared.tokenizer))
        info = {"resolved": prepared.resolved.as_dict(), "data": prepared.report.as_dict(),
                "resumed_from": result.resumed_from}
        return StageOutput(metrics, result.alarms, info)


def prm_objective(lm_coefficient: float = 0.0, chunk: int = 1024) -> Objective:
    """Step-level BCE at step positions only, divided by the global count of labelled steps.

    ``lm_coefficient`` > 0 adds that weight times each verified solution's mean next-token NLL
    (every step labelled >= 0.5): the reward model's GRM regulariser (Yang et al. 2024) applied
    to solutions the labels call right, so the backbone keeps (and sharpens) the arithmetic the
    step checks rely on."""

    def objective(model: torch.nn.Module, batch: StepBatch, normaliser: float) -> tuple[torch.Tensor, dict[str, float]]:
        hidden = model.hidden(batch.input_ids, batch.position_ids)
        logits = model.score(hidden[batch.step_rows, batch.step_cols]).float()[:, 0]
        losses, stats = prm_step_loss(logits, batch.labels)
        total = losses.sum()
        count = float(losses.numel())
        out = {"step_accuracy/__num": float(stats["accuracy"].sum()), "step_accuracy/__den": count,
               "probability/__num": float(stats["probability"].sum()), "probability/__den": count,
               "label/__num": float(stats["label"].sum()), "label/__den": count}
        if lm_coefficient and batch.lm_pair is not None and batch.lm_pair.numel():
            logp = token_logprobs(hidden[batch.lm_rows, batch.lm_cols], head_weight(model.backbone),
                                  batch.lm_targets, chunk=chunk)
            solutions = int(batch.lm_pair.max()) + 1
            nll = torch.zeros(solutions, dtype=logp.dtype).index_add(0, batch.lm_pair, -logp)
            tokens = torch.zeros(solutions, dtype=logp.dtype).index_add(0, batch.lm_pair, torch.ones_like(logp))
            mean_nll = nll / tokens
            total = total + lm_coefficient * mean_nll.sum()
            out.update({"verified_nll/__num": float(mean_nll.detach().sum()), "verified_nll/__den": float(solutions)})
        loss = total / normaliser
        return loss, {"loss": float(loss.detach()), **out}

    return objective


# ------------------------------------------------------------------ prm_labels


@dataclass
class PreparedLabels:
    tokenizer: PreTrainedTokenizerBase
    rows: list[tuple[dict[str, Any], RowSource, Text, list[str]]]
    prefixes: list[tuple[int, int, list[int]]]  # (row, step, prompt ids of prompt + steps[: step + 1])
    outcomes: list[bool]  # each solution's own verdict (its last step's label), checked before sampling


class PRMLabelRunner:
    def check(self, cfg: PRMLabelStage, where: str) -> list[Problem]:
        try:
            get_verifier(cfg.verifier)
        except UserError as err:
            return [problem(f"{where}.verifier", p.message, p.fix) for p in err.problems]
        return []

    def prepare(self, ctx: StageContext) -> PreparedLabels:
        cfg: PRMLabelStage = ctx.config
        problems = self.check(cfg, ctx.where)
        if problems:
            raise UserError(problems)
        tokenizer = stage_tokenizer(ctx)
        raw, _ = read_rows(cfg.data, where=f"{ctx.where}.data", base_dir=ctx.recipe.base_dir, artifacts=ctx.parents)
        rows, prefixes, outcomes = [], [], []
        verifier = get_verifier(cfg.verifier)
        for i, (row, source) in enumerate(raw):
            prompt, steps = row_steps(row, source, cfg.separator)
            rows.append((row, source, prompt, steps))
            try:  # a row the verifier cannot read fails here, before any sampling
                outcomes.append(_judged_correct(verifier(cfg.separator.join(steps), row)))
            except UserError as err:
                raise UserError([problem(f"{source} ({cfg.verifier} verifier)", p.message, p.fix)
                                 for p in err.problems]) from err
            for k in range(len(steps) - 1):
                ids, _ = render_steps(tokenizer, prompt, steps[: k + 1], cfg.separator, source, close=False)
                prefixes.append((i, k, ids.input_ids))
        return PreparedLabels(tokenizer, rows, prefixes, outcomes)

    def describe(self, ctx: StageContext, prepared: PreparedLabels) -> dict[str, Any]:
        n = ctx.config.sampling.n
        return {"solutions": len(prepared.rows), "prefixes": len(prepared.prefixes),
                "continuations": n * len(prepared.prefixes)}

    def run(self, ctx: StageContext, prepared: PreparedLabels) -> StageOutput:
        cfg: PRMLabelStage = ctx.config
        s, verifier = cfg.sampling, get_verifier(cfg.verifier)
        model = starting_model(ctx, prepared.tokenizer).to(ctx.dist.device)
        sampler = HFSampler(model, prepared.tokenizer, batch_size=s.batch_size, show_progress=ctx.show_progress)
        params = SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                max_new_tokens=s.max_new_tokens, stop=s.stop,
                                seed=s.seed if s.seed is not None else ctx.seed)
        rollouts = sampler.generate([ids for _, _, ids in prepared.prefixes], params)
        source_model = ctx.parents[cfg.from_].name if cfg.from_ else "model:" + str(cfg.model.path or "tiny")
        correct: dict[tuple[int, int], list[bool]] = {}
        for rollout in rollouts:
            i, k, _ = prepared.prefixes[rollout.prompt_index]
            row, _, _, steps = prepared.rows[i]
            text = cfg.separator.join(steps[: k + 1]) + rollout.text
            correct.setdefault((i, k), []).append(_judged_correct(verifier(text, row)))
        out = []
        for i, ((row, _, _, steps), outcome) in enumerate(zip(prepared.rows, prepared.outcomes)):
            shares = [sum(correct[(i, k)]) / len(correct[(i, k)]) for k in range(len(steps) - 1)]
            labels = [(1.0 if x > 0 else 0.0) if cfg.label == "hard" else x for x in shares] + [float(outcome)]
            provenance = {**(row.get("provenance") or {}), "prm_labels": {
                "stage": ctx.name, "model": source_model, "samples": s.n, "label": cfg.label, "verifier": cfg.verifier,
                "seed": params.seed, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}}
            out.append({**row, "steps": steps, "labels": labels, "completion_correct": outcome,
                        "provenance": provenance})
        if ctx.dist.is_main:
            write_rows(ctx.out_dir, out)
        labels = [x for r in out for x in r["labels"]]
        return StageOutput({"rows": float(len(out)), "mean_label": sum(labels) / len(labels),
                            "solutions_correct": sum(r["completion_correct"] for r in out) / len(out)})


def _judged_correct(result) -> bool:
    return result.score is not None and result.score >= 1.0
