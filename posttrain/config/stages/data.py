"""Data stages: their artifact is a dataset (``data.jsonl``), read by later stages with
``data: {stage: NAME}``. Every output row keeps its provenance."""

from __future__ import annotations

import re
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from posttrain.config.base import StrictModel
from posttrain.config.components import DataConfig, NamedSpec
from posttrain.config.stage_base import STAGE_KINDS, StageConfig


class SamplingConfig(StrictModel):
    """How completions are sampled (the hf engine; temperature semantics match the trainer's)."""

    n: int = Field(4, gt=0, description="completions per prompt")
    temperature: float = Field(1.0, ge=0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 = off")
    max_new_tokens: int = Field(256, gt=0)
    stop: list[str] = Field(default_factory=list, description="stop strings")
    seed: int | None = Field(None, description="default: the recipe's seed")
    batch_size: int = Field(64, gt=0, description="sequences per generation batch")


class RewardSpec(NamedSpec):
    """A named reward: a verifier kind (math, code, ifeval, json, regex, ...), a reward model, or
    ``package.module:function``. Keys other than name/weight/path/from are the reward's parameters
    and are added to every row it scores (e.g. ``strict: true`` for math)."""

    weight: float = Field(1.0, description="weight in the combined score")
    path: str | None = Field(None, description="a reward model's folder (for name: reward_model or prm)")
    from_: str | None = Field(None, alias="from", description="a reward_model or prm stage of this recipe "
                              "whose model scores (instead of path); it runs first")

    @model_validator(mode="after")
    def _one_source(self) -> RewardSpec:
        if self.path and self.from_:
            raise ValueError("set path or from, not both; fix: remove one")
        return self


def reward_references(rewards: list[RewardSpec]) -> list[tuple[str, str, str]]:
    """``StageConfig.references`` entries of the reward models named by stage."""
    return [(f"rewards.{i}.from", r.from_, "reward_model") for i, r in enumerate(rewards) if r.from_]


class DataStage(StageConfig):
    produces: ClassVar[str] = "dataset"
    uses_model: ClassVar[bool] = False


class GenerateStage(DataStage):
    """N samples per prompt from a model (``from:`` a model stage, or ``model:``)."""

    uses_model: ClassVar[bool] = True
    kind: Literal["generate"]
    data: DataConfig = Field(description="prompts (prompt rows; other fields are kept for rewards)")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)


class ScoreStage(DataStage):
    """Scores every completion with one or several rewards; ``score`` = the weighted sum."""

    kind: Literal["score"]
    data: DataConfig = Field(description="rows with prompt and completion, e.g. {stage: generate}")
    rewards: list[RewardSpec] = Field(min_length=1)

    def references(self) -> list[tuple[str, str, str]]:
        return super().references() + reward_references(self.rewards)


class SelectStage(DataStage):
    """Per prompt: the best completions (SFT rows) or chosen/rejected pairs (preference rows)."""

    kind: Literal["select"]
    data: DataConfig = Field(description="scored rows, e.g. {stage: score}")
    mode: Literal["best_of_n", "top_k", "pairs"] = "best_of_n"
    k: int = Field(1, gt=0, description="completions kept per prompt (top_k)")
    min_score: float | None = Field(None, description="keep only completions scoring at least this")
    pairs: Literal["best_vs_worst", "all_pairs"] = Field("best_vs_worst", description="pair construction")
    min_margin: float = Field(0.0, ge=0, description="pairs need a score gap above this (ties never pair)")
    drop_truncated_chosen: bool = Field(True, description="no pair whose chosen completion hit the length limit")
    min_length_ratio: float = Field(0.0, ge=0, le=1,
                                    description="no pair whose chosen is shorter than this x the rejected")

    @model_validator(mode="after")
    def _unused(self) -> SelectStage:
        pair_keys = ("pairs", "min_margin", "drop_truncated_chosen", "min_length_ratio")
        if self.mode != "pairs":
            for key in pair_keys:
                if self.explicitly_set(key):
                    raise ValueError(f"'{key}' has no effect with mode: {self.mode}; fix: remove it or use mode: pairs")
        if self.mode != "top_k" and self.explicitly_set("k"):
            raise ValueError(f"'k' has no effect with mode: {self.mode}; fix: remove it or use mode: top_k")
        return self


class FilterStage(DataStage):
    """Drops duplicate, too short / too long or unwanted rows (counts each reason)."""

    kind: Literal["filter"]
    data: DataConfig
    dedup: Literal["none", "exact", "near"] = Field("exact", description="exact: same normalised text; near: "
                                                    "also prompts whose word-shingle Jaccard >= near_threshold")
    near_threshold: float = Field(0.8, gt=0, le=1)
    min_chars: int | None = Field(None, ge=0, description="drop rows whose text is shorter")
    max_chars: int | None = Field(None, gt=0, description="drop rows whose text is longer")
    keep_regex: str | None = Field(None, description="keep only rows whose text matches (re.search)")
    drop_regex: str | None = Field(None, description="drop rows whose text matches (re.search)")

    @model_validator(mode="after")
    def _checks(self) -> FilterStage:
        if self.dedup != "near" and self.explicitly_set("near_threshold"):
            raise ValueError("'near_threshold' has no effect without dedup: near; fix: remove it or set dedup: near")
        for key in ("keep_regex", "drop_regex"):
            pattern = getattr(self, key)
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ValueError(f"{key} {pattern!r} is not a valid regex ({err}); fix: correct the pattern") from err
        return self


class MixSource(StrictModel):
    data: DataConfig
    weight: float = Field(1.0, gt=0, description="relative share of the output")


class MixStage(DataStage):
    """A weighted mixture of datasets, e.g. new data plus a replayed fraction of an earlier stage's.
    A source sampled beyond its size repeats rows (counted in the stage's info)."""

    kind: Literal["mix"]
    sources: list[MixSource] = Field(min_length=1)
    size: int | None = Field(None, gt=0, description="rows in the output (default: all rows of every source)")
    seed: int | None = Field(None, description="default: the recipe's seed")


STAGE_KINDS.add("generate", GenerateStage)
STAGE_KINDS.add("score", ScoreStage)
STAGE_KINDS.add("select", SelectStage)
STAGE_KINDS.add("filter", FilterStage)
STAGE_KINDS.add("mix", MixStage)
