"""The rollout engine a stage's ``sampling`` config names, and the problems that config has on this
machine. Importing this module imports neither vLLM nor anything else heavy beyond torch."""

from __future__ import annotations

from typing import Any

import torch

from posttrain.config.stages.rl import RolloutSamplingConfig
from posttrain.errors import Problem, problem
from posttrain.rollout.base import Sampler, SamplingParams
from posttrain.rollout.hf import HFSampler
from posttrain.rollout.vllm import VLLMSampler, logprobs_mode_problem, vllm_unavailable


def sampling_params(s: RolloutSamplingConfig, seed: int) -> SamplingParams:
    """The config's sampling settings for an engine; ``seed`` when the config names none."""
    return SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                          max_new_tokens=s.max_new_tokens, stop=s.stop, seed=s.seed if s.seed is not None else seed)


def engine_problems(s: RolloutSamplingConfig, where: str) -> list[Problem]:
    """``engine: vllm`` needs the vllm package and a CUDA GPU on this machine, and sampling
    settings under which vLLM reports the trainer's logprobs. ``where`` is the config's YAML path
    (``stages.<name>.sampling``)."""
    if s.engine != "vllm":
        return []
    problems = []
    unavailable = vllm_unavailable()
    if unavailable:
        problems.append(problem(f"{where}.engine", f"engine: vllm cannot run here: {unavailable}",
                                "install vllm on a CUDA machine (pip install vllm), or use engine: hf"))
    mismatch = logprobs_mode_problem(sampling_params(s, seed=0))
    if mismatch:
        problems.append(problem(where, f"engine: vllm cannot report the trainer's logprobs: {mismatch}",
                                "set top_k: 0 and top_p: 1, or temperature: 1, or use engine: hf"))
    return problems


def build_sampler(s: RolloutSamplingConfig, sampling: SamplingParams, model: torch.nn.Module, tokenizer: Any, *,
                  max_model_len: int) -> Sampler:
    """The configured engine around ``model``: ``sampling`` fixes a vLLM engine's logprobs mode,
    ``max_model_len`` (prompt + completion tokens) its KV-cache needs."""
    if s.engine == "vllm":
        return VLLMSampler(model, tokenizer, sampling, gpu_memory_utilization=s.vllm.gpu_memory_utilization,
                           enforce_eager=s.vllm.enforce_eager, dtype=s.vllm.dtype, max_model_len=max_model_len)
    return HFSampler(model, tokenizer, batch_size=s.batch_size)
