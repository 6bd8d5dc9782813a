"""What every rollout engine is: the ``Sampler`` protocol and its ``SamplingParams``.

Token-in/token-out: prompts go in as token ids, rollouts come back with the exact sampled ids and
the sampler's logprob of each, ``log softmax(logits / T)`` over the full vocabulary (the trainer's
quantity; top-p / top-k change what can be sampled, not the reported logprob). Nothing is
re-tokenised.

Engines: ``hf`` (``rollout/hf.py``, samples from the trainer's own module) and ``vllm``
(``rollout/vllm.py``, a colocated vLLM engine holding its own copy of the weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from posttrain.types import Rollout

if TYPE_CHECKING:
    import torch


@dataclass
class SamplingParams:
    n: int = 1  # samples per prompt (G)
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 64
    stop: list[str] = field(default_factory=list)  # stop strings (kept in the text and ids)
    seed: int = 0


@runtime_checkable
class Sampler(Protocol):
    """Samples completions of token-id prompts from the current policy.

    ``version`` is the policy version rollouts are labelled with (``Rollout.policy_version``):
    the number of rollout steps the trainer has applied. ``sync(model, version)`` makes the
    sampler sample from ``model``'s current weights under that version; the online loop calls it
    at the start of every step (and so after a resume). An engine that holds its own copy of the
    weights refuses to generate while that copy is older than ``version``.
    """

    version: int

    def generate(self, prompts: list[list[int]], params: SamplingParams, keys: list[int] | None = None
                 ) -> list[Rollout]:
        """Rollouts grouped by prompt (prompt 0's n samples, then prompt 1's, ...); ``keys`` name
        the prompts for seeding (default: their positions) and become ``Rollout.prompt_index``."""
        ...

    def sync(self, model: torch.nn.Module, version: int) -> None:
        """Sample from ``model``'s current weights from now on, labelled ``version``."""
        ...

    def close(self) -> None:
        """Release what the engine holds (a vLLM engine's weights and KV cache on the GPU); the
        stage that built it calls this when its run ends, failed or not."""
        ...
