"""Reward-model stages: ``reward_model`` (outcome heads: pairwise or pointwise), ``prm`` (a
step-level process reward model) and ``prm_labels`` (a data stage that induces step labels from
outcomes, Math-Shepherd style). The first two produce a ``reward_model`` artifact, which a model
stage cannot start from (``from:``); rewards, best-of-N and evals read it instead."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from posttrain.config.base import StrictModel
from posttrain.config.components import DataConfig, TrainConfig
from posttrain.config.stage_base import STAGE_KINDS, StageConfig
from posttrain.config.stages.data import DataStage, SamplingConfig
from posttrain.config.stages.preference import LossSpec

REWARD_MODEL = "reward_model"  # the artifact kind of reward_model and prm stages
HEAD_NAME = r"^[A-Za-z][A-Za-z0-9_]*$"


def _bradley_terry() -> LossSpec:
    return LossSpec(name="bradley_terry")


class RewardHead(StrictModel):
    """One output of a reward model and the data it alone learns from."""

    name: str = Field(pattern=HEAD_NAME, description="the head's name, e.g. helpfulness (a metric prefix)")
    data: DataConfig = Field(description="pairs (prompt, chosen, rejected) or ranked rows for a pairwise loss; "
                                         "(prompt, completion, <target>) rows for regression")
    loss: LossSpec = Field(default_factory=_bradley_terry,
                           description="bradley_terry (pairwise, default) or regression, with its parameters")
    weight: float = Field(1.0, gt=0, description="weight of this head's loss in the sum")
    use_margin: bool = Field(False, description="pairwise: subtract each pair's 'margin' field inside the "
                                                "sigmoid (Llama 2); a pair without one is an error")
    target: str | None = Field(None, description="regression: the row field holding the score "
                                                 "(default: the head's name)")
    lm_coefficient: float = Field(0.0, ge=0, description="pairwise: add this x the chosen response's mean "
                                                         "next-token NLL (GRM regulariser); 0 = off")


class RewardModelStage(StageConfig):
    """A reward model: a scalar head, or several named heads each trained on its own data."""

    produces: ClassVar[str] = REWARD_MODEL

    kind: Literal["reward_model"]
    data: DataConfig | None = Field(None, description="one head named 'reward' trained on these rows "
                                                      "(or give 'heads')")
    loss: LossSpec | None = Field(None, description="the one head's loss (default bradley_terry)")
    use_margin: bool = Field(False, description="the one head: use each pair's 'margin' field")
    lm_coefficient: float = Field(0.0, ge=0, description="the one head: weight of the chosen responses' "
                                                         "next-token NLL (GRM regulariser)")
    heads: list[RewardHead] | None = Field(None, min_length=1, description="several named heads")
    category_field: str = Field("category", description="pairs carrying this field get accuracy per value")
    max_prompt_length: int | None = Field(None, gt=0, description="pairs with longer prompts are bad pairs")
    on_bad_pair: Literal["error", "drop"] = Field(
        "error", description="identical or empty responses, over-long prompts: fail naming the row, or drop")
    max_dropped_share: float = Field(0.1, ge=0, le=1, description="fail if more pairs than this are dropped")
    rankings: Literal["best_vs_rest", "all_pairs"] = Field(
        "best_vs_rest", description="how rows with several scored responses become pairs")
    share_prompt: bool = Field(True, description="pack each micro-batch into one row, a pair's prompt computed "
                                                 "once (same rewards, fewer tokens; SDPA models only, others pad)")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(lr=1e-5, global_batch_size=32))

    @property
    def head_specs(self) -> list[RewardHead]:
        """The heads to train (the shorthand ``data`` is one head named ``reward``)."""
        if self.heads is not None:
            return self.heads
        assert self.data is not None
        return [RewardHead(name="reward", data=self.data, loss=self.loss or _bradley_terry(),
                           use_margin=self.use_margin, lm_coefficient=self.lm_coefficient)]

    @model_validator(mode="after")
    def _one_way_to_name_heads(self) -> RewardModelStage:
        shorthand = [k for k in ("data", "loss", "use_margin", "lm_coefficient") if self.explicitly_set(k)]
        if self.heads is not None and shorthand:
            raise ValueError(f"set 'heads' or {shorthand}, not both; fix: move them into a head")
        if self.heads is None and self.data is None:
            raise ValueError("the stage has no data; fix: add 'data' (one head) or 'heads'")
        names = [h.name for h in self.heads or []]
        if len(set(names)) != len(names):
            raise ValueError(f"head names must be unique, got {names}; fix: rename a head")
        if self.on_bad_pair == "error" and self.explicitly_set("max_dropped_share"):
            raise ValueError("'max_dropped_share' has no effect with on_bad_pair: error; fix: set on_bad_pair: drop")
        return self


class PRMStage(StageConfig):
    """A process reward model: one logit per reasoning step, trained only at step positions."""

    produces: ClassVar[str] = REWARD_MODEL

    kind: Literal["prm"]
    data: DataConfig = Field(description="rows: prompt, steps (a list) or completion (split by the separator), "
                                         "labels (one per step, 0/1 or a probability)")
    separator: str = Field("\n", min_length=1, description="what separates steps (kept in the artifact, "
                                                           "so scoring splits the same way)")
    on_bad_row: Literal["error", "drop"] = Field(
        "error", description="rows whose label count differs from their step count: fail, or drop and count")
    lm_coefficient: float = Field(0.0, ge=0, description="add this x the mean next-token NLL of solutions whose "
                                                         "every step is labelled >= 0.5 (GRM regulariser); 0 = off")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(lr=1e-5, global_batch_size=32))


class PRMLabelStage(DataStage):
    """Step labels induced from outcomes (Math-Shepherd): from each step prefix of a solution,
    sample ``sampling.n`` continuations with the model; the label is the share that reaches the
    verified answer (soft) or whether any does (hard). The last step's label is the solution's own
    verdict. Output rows: prompt, steps, labels, completion_correct, the input's other fields."""

    uses_model: ClassVar[bool] = True
    kind: Literal["prm_labels"]
    data: DataConfig = Field(description="rows: prompt, completion or steps, and what the verifier reads "
                                         "(e.g. answer)")
    separator: str = Field("\n", min_length=1, description="what separates steps")
    verifier: str = Field("math", description="a verifier kind, or pkg.mod:fn (completion, row) -> RewardResult")
    label: Literal["soft", "hard"] = Field("soft", description="soft: share correct; hard: 1 if any is")
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(n=8),
                                     description="n = continuations per step prefix (K)")


STAGE_KINDS.add("reward_model", RewardModelStage)
STAGE_KINDS.add("prm", PRMStage)
STAGE_KINDS.add("prm_labels", PRMLabelStage)
