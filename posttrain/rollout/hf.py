"""The ``hf`` rollout engine: batched sampling on transformers with a KV cache.

The n samples of a prompt share one prefill (the cache is repeated after it). Returned token ids
are exactly the sampled ones; logprobs are ``log softmax(logits / temperature)`` over the full
vocabulary, the same quantity the trainer computes (top-p / top-k change what can be sampled,
not the reported logprob). Temperature 0 is greedy and deterministic.

Sampling is *batch-invariant*: each (prompt key, sample index) row draws its uniforms from its own
generator seeded by (seed, key, sample), and tokens are picked by inverse CDF. So a prompt gets
the same completions whatever else is in its batch, and however prompts are split over
processes; the global RNG is never touched.
"""

from __future__ import annotations

import hashlib
import inspect

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

try:  # transformers >= 4.56 keeps per-layer cache objects; older ones keep the plain copy path
    from transformers.cache_utils import DynamicLayer
except ImportError:  # pragma: no cover
    DynamicLayer = None

from posttrain.monitoring.progress import StepProgress
from posttrain.rollout.base import SamplingParams
from posttrain.types import Rollout

__all__ = ["HFSampler", "SamplingParams"]

# transformers 5 renamed ``past_key_values`` to ``cache``; accept both.
_CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def _cache_of(output):
    return output.cache if hasattr(output, "cache") else output.past_key_values


class HFSampler:
    """Samples completions from a causal LM. Implements the Sampler protocol."""

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, *, batch_size: int = 64,
                 show_progress: bool = False) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.version = 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def sync(self, model: torch.nn.Module, version: int) -> None:
        """Samples come from the trainer's own module, so there are no weights to copy: the
        version is recorded (and ``model`` adopted, should it be another module)."""
        self.model, self.version = model, version

    def close(self) -> None:
        """Nothing to release: the model is the trainer's."""

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams, keys: list[int] | None = None
                 ) -> list[Rollout]:
        """Rollouts grouped by prompt: prompt 0's n samples first, then prompt 1's, ...

        ``keys`` name the prompts for seeding (default: their positions); ``prompt_index`` of the
        rollouts is the key.
        """
        keys = list(range(len(prompts))) if keys is None else list(keys)
        was_training = self.model.training
        self.model.eval()
        per_batch = max(1, self.batch_size // max(params.n, 1))
        out: list[Rollout] = []
        progress = StepProgress("generate", len(prompts), enabled=self.show_progress)
        try:
            for start in range(0, len(prompts), per_batch):
                chunk = prompts[start : start + per_batch]
                out.extend(self._generate_batch(chunk, params, keys[start : start + per_batch]))
                progress.update(len(chunk))
        finally:
            progress.close()
            self.model.train(was_training)
        return out

    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams, keys: list[int]) -> list[Rollout]:
        device, n = self.device, params.n
        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every prompt ends at the same column
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1)
        cache = _cache_of(out)
        logits = out.logits[:, -1].float()
        if n > 1:
            cache.batch_repeat_interleave(n)
            logits = logits.repeat_interleave(n, 0)
            mask = mask.repeat_interleave(n, 0)
            positions = positions.repeat_interleave(n, 0)
        _reserve(cache, min(params.max_new_tokens, 256))
        rows = logits.shape[0]
        next_pos = positions[:, -1] + 1
        tokens = torch.zeros((rows, params.max_new_tokens), dtype=torch.long)
        logps = torch.zeros((rows, params.max_new_tokens), dtype=torch.float32)
        lengths = torch.full((rows,), params.max_new_tokens, dtype=torch.long)
        done = torch.zeros(rows, dtype=torch.bool)
        eos = self.tokenizer.eos_token_id
        uniforms = _row_uniforms(params, keys, params.max_new_tokens)
        for t in range(params.max_new_tokens):
            choice, logp = _sample(logits, params, uniforms[:, t].to(logits.device))
            tokens[:, t], logps[:, t] = choice.cpu(), logp.cpu()
            finished_now = ~done & (choice.cpu() == eos)
            finished_now |= ~done & self._hit_stop(tokens[:, : t + 1], params.stop)
            lengths[finished_now] = t + 1
            done |= finished_now
            if bool(done.all()) or t + 1 == params.max_new_tokens:
                break
            mask = torch.cat([mask, torch.ones((rows, 1), dtype=mask.dtype, device=device)], dim=1)
            out = self.model(input_ids=choice[:, None].to(device), attention_mask=mask,
                             position_ids=next_pos[:, None], use_cache=True, **{_CACHE_ARG: cache})
            cache, logits = _cache_of(out), out.logits[:, -1].float()
            next_pos = next_pos + 1
        return self._rollouts(prompts, tokens, logps, lengths, done, params, keys)

    def _hit_stop(self, tokens: torch.Tensor, stop: list[str]) -> torch.Tensor:
        if not stop:
            return torch.zeros(tokens.shape[0], dtype=torch.bool)
        tail = self.tokenizer.batch_decode(tokens[:, -8:])
        return torch.tensor([any(s in text for s in stop) for text in tail])

    def _rollouts(self, prompts, tokens, logps, lengths, done, params, keys) -> list[Rollout]:
        out = []
        for row in range(tokens.shape[0]):
            k = int(lengths[row])
            completion = tokens[row, :k].tolist()
            out.append(Rollout(
                prompt_ids=list(prompts[row // params.n]), completion_ids=completion,
                logprobs=logps[row, :k].tolist(), finish_reason="stop" if bool(done[row]) else "length",
                text=self.tokenizer.decode(completion, skip_special_tokens=True),
                prompt_index=keys[row // params.n], sample_index=row % params.n,
                policy_version=self.version,
            ))
        return out


class _ReservedLayer(DynamicLayer or object):
    """A DynamicLayer (same lengths, masks and semantics) that keeps its keys and values in a
    buffer with spare room, doubled when full: appending a token writes one slot instead of
    copying the whole cache (``torch.cat``) in every layer at every step. On CPU those copies were
    about a quarter of the decode ops' time for a 15M-parameter model; without them generation
    is 11-13% faster (same samples). ``keys``/``values`` are views of the filled part; any other
    edit (crop, reorder, reset) turns the layer back into a plain DynamicLayer first."""

    def reserve(self, extra: int) -> None:
        self._length = self.keys.shape[-2]
        self._resize(self._length + extra)

    def _resize(self, capacity: int) -> None:
        keys, values = self.keys, self.values
        self._keys = keys.new_empty(*keys.shape[:2], capacity, keys.shape[-1])
        self._values = values.new_empty(*values.shape[:2], capacity, values.shape[-1])
        self._keys[:, :, : self._length] = keys
        self._values[:, :, : self._length] = values
        self.keys, self.values = self._keys[:, :, : self._length], self._values[:, :, : self._length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self._length + key_states.shape[-2]
        if end > self._keys.shape[-2]:
            self._resize(max(end, 2 * self._keys.shape[-2]))
        self._keys[:, :, self._length : end] = key_states
        self._values[:, :, self._length : end] = value_states
        self._length = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values

    def _plain(self) -> None:
        self.keys, self.values = self.keys.contiguous(), self.values.contiguous()
        del self._keys, self._values, self._length
        self.__class__ = DynamicLayer

    def crop(self, tokens_to_remove: int) -> None:
        self._plain()
        self.crop(tokens_to_remove)

    def reset(self) -> None:
        self._plain()
        self.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._plain()
        self.reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._plain()
        self.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._plain()
        self.batch_select_indices(indices)


def _reserve(cache, extra: int) -> None:
    """Room for ``extra`` more tokens in every plain dynamic layer of ``cache`` (others untouched)."""
    for layer in getattr(cache, "layers", []) if DynamicLayer is not None else []:
        if type(layer) is DynamicLayer and layer.is_initialized and layer.get_seq_length() > 0:
            layer.__class__ = _ReservedLayer
            layer.reserve(extra)


def _row_uniforms(params: SamplingParams, keys: list[int], steps: int) -> torch.Tensor:
    """[rows, steps] uniforms; row (key, sample) always gets the same stream for a seed."""
    out = torch.empty(len(keys) * params.n, steps)
    for i, key in enumerate(keys):
        for j in range(params.n):
            digest = hashlib.blake2b(f"{params.seed}:{key}:{j}".encode(), digest_size=8).digest()
            g = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
            out[i * params.n + j] = torch.rand(steps, generator=g)
    return out


def _sample(logits: torch.Tensor, params: SamplingParams, uniform: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the next token per row (inverse CDF of the filtered distribution at ``uniform``);
    return it and its logprob under softmax(logits / T)."""
    if params.temperature <= 0:
        choice = logits.argmax(-1)
        return choice, torch.log_softmax(logits, -1).gather(1, choice[:, None]).squeeze(1)
    scaled = logits / params.temperature if params.temperature != 1.0 else logits
    logprobs = torch.log_softmax(scaled, -1)
    cdf = torch.softmax(_filter(scaled, params.top_k, params.top_p), -1).cumsum(-1)
    choice = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True).squeeze(1)
    choice = choice.clamp(max=logits.shape[-1] - 1)
    return choice, logprobs.gather(1, choice[:, None]).squeeze(1)


def _filter(scaled: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k and top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_logits, -1) > top_p  # keep the token that crosses p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        scaled = torch.full_like(scaled, float("-inf")).scatter(1, order, sorted_logits)
    return scaled
