"""Reference log-probabilities: computed once, before training, and cached on disk.

The cache key is the reference model's identity (its artifact key, or its config), the exact
token ids and masks scored, and the code version; so changing only the learning rate reuses the
cache, and changing the data, the tokenisation or the reference recomputes it. While training,
the reference model is not in memory: its numbers are.

Which model is the reference:
- ``reference.from: STAGE``: that stage's model, loaded for the pass and freed;
- default with LoRA: the policy with its adapters disabled (its base weights never change);
- default without LoRA: the starting model. Before any training step that is the policy itself;
  when resuming a stage that already trained, the starting model is loaded again from its source.
"""

from __future__ import annotations

import gc
import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from posttrain.data.pairs import collate_sequences
from posttrain.loops.distributed import broadcast_object
from posttrain.loops.state import atomic_write_bytes, latest_checkpoint
from posttrain.models.forward import sequence_logprobs
from posttrain.models.load import is_peft
from posttrain.monitoring.progress import StepProgress
from posttrain.provenance import code_version
from posttrain.stages.common import StageContext, load_artifact_model, root_model_config, starting_model
from posttrain.types import TokenizedExample


def reference_identity(ctx: StageContext) -> str:
    """What the reference model is, as a string that changes whenever its weights could."""
    chosen = ctx.config.reference.from_ or ctx.config.from_
    if chosen:
        return f"artifact:{ctx.parents[chosen].name}"
    _, model = root_model_config(ctx)
    return "config:" + json.dumps(model.model_dump(mode="json", exclude={"lora"}), sort_keys=True)


def _cache_key(identity: str, sequences: list[TokenizedExample]) -> str:
    digest = hashlib.sha256(identity.encode())
    digest.update(code_version().encode())
    for s in sequences:
        digest.update(json.dumps([s.input_ids, s.loss_mask]).encode())
    return digest.hexdigest()[:24]


def cached_reference_logprobs(ctx: StageContext, policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                              sequences: list[TokenizedExample], *, batch_size: int, chunk: int
                              ) -> tuple[torch.Tensor, bool]:
    """Summed reference logp of each sequence's targets [N], and whether the cache had it."""
    key = _cache_key(reference_identity(ctx), sequences)
    path = ctx.workdir / "cache" / "reference" / f"{key}.safetensors"
    hit = path.exists()
    if not hit:
        values = None
        if ctx.dist.is_main:
            with _reference_model(ctx, policy, tokenizer) as model:
                values = score_sequences(model, sequences, tokenizer.pad_token_id, batch_size=batch_size,
                                         chunk=chunk, show_progress=ctx.show_progress)
            _save(path, values)
        values = broadcast_object(values, ctx.dist)
        return values, False
    return load_file(str(path))["logps"], True


def _save(path: Path, values: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"logps": values.contiguous()}, str(tmp))
    atomic_write_bytes(path, tmp.read_bytes())
    tmp.unlink()


@torch.no_grad()
def score_sequences(model: torch.nn.Module, sequences: list[TokenizedExample], pad_id: int, *, batch_size: int,
                    chunk: int, show_progress: bool = False) -> torch.Tensor:
    """Summed target logp per sequence [N] (fp32), with the training code path, in length order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = torch.zeros(len(sequences), dtype=torch.float32)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    progress = StepProgress("reference log-probs", len(sequences), enabled=show_progress)
    try:
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            batch = collate_sequences([sequences[i] for i in index], index, pad_id).to(device)
            sums, _ = sequence_logprobs(model, batch.input_ids, batch.position_ids, batch.target_mask, chunk=chunk)
            out[torch.tensor(index)] = sums.float().cpu()
            progress.update(len(index))
    finally:
        progress.close()
        model.train(was_training)
    return out


@contextmanager
def _reference_model(ctx: StageContext, policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
                     ) -> Iterator[torch.nn.Module]:
    other = ctx.config.reference.from_
    if other:
        model = load_artifact_model(ctx.parents[other])
    elif is_peft(policy):
        with policy.disable_adapter():
            yield policy
        return
    elif latest_checkpoint(ctx.out_dir / "checkpoints") is None:
        yield policy  # nothing trained yet: the policy is the starting model
        return
    else:
        model = starting_model(ctx, tokenizer)
    model.to(next(policy.parameters()).device)
    try:
        yield model
    finally:
        del model
        gc.collect()
