"""Data stages: ``generate`` (samples from a model), ``score`` (rewards), ``select`` (best-of-N,
top-K, or preference pairs). Each writes ``data.jsonl`` into its artifact folder; every row keeps
its provenance (source model artifact, stage, rewards, time) under ``provenance``."""

from __future__ import annotations

import json
import os
import random
import re
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.config.stages.data import FilterStage, GenerateStage, MixStage, ScoreStage, SelectStage
from posttrain.data.contamination import ScanSettings, normalize, row_from_dict, scan
from posttrain.data.formats import DATASET_FILE, read_rows
from posttrain.data.render import render_prompt
from posttrain.errors import UserError, problem
from posttrain.loops.state import crash_point
from posttrain.rewards.base import Scorer, combine
from posttrain.rollout.hf import HFSampler, SamplingParams
from posttrain.stages.common import StageContext, StageOutput, reward_scorers, stage_tokenizer, starting_model
from posttrain.types import RowSource


def write_rows(folder: Path, rows: list[dict[str, Any]]) -> None:
    """The stage's dataset, written to a temporary file, fsynced, then renamed into place."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (DATASET_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
    crash_point("data.before_rename")
    os.replace(tmp, folder / DATASET_FILE)


def _stamp(row: dict[str, Any], step: str, record: dict[str, Any]) -> dict[str, Any]:
    provenance = dict(row.get("provenance") or {})
    provenance[step] = {**record, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return {**row, "provenance": provenance}


def _rows(ctx: StageContext, key: str = "data") -> list[tuple[dict[str, Any], RowSource]]:
    rows, _ = read_rows(getattr(ctx.config, key), where=f"{ctx.where}.{key}", base_dir=ctx.recipe.base_dir,
                        artifacts=ctx.parents)
    return rows


def _need(row: dict[str, Any], source: RowSource, field: str) -> Any:
    if field not in row:
        raise UserError(problem(f"{source} field {field!r}", "missing", "this stage reads rows that have it"))
    return row[field]


# ------------------------------------------------------------------ generate


@dataclass
class PreparedGenerate:
    tokenizer: Any
    rows: list[tuple[dict[str, Any], RowSource]]
    prompts: list[list[int]]


class GenerateRunner:
    def prepare(self, ctx: StageContext) -> PreparedGenerate:
        tokenizer = stage_tokenizer(ctx)
        rows = _rows(ctx)
        prompts = [render_prompt(tokenizer, _need(r, src, "prompt"), src) for r, src in rows]
        return PreparedGenerate(tokenizer, rows, prompts)

    def describe(self, ctx: StageContext, prepared: PreparedGenerate) -> dict[str, Any]:
        n = ctx.config.sampling.n
        return {"prompts": len(prepared.rows), "completions": n * len(prepared.rows)}

    def run(self, ctx: StageContext, prepared: PreparedGenerate) -> StageOutput:
        cfg: GenerateStage = ctx.config
        s = cfg.sampling
        model = starting_model(ctx, prepared.tokenizer).to(ctx.dist.device)
        sampler = HFSampler(model, prepared.tokenizer, batch_size=s.batch_size, show_progress=ctx.show_progress)
        params = SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                max_new_tokens=s.max_new_tokens, stop=s.stop,
                                seed=s.seed if s.seed is not None else ctx.seed)
        rollouts = sampler.generate(prepared.prompts, params)
        source_model = ctx.parents[cfg.from_].name if cfg.from_ else "model:" + str(cfg.model.path or "tiny")
        out = []
        for r in rollouts:
            row, _ = prepared.rows[r.prompt_index]
            fresh = {**row, "completion": r.text, "group": r.prompt_index, "sample": r.sample_index,
                     "finish_reason": r.finish_reason, "completion_tokens": len(r.completion_ids)}
            out.append(_stamp(fresh, "generate", {"stage": ctx.name, "model": source_model,
                                                  "temperature": s.temperature, "seed": params.seed}))
        if ctx.dist.is_main:
            write_rows(ctx.out_dir, out)
        truncated = sum(r.truncated for r in rollouts) / len(rollouts)
        mean_tokens = sum(len(r.completion_ids) for r in rollouts) / len(rollouts)
        return StageOutput({"rows": float(len(out)), "truncated_share": truncated, "mean_tokens": mean_tokens})


# ------------------------------------------------------------------ score


@dataclass
class PreparedScore:
    rows: list[tuple[dict[str, Any], RowSource]]
    scorers: dict[str, Scorer]
    weights: dict[str, float]


class ScoreRunner:
    def prepare(self, ctx: StageContext) -> PreparedScore:
        cfg: ScoreStage = ctx.config
        scorers, weights = reward_scorers(ctx, cfg.rewards)
        return PreparedScore(_rows(ctx), scorers, weights)

    def describe(self, ctx: StageContext, prepared: PreparedScore) -> dict[str, Any]:
        return {"rewards": prepared.weights}

    def run(self, ctx: StageContext, prepared: PreparedScore) -> StageOutput:
        rows = prepared.rows
        completions = [str(_need(r, src, "completion")) for r, src in rows]
        plain = [r for r, _ in rows]
        per_reward = {name: scorer(completions, plain) for name, scorer in prepared.scorers.items()}
        combined = combine(per_reward, prepared.weights)
        out = []
        for i, ((row, _), (score, components)) in enumerate(zip(rows, combined)):
            meta = {name: per_reward[name][i].meta for name in per_reward}
            scored = {**row, "rewards": components, "score": score, "reward_meta": meta}
            out.append(_stamp(scored, "score", {"stage": ctx.name, "weights": prepared.weights}))
        if ctx.dist.is_main:
            write_rows(ctx.out_dir, out)
        valid = [s for s, _ in combined if s is not None]
        metrics = {"rows": float(len(out)), "masked_share": 1 - len(valid) / len(out),
                   "mean_score": sum(valid) / len(valid) if valid else float("nan")}
        for name, results in per_reward.items():
            scores = [r.score for r in results if r.score is not None]
            metrics[f"mean_{name}"] = sum(scores) / len(scores) if scores else float("nan")
        return StageOutput(metrics)


# ------------------------------------------------------------------ select


class SelectRunner:
    def prepare(self, ctx: StageContext) -> list[tuple[dict[str, Any], RowSource]]:
        return _rows(ctx)

    def describe(self, ctx: StageContext, prepared: list) -> dict[str, Any]:
        return {"mode": ctx.config.mode, "rows": len(prepared)}

    def run(self, ctx: StageContext, prepared: list[tuple[dict[str, Any], RowSource]]) -> StageOutput:
        cfg: SelectStage = ctx.config
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row, src in prepared:
            _need(row, src, "completion")
            if "score" not in row:
                raise UserError(problem(f"{src} field 'score'", "missing: select reads scored rows",
                                        "put a score stage before it (data: {stage: <score stage>})"))
            groups[str(row.get("group", json.dumps(row.get("prompt"), sort_keys=True)))].append(row)
        counts: dict[str, int] = defaultdict(int)
        out = []
        for rows in groups.values():
            scored = sorted((r for r in rows if r["score"] is not None), key=lambda r: -r["score"])
            counts["masked"] += len(rows) - len(scored)
            picked = _pairs(scored, cfg, counts) if cfg.mode == "pairs" else _best(scored, cfg, counts)
            out += [_stamp(r, "select", {"stage": ctx.name, "mode": cfg.mode}) for r in picked]
        if not out:
            raise UserError(problem(ctx.where, f"selection kept nothing ({dict(counts)})",
                                    "lower min_score / min_margin, or sample more completions"))
        if ctx.dist.is_main:
            write_rows(ctx.out_dir, out)
        return StageOutput({"rows": float(len(out)), "prompts": float(len(groups))},
                           info={"dropped": dict(counts)})


def _best(scored: list[dict[str, Any]], cfg: SelectStage, counts: dict[str, int]) -> list[dict[str, Any]]:
    k = cfg.k if cfg.mode == "top_k" else 1
    kept = [r for r in scored if cfg.min_score is None or r["score"] >= cfg.min_score][:k]
    counts["below_min_score"] += min(k, len(scored)) - len(kept)
    return [{**_base(r), "completion": r["completion"], "score": r["score"]} for r in kept]


def _base(row: dict[str, Any]) -> dict[str, Any]:
    keep = ("prompt", "answer", "group", "provenance")
    return {k: row[k] for k in keep if k in row}


def _pairs(scored: list[dict[str, Any]], cfg: SelectStage, counts: dict[str, int]) -> list[dict[str, Any]]:
    """Pairs within one prompt's completions (sorted best first); ``min_score`` bounds the chosen."""
    if len(scored) < 2:
        counts["fewer_than_two"] += 1
        return []
    candidates = ([(scored[0], scored[-1])] if cfg.pairs == "best_vs_worst" else
                  [(scored[i], scored[j]) for i in range(len(scored)) for j in range(i + 1, len(scored))])
    out = []
    for chosen, rejected in candidates:
        margin = chosen["score"] - rejected["score"]
        if margin <= cfg.min_margin:
            counts["tie_or_small_margin"] += 1
        elif cfg.min_score is not None and chosen["score"] < cfg.min_score:
            counts["chosen_below_min_score"] += 1
        elif cfg.drop_truncated_chosen and chosen.get("finish_reason") == "length":
            counts["chosen_truncated"] += 1
        elif len(chosen["completion"]) < cfg.min_length_ratio * len(rejected["completion"]):
            counts["chosen_much_shorter"] += 1
        else:
            out.append({**_base(chosen), "chosen": chosen["completion"], "rejected": rejected["completion"],
                        "margin": margin, "chosen_score": chosen["score"], "rejected_score": rejected["score"]})
    return out


# ------------------------------------------------------------------ filter


class FilterRunner:
    def prepare(self, ctx: StageContext) -> list[tuple[dict[str, Any], RowSource]]:
        return _rows(ctx)

    def describe(self, ctx: StageContext, prepared: list) -> dict[str, Any]:
        return {"rows": len(prepared), "dedup": ctx.config.dedup}

    def run(self, ctx: StageContext, prepared: list[tuple[dict[str, Any], RowSource]]) -> StageOutput:
        cfg: FilterStage = ctx.config
        texts = [row_from_dict(row, src) for row, src in prepared]
        reasons = [_row_reason(cfg, t.text) for t in texts]
        _mark_duplicates(cfg, texts, reasons)
        kept = [_stamp(row, "filter", {"stage": ctx.name}) for (row, _), r in zip(prepared, reasons) if r is None]
        counts: dict[str, int] = defaultdict(int)
        for r in reasons:
            if r is not None:
                counts[r] += 1
        if not kept:
            raise UserError(problem(ctx.where, f"the filter dropped every row ({dict(counts)})", "loosen it"))
        if ctx.dist.is_main:
            write_rows(ctx.out_dir, kept)
        return StageOutput({"rows": float(len(kept)), "dropped": float(len(prepared) - len(kept))},
                           info={"dropped": dict(counts)})


def _row_reason(cfg: FilterStage, text: str) -> str | None:
    if cfg.min_chars is not None and len(text) < cfg.min_chars:
        return "too_short"
    if cfg.max_chars is not None and len(text) > cfg.max_chars:
        return "too_long"
    if cfg.keep_regex is not None and not re.search(cfg.keep_regex, text):
        return "keep_regex_missed"
    if cfg.drop_regex is not None and re.search(cfg.drop_regex, text):
        return "drop_regex_matched"
    return None


def _mark_duplicates(cfg: FilterStage, texts: list, reasons: list[str | None]) -> None:
    """The first of each group of duplicates is kept; later copies are marked."""
    if cfg.dedup == "none":
        return
    seen: set[str] = set()
    for i, t in enumerate(texts):
        key = " ".join(normalize(t.text))
        if key in seen and reasons[i] is None:
            reasons[i] = "exact_duplicate"
        seen.add(key)
    if cfg.dedup == "near":
        position = {t.source: i for i, t in enumerate(texts)}
        # Near duplicates of the prompts; n-gram overlap is disabled (huge n).
        settings = ScanSettings(ngram=10**6, near_threshold=cfg.near_threshold, min_tokens=10**6)
        for overlap in scan(texts, {"self": texts}, settings).overlaps:
            later, earlier = position[overlap.train], position[overlap.eval]
            if earlier < later and reasons[later] is None and reasons[earlier] is None:
                reasons[later] = "near_duplicate"


# ------------------------------------------------------------------ mix


class MixRunner:
    def prepare(self, ctx: StageContext) -> list[list[tuple[dict[str, Any], RowSource]]]:
        cfg: MixStage = ctx.config
        return [read_rows(s.data, where=f"{ctx.where}.sources.{i}.data", base_dir=ctx.recipe.base_dir,
                          artifacts=ctx.parents)[0] for i, s in enumerate(cfg.sources)]

    def describe(self, ctx: StageContext, prepared: list) -> dict[str, Any]:
        return {"source_rows": [len(p) for p in prepared], "size": ctx.config.size}

    def run(self, ctx: StageContext, prepared: list[list[tuple[dict[str, Any], RowSource]]]) -> StageOutput:
        cfg: MixStage = ctx.config
        size = cfg.size or sum(len(p) for p in prepared)
        total = sum(s.weight for s in cfg.sources)
        counts = [round(size * s.weight / total) for s in cfg.sources]
        counts[0] += size - sum(counts)  # rounding goes to the first source
        rng = random.Random(cfg.seed if cfg.seed is not None else ctx.seed)
        out, repeated = [], {}
        for i, (rows, n) in enumerate(zip(prepared, counts)):
            order = list(range(len(rows)))
            rng.shuffle(order)
            picks = [order[j % len(order)] for j in range(n)]
            repeated[i] = max(0, n - len(rows))
            out += [_stamp(rows[j][0], "mix", {"stage": ctx.name, "source": i, "from": str(rows[j][1])}) for j in picks]
        rng.shuffle(out)
        if ctx.dist.is_main:
            write_rows(ctx.out_dir, out)
        return StageOutput({"rows": float(len(out))}, info={"per_source": counts, "repeated_rows": repeated})
