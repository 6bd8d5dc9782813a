"""The ``vllm`` rollout engine: a vLLM engine colocated with the trainer (same process, same GPU).

vLLM is imported inside ``VLLMSampler`` only: importing this module never imports it, so the CPU
path, the tests and ``posttrain validate`` run without it. Not yet run on a GPU in this repository
(see docs/training.md); ``benchmarks/gpu_vllm_check.py`` is the check to run on one.

Token-in/token-out: prompts go in as token ids (``{"prompt_token_ids": ...}``, vLLM's
``TokensPrompt``), never as text, and the rollouts carry the engine's sampled ids with its logprob
of each. The prompt ids vLLM echoes back are checked against ours.

Logprobs. vLLM's engine setting ``logprobs_mode`` (vllm/v1/sample/sampler.py and
ops/topk_topp_sampler.py) says which logits the returned logprobs come from:

    raw_logprobs        log softmax(logits): before temperature, penalties and top-k/top-p;
    processed_logprobs  log softmax of the logits the token was drawn from: after temperature and
                        after top-k/top-p masking, so renormalised over the tokens kept.

Ours is ``log softmax(logits / T)`` over the full vocabulary. raw_logprobs is ours when T is 1, or
0 (greedy: vLLM applies no temperature, nor do we); processed_logprobs is ours when top-k and
top-p are off (with them on, the masking leaks in: the sampled token's logprob gains -log of the
kept probability mass). The engine takes raw_logprobs when it matches, else processed_logprobs;
with T not in {0, 1} and top-k/top-p on, no mode reports our quantity and the engine refuses the
settings (the stage's config check reports it at ``stages.<name>.sampling``).

Weights. The engine holds its own copy, in its own dtype. ``sync(model, version)`` loads the
trainer's current weights (LoRA adapters merged for the copy) with the vLLM model's
``load_weights``, reached through ``LLM.apply_model`` where the engine has it, else through
``llm_engine.model_executor.driver_worker.model_runner.model`` (TRL's colocate path); both need the
engine core in this process, so ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` is set. Then the prefix cache
is reset (its KV blocks were computed with the old weights) and ``engine_version`` recorded.
``generate`` raises while ``engine_version`` is not ``version``, the trainer's policy version, or
when the trainer's parameters have been updated in place (an optimizer step: torch's version
counters moved) since the copy: a stale engine is an error, never a silent sample from old weights.

Seeding: prompt ``key`` is one request seeded hash(seed, key); vLLM gives its n samples seeds
seed + i (vllm/v1/engine/parallel_sampling.py). A prompt's samples so do not depend on which other
prompts share the call, up to vLLM's numerics, which vary slightly with the batch's shapes (the hf
engine is bitwise batch-invariant; this one is not).
"""

from __future__ import annotations

import copy
import gc
import hashlib
import importlib.util
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from posttrain.models.load import is_peft
from posttrain.rollout.base import SamplingParams
from posttrain.types import FinishReason, Rollout

# vLLM samples greedily below this temperature (vllm/v1/sample/sampler.py, _SAMPLING_EPS).
VLLM_GREEDY_BELOW = 1e-5
ENGINE_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# ---------------------------------------------------------------------------- pure functions


def vllm_unavailable() -> str | None:
    """Why the vllm engine cannot run on this machine (None when it can). Imports nothing."""
    if importlib.util.find_spec("vllm") is None:
        return "the vllm package is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (the colocated vLLM engine runs on the trainer's GPU)"
    return None


def matching_logprobs_modes(params: SamplingParams) -> list[str]:
    """The vLLM ``logprobs_mode`` values whose logprob of the sampled token is ours,
    ``log softmax(logits / T)`` over the full vocabulary, under ``params``; preferred first."""
    if 0 < params.temperature < VLLM_GREEDY_BELOW:
        return []  # vLLM samples greedily and reports T = 1 values; we would divide by T
    modes = []
    if params.temperature <= 0 or params.temperature == 1.0:
        modes.append("raw_logprobs")
    if params.temperature <= 0 or (params.top_k == 0 and params.top_p >= 1.0):
        modes.append("processed_logprobs")  # greedy: vLLM resets top-k/top-p and applies no T
    return modes


def logprobs_mode_problem(params: SamplingParams) -> str | None:
    """Why no vLLM logprobs mode reports our logprobs under ``params`` (None: one does)."""
    if matching_logprobs_modes(params):
        return None
    if 0 < params.temperature < VLLM_GREEDY_BELOW:
        return (f"temperature {params.temperature} is below vLLM's greedy threshold {VLLM_GREEDY_BELOW}: vLLM "
                "would sample greedily and report logprobs at temperature 1")
    return (f"with temperature {params.temperature} and top_k {params.top_k} / top_p {params.top_p}, no vLLM "
            "logprobs_mode reports log softmax(logits / T) over the full vocabulary (processed_logprobs is "
            "renormalised over the top-k/top-p tokens, raw_logprobs ignores the temperature)")


def require_logprobs_mode(mode: str, params: SamplingParams) -> None:
    """Raise when an engine built with ``mode`` would report other logprobs than ours."""
    if mode not in matching_logprobs_modes(params):
        why = logprobs_mode_problem(params) or f"these settings need {matching_logprobs_modes(params)}"
        raise ValueError(f"the vLLM engine reports {mode}, which are not the trainer's logprobs here: {why}")


def weight_updates(model: torch.nn.Module) -> int:
    """How many in-place updates ``model``'s parameters have had (torch's per-tensor version
    counters, which every optimizer step bumps): changed = the weights changed."""
    return sum(p._version for p in model.parameters())


def require_fresh(engine_version: int | None, version: int, synced_updates: int | None = None,
                  updates: int | None = None) -> None:
    """Raise unless the engine holds the weights of the trainer's current policy version, and the
    trainer's weights have not been updated since they were copied (``synced_updates`` vs
    ``updates``, from ``weight_updates``)."""
    if engine_version is None:
        raise RuntimeError("the vLLM engine holds no policy weights yet: call sync(model, version) first")
    if engine_version != version:
        raise RuntimeError(
            f"stale vLLM engine: it holds the weights of policy version {engine_version}, but the trainer is "
            f"at version {version}; call sync(model, {version}) after updating the policy (sampling now "
            "would train on rollouts of old weights)")
    if synced_updates != updates:
        raise RuntimeError(
            f"stale vLLM engine: the trainer's weights changed since sync(model, {version}) copied them (an "
            "optimizer step without a sync); call sync after updating the policy (sampling now would train "
            "on rollouts of old weights)")


def request_seed(seed: int, key: int) -> int:
    """The seed of prompt ``key``'s request (vLLM adds the sample index for each of its n)."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**62 - 1)  # room for + n within int64


def request_params(params: SamplingParams, key: int, stop_token_ids: Sequence[int]) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` for prompt ``key``: the sampled token's logprob
    only (``logprobs=0``), EOS as a stop token (kept in the ids, as the hf engine keeps it), stop
    strings kept in the output, no detokenisation unless stop strings need it."""
    return {
        "n": params.n, "temperature": max(params.temperature, 0.0), "top_p": params.top_p,
        "top_k": params.top_k if params.top_k > 0 else -1,  # -1 = off in every vLLM version
        "max_tokens": params.max_new_tokens, "stop": list(params.stop) or None,
        "stop_token_ids": list(stop_token_ids), "include_stop_str_in_output": True,
        "detokenize": bool(params.stop), "seed": request_seed(params.seed, key), "logprobs": 0,
    }


def finish_reason(reason: Any) -> FinishReason:
    if reason in ("stop", "length"):
        return reason
    raise RuntimeError(f"vLLM ended a completion with finish reason {reason!r} (expected 'stop' or 'length')")


def sampled_logprobs(token_ids: Sequence[int], steps: Sequence[Mapping[int, Any]] | None) -> list[float]:
    """The logprob of each sampled token from vLLM's per-step ``{token id: Logprob}`` maps."""
    if steps is None or len(steps) != len(token_ids):
        raise RuntimeError(f"vLLM returned {0 if steps is None else len(steps)} logprob steps for "
                           f"{len(token_ids)} tokens (the request must ask for logprobs=0)")
    out = []
    for t, (token, step) in enumerate(zip(token_ids, steps)):
        if token not in step:
            raise RuntimeError(f"vLLM's logprobs at step {t} do not include the sampled token {token}")
        value = step[token]
        out.append(float(getattr(value, "logprob", value)))
    return out


def to_rollouts(outputs: Sequence[Any], prompts: Sequence[Sequence[int]], keys: Sequence[int], n: int,
                version: int, decode: Callable[[list[int]], str]) -> list[Rollout]:
    """vLLM ``RequestOutput``s (one per prompt, in prompt order) -> rollouts grouped by prompt:
    prompt 0's n samples (by ``CompletionOutput.index``), then prompt 1's, ..."""
    if len(outputs) != len(prompts):
        raise RuntimeError(f"vLLM returned {len(outputs)} results for {len(prompts)} prompts")
    rollouts = []
    for prompt, key, request in zip(prompts, keys, outputs):
        echoed = getattr(request, "prompt_token_ids", None)
        if echoed is not None and list(echoed) != list(prompt):
            raise RuntimeError(f"vLLM saw other prompt ids than prompt {key}'s: token-in/token-out broken")
        samples = sorted(request.outputs, key=lambda sample: sample.index)
        if len(samples) != n:
            raise RuntimeError(f"vLLM returned {len(samples)} completions of prompt {key}, not n = {n}")
        for j, sample in enumerate(samples):
            ids = [int(t) for t in sample.token_ids]
            rollouts.append(Rollout(
                prompt_ids=list(prompt), completion_ids=ids, logprobs=sampled_logprobs(ids, sample.logprobs),
                finish_reason=finish_reason(sample.finish_reason), text=decode(ids), prompt_index=key,
                sample_index=j, policy_version=version))
    return rollouts


def vllm_weight_name(name: str) -> str | None:
    """A trainer parameter name -> the name vLLM's ``load_weights`` takes (HF naming), or None for
    what is not a model weight: LoRA factors (merged into the base weight first) and PEFT's saved
    originals."""
    name = name.removeprefix("_orig_mod.").removeprefix("base_model.model.")
    if ".lora_" in name or ".original_module." in name:
        return None
    return name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")


# ---------------------------------------------------------------------------- vLLM-facing parts


@contextmanager
def policy_weights(model: torch.nn.Module) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """(vLLM name, tensor) of every weight of ``model``; LoRA adapters are merged in while the
    caller copies them and unmerged after."""
    merged = is_peft(model)
    if merged:
        model.merge_adapter()
    try:
        named = ((vllm_weight_name(n), p.detach()) for n, p in model.named_parameters())
        yield [(n, p) for n, p in named if n is not None]
    finally:
        if merged:
            model.unmerge_adapter()


def load_into_engine(llm: Any, weights: list[tuple[str, torch.Tensor]]) -> None:
    """Copy ``weights`` into the engine's model, then drop its prefix cache (stale KV blocks)."""
    if callable(getattr(getattr(llm, "llm_engine", None), "apply_model", None)):
        llm.apply_model(lambda engine_model: engine_model.load_weights(weights))  # in-process: no pickling
    else:  # older vLLM: TRL's colocate path
        llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(weights)
    if llm.reset_prefix_cache() is False:
        raise RuntimeError("vLLM could not reset its prefix cache after the weight update")


def engine_dtype(model: torch.nn.Module, setting: str) -> str:
    """The engine's dtype: ``setting``, or with "model" the trainer's parameter dtype."""
    if setting != "model":
        return setting
    dtype = next(model.parameters()).dtype
    if dtype not in ENGINE_DTYPES:
        raise ValueError(f"the model's parameters are {dtype}; set sampling.vllm.dtype to bfloat16 or float16")
    return ENGINE_DTYPES[dtype]


def write_engine_folder(model: torch.nn.Module, tokenizer: Any, folder: Path) -> None:
    """What vLLM reads at start-up: config.json (with ``architectures``, by which it picks its model
    class) and the tokenizer. The weights come by ``sync`` (the engine starts from dummy ones)."""
    base = model.get_base_model() if is_peft(model) else model
    config = copy.deepcopy(base.config)
    config.architectures = [type(base).__name__]
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def build_llm(folder: Path, *, dtype: str, logprobs_mode: str, gpu_memory_utilization: float, enforce_eager: bool,
              max_model_len: int | None) -> Any:
    """A vLLM engine in this process on this process's GPU, with dummy weights."""
    # The engine core must live in this process for sync to reach its model (see the module doc).
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import vllm

    kwargs: dict[str, Any] = dict(
        model=str(folder), tokenizer=str(folder), dtype=dtype, load_format="dummy", seed=0,
        gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
        max_model_len=max_model_len, logprobs_mode=logprobs_mode)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: one engine per process, in its process group
        kwargs["distributed_executor_backend"] = "external_launcher"
    try:
        return vllm.LLM(**kwargs)
    except TypeError as err:
        if "logprobs_mode" in str(err):
            raise RuntimeError(f"vllm {getattr(vllm, '__version__', '?')} has no logprobs_mode; the vllm engine "
                               "needs vLLM 0.10.2 or newer (processed_logprobs)") from err
        raise


class VLLMSampler:
    """Samples completions with a colocated vLLM engine. Implements the Sampler protocol.

    ``sampling`` is the stage's sampling (it fixes the engine's logprobs mode); ``generate`` takes
    any params that mode reports our logprobs for (e.g. the greedy ReMax baseline).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, sampling: SamplingParams, *,
                 gpu_memory_utilization: float = 0.3, enforce_eager: bool = False, dtype: str = "model",
                 max_model_len: int | None = None, show_progress: bool = False) -> None:
        modes = matching_logprobs_modes(sampling)
        if not modes:
            raise ValueError(logprobs_mode_problem(sampling))
        self.logprobs_mode = modes[0]
        self.tokenizer, self.show_progress = tokenizer, show_progress
        self.stop_token_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self._folder = tempfile.TemporaryDirectory(prefix="posttrain-vllm-")
        write_engine_folder(model, tokenizer, Path(self._folder.name))
        limit = getattr(model.config, "max_position_embeddings", None)
        if max_model_len is not None and limit is not None:
            max_model_len = min(max_model_len, limit)
        self.llm = build_llm(Path(self._folder.name), dtype=engine_dtype(model, dtype),
                             logprobs_mode=self.logprobs_mode, gpu_memory_utilization=gpu_memory_utilization,
                             enforce_eager=enforce_eager, max_model_len=max_model_len)
        self.version = 0
        self.engine_version: int | None = None
        self.model, self.synced_updates = model, None
        self.sync(model, 0)

    @torch.no_grad()
    def sync(self, model: torch.nn.Module, version: int) -> None:
        """Load ``model``'s current weights into the engine as policy ``version``. The trainer's
        version moves first: should the load fail, the engine stays stale and ``generate`` refuses."""
        self.version, self.model = version, model
        with policy_weights(model) as weights:
            load_into_engine(self.llm, weights)
        self.engine_version, self.synced_updates = version, weight_updates(model)

    def generate(self, prompts: list[list[int]], params: SamplingParams, keys: list[int] | None = None
                 ) -> list[Rollout]:
        """Rollouts grouped by prompt; ``keys`` seed the prompts (default: their positions) and
        become ``prompt_index``. Raises on a stale engine or on params whose logprobs the engine's
        mode does not report as ours."""
        keys = list(range(len(prompts))) if keys is None else list(keys)
        require_fresh(self.engine_version, self.version, self.synced_updates, weight_updates(self.model))
        require_logprobs_mode(self.logprobs_mode, params)
        if not prompts:
            return []
        from vllm import SamplingParams as VLLMSamplingParams

        requests = [VLLMSamplingParams(**request_params(params, key, self.stop_token_ids)) for key in keys]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], requests,
                                    use_tqdm=self.show_progress)
        return to_rollouts(outputs, prompts, keys, params.n, self.version, self._decode)

    def close(self) -> None:
        """Free the engine's GPU memory (weights and KV cache) for whatever runs next."""
        self.llm = None
        self.engine_version = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
