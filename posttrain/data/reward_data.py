"""Rows and micro-batches of reward models: pairs and scored responses (outcome heads) and
solutions cut into reasoning steps (process reward models).

A reward head reads the hidden state of a response's last token: the end-of-turn token the
renderer appends. Sequences are cut right after it (``cut_at_last_target``; a chat template's
trailing newline carries nothing), so that token is also the last non-padding one, which is
where transformers' ``*ForSequenceClassification`` pools: one saved model, the same rewards.

Steps are rendered one piece at a time (``render_steps``): the prompt as a sampler sees it, then
each step's text (the separator opening every step after the first), then the end-of-turn token;
a step's score is read at the token after it. Training, label induction and scoring all use this
one function, so a step is read at the same token everywhere. Putting the separator at the start of the next step keeps byte-level BPE
splits the same as for the whole text (a space or newline attaches to the word after it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from posttrain.data.render import render_prompt, render_prompt_completion
from posttrain.errors import UserError, problem
from posttrain.models.block_attention import BlockLayout
from posttrain.types import RowSource, Text, TokenizedExample


def cut_at_last_target(example: TokenizedExample) -> TokenizedExample:
    """The sequence up to and including its last target token."""
    last = max(i for i, m in enumerate(example.loss_mask) if m)
    return TokenizedExample(example.input_ids[: last + 1], example.loss_mask[: last + 1], example.source,
                            example.truncated)


@dataclass
class RewardRow:
    """One training row of an outcome reward model, for head ``head``: a pair (chosen, rejected)
    or one scored response. ``value`` is the pair's margin or the response's target score."""

    head: int
    sequences: tuple[TokenizedExample, ...]  # (chosen, rejected) or (response,)
    value: float = math.nan
    category: int = -1  # index into the stage's category names; -1 = none
    source: RowSource | None = None

    @property
    def is_pair(self) -> bool:
        return len(self.sequences) == 2

    def __len__(self) -> int:
        return sum(len(s) for s in self.sequences)


@dataclass
class RewardBatch:
    """One micro-batch. Tokens: input_ids, position_ids [R, T]: right-padded rows, or one packed
    row with its attention ``blocks`` (``posttrain.data.shared_prompt``). Read positions:
    ``read_rows``, ``read_cols`` [S], where
    each of the S scored sequences ends. Pairs: ``pair_chosen``, ``pair_rejected`` [P] (indices
    into the S), ``pair_head``, ``pair_margin`` (NaN = none), ``pair_category`` [P]. Scored
    responses: ``point_index``, ``point_head``, ``point_target`` [Q]. ``tokens``: non-padding
    tokens of the scored sequences (a shared prompt counts once per sequence that reads it)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    read_rows: torch.Tensor
    read_cols: torch.Tensor
    pair_chosen: torch.Tensor
    pair_rejected: torch.Tensor
    pair_head: torch.Tensor
    pair_margin: torch.Tensor
    pair_category: torch.Tensor
    point_index: torch.Tensor
    point_head: torch.Tensor
    point_target: torch.Tensor
    tokens: int
    blocks: BlockLayout | None = None
    # Chosen responses' next-token targets (an optional language-modelling regulariser): the
    # hidden state at (lm_rows, lm_cols) predicts lm_targets; lm_pair is the pair it belongs to [L].
    lm_rows: torch.Tensor | None = None
    lm_cols: torch.Tensor | None = None
    lm_targets: torch.Tensor | None = None
    lm_pair: torch.Tensor | None = None

    def to(self, device: torch.device) -> RewardBatch:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return RewardBatch(**moved)


def lm_targets(chosen: list[tuple[TokenizedExample, int, int]]) -> dict[str, torch.Tensor]:
    """The next-token targets of responses used as language-model targets (a pair's chosen
    response, a verified solution): (sequence, row, first column) each -> lm_rows, lm_cols (the
    predicting position), lm_targets, lm_pair (which of them)."""
    rows, cols, targets, pairs = [], [], [], []
    for pair, (sequence, row, start) in enumerate(chosen):
        for t in range(1, len(sequence)):
            if sequence.loss_mask[t]:
                rows.append(row)
                cols.append(start + t - 1)
                targets.append(sequence.input_ids[t])
                pairs.append(pair)
    return {name: torch.tensor(values, dtype=torch.long) for name, values in
            (("lm_rows", rows), ("lm_cols", cols), ("lm_targets", targets), ("lm_pair", pairs))}


def _pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for r, s in enumerate(sequences):
        ids[r, : len(s)] = torch.tensor(s)
    return ids, torch.arange(width).expand(len(sequences), width).clone()


def collate_reward_rows(rows: list[RewardRow], pad_id: int) -> RewardBatch:
    """Every sequence in its own right-padded row (the chosen and rejected of a pair included)."""
    sequences: list[list[int]] = []
    pairs: list[tuple[int, int, int, float, int]] = []
    points: list[tuple[int, int, float]] = []
    for row in rows:
        first = len(sequences)
        sequences += [s.input_ids for s in row.sequences]
        if row.is_pair:
            pairs.append((first, first + 1, row.head, row.value, row.category))
        else:
            points.append((first, row.head, row.value))
    ids, positions = _pad(sequences, pad_id)
    lengths = torch.tensor([len(s) for s in sequences])
    chosen = [(row.sequences[0], pair[0], 0) for row, pair in zip([r for r in rows if r.is_pair], pairs)]
    return RewardBatch(
        ids, positions, torch.arange(len(sequences)), lengths - 1,
        torch.tensor([p[0] for p in pairs], dtype=torch.long), torch.tensor([p[1] for p in pairs], dtype=torch.long),
        torch.tensor([p[2] for p in pairs], dtype=torch.long), torch.tensor([p[3] for p in pairs], dtype=torch.float32),
        torch.tensor([p[4] for p in pairs], dtype=torch.long),
        torch.tensor([p[0] for p in points], dtype=torch.long), torch.tensor([p[1] for p in points], dtype=torch.long),
        torch.tensor([p[2] for p in points], dtype=torch.float32), int(lengths.sum()), **lm_targets(chosen))


# ---------------------------------------------------------------- process reward models


def split_steps(text: str, separator: str) -> list[str]:
    """A solution's steps: the text between separators, empty pieces left out."""
    return [piece for piece in text.split(separator) if piece.strip()]


def _end_of_turn(tokenizer: PreTrainedTokenizerBase, prompt: Text, source: RowSource | None) -> int:
    """The token that closes an assistant turn after this prompt (the template's, for chats)."""
    if not isinstance(prompt, list):
        return tokenizer.eos_token_id
    closed = render_prompt_completion(tokenizer, prompt, "x", "assistant", source)
    return closed.input_ids[max(i for i, m in enumerate(closed.loss_mask) if m)]


def render_steps(tokenizer: PreTrainedTokenizerBase, prompt: Text, steps: list[str], separator: str,
                 source: RowSource | None = None, *, close: bool = True) -> tuple[TokenizedExample, list[int]]:
    """Prompt + steps (+ the end-of-turn token when ``close``) and, per step, the index of the
    token right after it: the next step's first token (its separator) or, after the last step,
    the end-of-turn token. That token is where a step's score is read: like Math-Shepherd's step
    tag, it has seen the whole step (reading at the step's own last token leaves the model no
    position to compare that token with what the step should have said). Without ``close`` the
    last step has no such token and gets no index. The completion tokens are the targets."""
    if not steps:
        raise UserError(problem(str(source or "solution"), "the solution has no steps",
                                "check the separator, or drop the row"))
    prompt_ids = render_prompt(tokenizer, prompt, source)
    ids, ends = list(prompt_ids), []
    for i, step in enumerate(steps):
        piece = tokenizer((separator if i else "") + step, add_special_tokens=False)["input_ids"]
        if not piece:
            raise UserError(problem(str(source or "solution"), f"step {i + 1} is empty", "drop the row"))
        if i:
            ends.append(len(ids))
        ids += piece
    if close:
        ends.append(len(ids))
        ids.append(_end_of_turn(tokenizer, prompt, source))
    mask = [0] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids))
    return TokenizedExample(ids, mask, source), ends


@dataclass
class StepRow:
    """A rendered solution and one label in [0, 1] per step (the probability it is correct)."""

    sequence: TokenizedExample
    step_ends: list[int]
    labels: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.sequence)

    @property
    def verified(self) -> bool:
        """Every step is labelled more likely right than wrong (a usable language-model target)."""
        return bool(self.labels) and min(self.labels) >= 0.5


@dataclass
class StepBatch:
    """input_ids, position_ids [R, T]; every labelled step's position ``step_rows``,
    ``step_cols`` [S], its ``labels`` [S] and ``step_of`` [S] (its index within its solution)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    step_rows: torch.Tensor
    step_cols: torch.Tensor
    labels: torch.Tensor
    step_of: torch.Tensor
    tokens: int
    # next-token targets of the verified solutions (an optional regulariser), as in RewardBatch;
    # lm_pair numbers the verified solutions of the batch
    lm_rows: torch.Tensor | None = None
    lm_cols: torch.Tensor | None = None
    lm_targets: torch.Tensor | None = None
    lm_pair: torch.Tensor | None = None

    def to(self, device: torch.device) -> StepBatch:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return StepBatch(**moved)


def collate_step_rows(rows: list[StepRow], pad_id: int) -> StepBatch:
    ids, positions = _pad([r.sequence.input_ids for r in rows], pad_id)
    step_rows = [r for r, row in enumerate(rows) for _ in row.step_ends]
    step_cols = [c for row in rows for c in row.step_ends]
    labels = [x for row in rows for x in (row.labels or [math.nan] * len(row.step_ends))]
    step_of = [i for row in rows for i in range(len(row.step_ends))]
    verified = [(row.sequence, r, 0) for r, row in enumerate(rows) if row.verified]
    return StepBatch(ids, positions, torch.tensor(step_rows, dtype=torch.long), torch.tensor(step_cols, dtype=torch.long),
                     torch.tensor(labels, dtype=torch.float32), torch.tensor(step_of, dtype=torch.long),
                     sum(len(r) for r in rows), **lm_targets(verified))
