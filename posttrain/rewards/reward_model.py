"""Rewards from models: scalar, multi-head and process reward models, alone or as an ensemble.

A reward spec names one model (``path``) or several (``paths``, an ensemble), each a
``reward_model`` / ``prm`` stage's artifact folder (or its ``model/`` folder)::

    rewards: [{name: reward_model, paths: [rm_a, rm_b], ensemble: pessimistic, alpha: 1.0}]

Each completion is re-tokenised with the reward model's own tokenizer and chat template (the
policy's tokens mean nothing to another vocabulary): the row's ``prompt`` and the completion are
rendered exactly as in reward-model training and read at the response's last token. A process
reward model splits the completion into steps at the separator it was trained with and reads every
step; the step probabilities are aggregated (``min`` by default: a solution is as good as its
worst step). Scoring is batched (``batch_size`` sequences per forward, longest first, no
gradients).

Options (strict; an unknown one is an error):

- ``heads``: {name: weight} for a multi-head model (default: the mean of its heads);
- ``ensemble``: ``mean`` | ``pessimistic`` (mean - ``alpha`` x std over members) | ``gate``
  (the mean, or None = masked where the members' std exceeds ``max_std``);
- ``aggregate`` (PRM): ``min`` | ``product`` | ``last`` | ``mean``;
- ``batch_size``, ``max_length`` (longer sequences keep their last ``max_length`` tokens).

A stage name of the same recipe is not accepted as a path: the score stage hands builders no
artifact map (``from_stage`` would need one; see docs/reward_models.md).

The combinators are pure functions over a [M, N] tensor (M members, N samples); std is the
population std over members (0 for one member).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, ValidationError, model_validator
from transformers import PreTrainedTokenizerBase

from posttrain.config.base import StrictModel, problems_from_validation
from posttrain.data.render import render_prompt_completion
from posttrain.data.reward_data import cut_at_last_target, render_steps, split_steps
from posttrain.errors import UserError, problem
from posttrain.models.heads import RewardModel, load_reward_model, read_head_info
from posttrain.rewards.base import MODEL_REWARDS, Scorer
from posttrain.types import RewardResult, RowSource, Text

# ---------------------------------------------------------------- combinators (pure)


def ensemble_mean(scores: torch.Tensor) -> torch.Tensor:
    """[M, N] -> [N]: the members' mean."""
    return scores.mean(dim=0)


def ensemble_std(scores: torch.Tensor) -> torch.Tensor:
    """[M, N] -> [N]: the members' population std (0 with one member)."""
    return scores.std(dim=0, unbiased=False)


def pessimistic_mean(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """[M, N] -> [N]: mean - alpha * std. Lower where the members disagree (Coste et al. 2023,
    "Reward model ensembles help mitigate overoptimization", uncertainty-weighted optimisation
    with the std in place of the variance; Eisenstein et al. 2023)."""
    return ensemble_mean(scores) - alpha * ensemble_std(scores)


def uncertainty_gate(scores: torch.Tensor, max_std: float) -> list[float | None]:
    """[M, N] -> N scores: the mean, or None (masked, never 0) where the std exceeds ``max_std``."""
    mean, std = ensemble_mean(scores), ensemble_std(scores)
    return [None if float(s) > max_std else float(m) for m, s in zip(mean, std)]


def weighted_heads(rewards: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[N, K] head outputs, [K] weights -> [N] the weighted sum."""
    return rewards @ weights.to(rewards.dtype)


def aggregate_steps(probabilities: torch.Tensor, how: str) -> float:
    """One solution's step probabilities [S] -> its score."""
    if how == "min":
        return float(probabilities.min())
    if how == "product":
        return float(probabilities.prod())
    if how == "last":
        return float(probabilities[-1])
    if how == "mean":
        return float(probabilities.mean())
    raise ValueError(f"unknown step aggregation {how!r}")


# ---------------------------------------------------------------- options


class RewardModelOptions(StrictModel):
    """The parameters of a ``reward_model`` / ``prm`` reward spec."""

    paths: list[str] | None = Field(None, min_length=1, description="ensemble members (instead of 'path')")
    heads: dict[str, float] | None = Field(None, description="weights of named heads (default: their mean)")
    ensemble: Literal["mean", "pessimistic", "gate"] = "mean"
    alpha: float = Field(1.0, ge=0, description="pessimistic: mean - alpha * std")
    max_std: float | None = Field(None, gt=0, description="gate: mask samples whose ensemble std exceeds this")
    aggregate: Literal["min", "product", "last", "mean"] = Field("min", description="PRM: step scores -> one")
    batch_size: int = Field(16, gt=0, description="sequences per forward")
    max_length: int = Field(2048, gt=1, description="longer sequences keep their last max_length tokens")

    @model_validator(mode="after")
    def _consistent(self) -> RewardModelOptions:
        if self.ensemble == "gate" and self.max_std is None:
            raise ValueError("ensemble: gate needs max_std; fix: set max_std (the largest std to keep)")
        if self.ensemble != "gate" and self.max_std is not None:
            raise ValueError(f"'max_std' has no effect with ensemble: {self.ensemble}; fix: remove it or use gate")
        if self.ensemble != "pessimistic" and self.explicitly_set("alpha"):
            raise ValueError(f"'alpha' has no effect with ensemble: {self.ensemble}; fix: remove it")
        return self


# ---------------------------------------------------------------- scoring


class RewardModelScorer:
    """Scores completions with one reward model or an ensemble (the `Reward` protocol)."""

    def __init__(self, members: list[tuple[RewardModel, PreTrainedTokenizerBase]], options: RewardModelOptions,
                 names: list[str] | None = None) -> None:
        self.members, self.options = members, options
        self.names = names or [f"member_{i}" for i in range(len(members))]

    def __call__(self, completions: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> list[RewardResult]:
        if not completions:
            return []
        per_member, heads = [], []
        for model, tokenizer in self.members:
            scores, head_scores = score_with(model, tokenizer, completions, rows, self.options)
            per_member.append(scores)
            heads.append(head_scores)
        stacked = torch.stack(per_member)  # [M, N]
        return self._results(stacked, heads)

    def _results(self, stacked: torch.Tensor, heads: list[dict[str, torch.Tensor]]) -> list[RewardResult]:
        o = self.options
        if o.ensemble == "gate":
            combined: list[float | None] = uncertainty_gate(stacked, o.max_std or 0.0)
        elif o.ensemble == "pessimistic":
            combined = pessimistic_mean(stacked, o.alpha).tolist()
        else:
            combined = ensemble_mean(stacked).tolist()
        mean, std = ensemble_mean(stacked), ensemble_std(stacked)
        out = []
        for i, score in enumerate(combined):
            components = {name: float(stacked[m, i]) for m, name in enumerate(self.names)} if len(self.names) > 1 else {}
            components.update({head: float(values[i]) for member in heads for head, values in member.items()})
            meta = {"ensemble_mean": float(mean[i]), "ensemble_std": float(std[i])} if len(self.names) > 1 else {}
            if score is None:
                meta["masked"] = f"ensemble std {float(std[i]):.4g} > max_std {o.max_std}"
            out.append(RewardResult(score, components, meta))
        return out


def _prompt(row: Mapping[str, Any], i: int) -> Any:
    if "prompt" not in row:
        raise UserError(problem(f"row {i} field 'prompt'", "a reward model scores a completion given its prompt",
                                "keep the prompt in every scored row"))
    return row["prompt"]


@torch.no_grad()
def score_with(model: RewardModel, tokenizer: PreTrainedTokenizerBase, completions: Sequence[Text],
               rows: Sequence[Mapping[str, Any]], options: RewardModelOptions
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One model's scores [N] and, for several heads, each head's [N]. A completion may be a
    conversation (the responses of a multi-turn pair)."""
    if model.kind == "prm":
        return _score_steps(model, tokenizer, completions, rows, options), {}
    sequences = []
    for i, (completion, row) in enumerate(zip(completions, rows)):
        rendered = render_prompt_completion(tokenizer, _prompt(row, i), completion, "assistant", RowSource("row", i))
        sequences.append(cut_at_last_target(rendered).input_ids)
    rewards = _read(model, tokenizer, sequences, [[len(s) - 1] for s in sequences], options)  # [N, 1, K]
    rewards = rewards[:, 0]
    names = model.head_names
    if len(names) == 1:
        return rewards[:, 0], {}
    weights = options.heads or {name: 1.0 / len(names) for name in names}
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise UserError(problem("reward heads", f"the model has no head {unknown[0]!r}",
                                "use one of: " + ", ".join(names)))
    vector = torch.tensor([weights.get(name, 0.0) for name in names])
    return weighted_heads(rewards, vector), {name: rewards[:, k] for k, name in enumerate(names)}


def _score_steps(model: RewardModel, tokenizer: PreTrainedTokenizerBase, completions: Sequence[str],
                 rows: Sequence[Mapping[str, Any]], options: RewardModelOptions) -> torch.Tensor:
    separator = model.meta.get("separator", "\n")
    sequences, ends = [], []
    for i, (completion, row) in enumerate(zip(completions, rows)):
        steps = split_steps(completion, separator) or [completion or " "]
        sequence, step_ends = render_steps(tokenizer, _prompt(row, i), steps, separator, RowSource("row", i))
        sequences.append(sequence.input_ids)
        ends.append(step_ends)
    logits = _read(model, tokenizer, sequences, ends, options)  # [N, S_max, 1], NaN where no step
    out = []
    for i, step_ends in enumerate(ends):
        step_logits = logits[i, : len(step_ends), 0]
        out.append(aggregate_steps(torch.sigmoid(step_logits[~step_logits.isnan()]), options.aggregate))
    return torch.tensor(out)


def _read(model: RewardModel, tokenizer: PreTrainedTokenizerBase, sequences: list[list[int]],
          positions: list[list[int]], options: RewardModelOptions) -> torch.Tensor:
    """Head outputs [N, P_max, K] at each sequence's read positions (NaN beyond its own),
    longest sequences first, ``batch_size`` per forward."""
    device = next(model.parameters()).device
    width = max(len(p) for p in positions)
    out = torch.full((len(sequences), width, len(model.head_names)), float("nan"))
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), options.batch_size):
            index = order[start : start + options.batch_size]
            ids, cols = [], []
            for i in index:
                cut = max(0, len(sequences[i]) - options.max_length)  # keep the end: the response
                ids.append(sequences[i][cut:])
                cols.append([p - cut for p in positions[i] if p >= cut])
            longest = max(len(s) for s in ids)
            batch = torch.full((len(ids), longest), tokenizer.pad_token_id, dtype=torch.long)
            for r, s in enumerate(ids):
                batch[r, : len(s)] = torch.tensor(s)
            rows = torch.tensor([r for r, c in enumerate(cols) for _ in c], dtype=torch.long)
            columns = torch.tensor([p for c in cols for p in c], dtype=torch.long)
            positions_ids = torch.arange(longest).expand(len(ids), longest)
            scores = model.scores_at(batch.to(device), positions_ids.to(device), rows.to(device), columns.to(device))
            scores = scores.float().cpu()
            offset = 0
            for r, i in enumerate(index):
                count, total = len(cols[r]), len(positions[i])  # cut-off early positions stay NaN
                out[i, total - count : total] = scores[offset : offset + count]
                offset += count
    finally:
        model.train(was_training)
    return out


# ---------------------------------------------------------------- building from a spec


def _resolve(path: str, base_dir: Path | None, where: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_absolute() and base_dir is not None:
        folder = base_dir / folder
    if not folder.exists():
        raise UserError(problem(where, f"reward model {path!r} does not exist",
                                "point at a reward_model or prm stage's artifact folder"))
    read_head_info(folder)  # a clear error when the folder is not a reward model
    return folder


def build_reward_model_scorer(*, params: dict[str, Any], path: str | None, where: str,
                              base_dir: Path | None = None, kind: str | None = None) -> Scorer:
    """The scorer a ``{name: reward_model, path | paths: ..., ...}`` spec describes."""
    try:
        options = RewardModelOptions.model_validate(params)
    except ValidationError as err:
        raise UserError(problems_from_validation(err, RewardModelOptions, prefix=(where,))) from err
    if (path is None) == (options.paths is None):
        raise UserError(problem(f"{where}.path", "give the reward model as 'path' or an ensemble as 'paths'",
                                "set exactly one of them"))
    specs = [path] if path is not None else list(options.paths or [])
    folders = [_resolve(p, base_dir, f"{where}.path" if path else f"{where}.paths.{i}") for i, p in enumerate(specs)]
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    members = []
    for i, folder in enumerate(folders):
        model, tokenizer = load_reward_model(folder)
        if kind is not None and model.kind != kind:
            raise UserError(problem(f"{where}.path" if path else f"{where}.paths.{i}",
                                    f"{folder} is a {model.kind} model, not a {kind} model",
                                    "use name: reward_model (any kind) or point at the right artifact"))
        members.append((model.to(device), tokenizer))
    return RewardModelScorer(members, options, [Path(s).name for s in specs] if len(specs) > 1 else None)


def build_prm_scorer(*, params: dict[str, Any], path: str | None, where: str, base_dir: Path | None = None) -> Scorer:
    """``{name: prm, ...}``: like reward_model, but every member must be a process reward model."""
    return build_reward_model_scorer(params=params, path=path, where=where, base_dir=base_dir, kind="prm")


MODEL_REWARDS.add("reward_model", build_reward_model_scorer)
MODEL_REWARDS.add("prm", build_prm_scorer)
