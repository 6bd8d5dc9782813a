"""Plain records passed between layers. Nothing heavy is imported here.

Shape letters, defined once for the whole package:
    B  rows in a batch            T  tokens per row (padded)
    N  tokens flattened over rows  V  vocabulary size
    H  hidden size                G  completions per prompt (group size)
    P  prompts in a batch
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypedDict


class Message(TypedDict):
    """One chat turn, OpenAI style."""

    role: str  # "system" | "user" | "assistant" | "tool"
    content: str


# A prompt or response is plain text, or a list of chat messages.
Text = str | list[Message]


@dataclass(frozen=True)
class RowSource:
    """Where a row came from: used in every error about it (``file:line``)."""

    path: str
    line: int  # 1-based line (JSONL/CSV) or index + 1 (JSON array, parquet, HF dataset)

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass
class TextExample:
    """Raw text for plain causal-LM training (``pretrain``)."""

    text: str
    source: RowSource


@dataclass
class ChatExample:
    """A multi-turn conversation (``messages``)."""

    messages: list[Message]
    source: RowSource


@dataclass
class PromptCompletionExample:
    """A prompt and the completion to learn (plain or conversational)."""

    prompt: Text
    completion: Text
    source: RowSource


@dataclass
class PreferencePair:
    """A prompt with a preferred and a dispreferred response (plain or conversational)."""

    prompt: Text
    chosen: Text
    rejected: Text
    source: RowSource
    extra: dict[str, Any] = field(default_factory=dict)  # margin, category, scores, ...


@dataclass
class RankedExample:
    """A prompt with several responses and their scores (higher is better); a preference stage
    turns it into pairs (best against each other, or all pairs)."""

    prompt: Text
    responses: list[Text]
    scores: list[float]
    source: RowSource


@dataclass
class KTOExample:
    """An unpaired response with a binary desirability label."""

    prompt: Text
    completion: Text
    label: bool
    source: RowSource


@dataclass
class PromptExample:
    """A prompt for generation or RL, with its ground truth and any other fields rewards need."""

    prompt: Text
    source: RowSource
    answer: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


Example = (
    TextExample | ChatExample | PromptCompletionExample | PreferencePair | RankedExample | KTOExample
    | PromptExample
)


@dataclass
class TokenizedExample:
    """One rendered sequence. ``loss_mask[t] == 1`` means token ``t`` is a training target.

    input_ids: [T] token ids, loss_mask: [T] 0/1. The model predicts token t from tokens < t,
    so the first token is never a target.
    """

    input_ids: list[int]
    loss_mask: list[int]
    source: RowSource | None = None
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_targets(self) -> int:
        return sum(self.loss_mask)


FinishReason = Literal["stop", "length"]


@dataclass
class Rollout:
    """One sampled completion, token-in/token-out: ids exactly as sampled, never re-tokenised.

    prompt_ids: [Tp], completion_ids: [Tc], logprobs: [Tc] the sampler's log-probability of each
    completion token under the sampling distribution (temperature applied the same way as the
    trainer applies it). ``finish_reason`` is "length" when the completion hit max new tokens.
    """

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    text: str
    prompt_index: int = 0  # which prompt of the batch (groups share it)
    sample_index: int = 0  # which of the G samples
    policy_version: int = 0  # weight version that produced it

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


@dataclass
class RewardResult:
    """A reward for one completion.

    ``score`` is None when the sample must be masked (never NaN). ``components`` holds named
    partial scores (e.g. ``{"correct": 1.0, "format": 0.5}``); ``meta`` holds explanations
    (extracted answer, parse failure reason, the limit that fired, cost).
    """

    score: float | None
    components: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


class Reward(Protocol):
    """Scores completions given their prompt rows (answer, tests, ...); None masks a sample."""

    def __call__(self, completions: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> list[RewardResult]:
        ...
