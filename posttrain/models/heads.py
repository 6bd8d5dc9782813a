"""Scalar, multi-head, process and value heads on a causal-LM backbone, saved HF-compatibly.

A `RewardModel` keeps the whole causal LM (vocabulary projection included, so the same artifact
can initialise a PPO critic or be inspected as a policy) and adds one linear map ``score``
[H -> K] from the final hidden states to K named outputs. No logits over the vocabulary are ever
computed. Which hidden state a head reads is the caller's choice:

- ``kind="reward"``: K heads (one scalar reward, or named objectives such as helpfulness and
  harmlessness), each read at a sequence's last token: the end-of-turn token the renderer
  appends to the response (callers cut the sequence right after it);
- ``kind="prm"``: one head read at the last token of every reasoning step (``meta["separator"]``
  says how steps are split);
- ``kind="value"``: one head read at every token, ``values(...) -> [B, T]`` (PPO's critic).

Saved layout (``save_reward_model``), under ``<artifact>/model/``:

- ``config.json`` + ``model.safetensors``: when the backbone's architecture has a matching
  transformers class, exactly that class's checkpoint: ``<Arch>ForSequenceClassification`` for
  ``reward`` (``score.weight`` [K, H], ``num_labels = K``, ``id2label`` = head names,
  ``pad_token_id`` set), ``<Arch>ForTokenClassification`` for ``prm`` and ``value`` (no bias,
  no dropout). ``AutoModelForSequenceClassification.from_pretrained`` then returns the same
  rewards, provided the pad token differs from the end-of-turn token (it pools at the last
  non-pad token; ``reward_head.json`` records whether that holds);
- ``lm_head.safetensors``: the untied vocabulary projection, which those classes do not hold;
- otherwise (no matching class) ``save_pretrained`` of the causal LM and ``reward_head.safetensors``;
- ``reward_head.json``: ``kind``, ``heads``, ``layout``, the backbone's causal-LM class, ``meta``;
- the tokenizer files.

``load_reward_model`` reads every layout back into a `RewardModel`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from posttrain.errors import UserError, problem
from posttrain.models.block_attention import BlockLayout
from posttrain.models.forward import hidden_states
from posttrain.models.load import MODEL_DIR, decoder_and_head, is_peft

KINDS = ("reward", "prm", "value")
HEAD_FILE = "reward_head.json"
LM_HEAD_FILE = "lm_head.safetensors"
FALLBACK_HEAD_FILE = "reward_head.safetensors"
FORMAT_VERSION = 1
_HF_SUFFIX = {"reward": "ForSequenceClassification", "prm": "ForTokenClassification", "value": "ForTokenClassification"}


class RewardModel(nn.Module):
    """A causal-LM backbone and a linear head [H -> K] over its final hidden states.

    Shapes: B sequences, T tokens, H hidden size, K heads, N read positions.
    """

    def __init__(self, backbone: PreTrainedModel, head_names: Sequence[str] = ("reward",), *, kind: str = "reward",
                 meta: dict[str, Any] | None = None, init_seed: int = 0) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown head kind {kind!r}; use one of {KINDS}")
        if kind != "reward" and len(head_names) != 1:
            raise ValueError(f"a {kind} model has exactly one head, got {list(head_names)}")
        if len(set(head_names)) != len(head_names):
            raise ValueError(f"head names must be unique, got {list(head_names)}")
        self.backbone = backbone
        self.kind, self.head_names, self.meta = kind, list(head_names), dict(meta or {})
        hidden = backbone.config.get_text_config().hidden_size
        parameter = next(backbone.parameters())
        self.score = nn.Linear(hidden, len(self.head_names), bias=False, device="meta")
        # Seeded apart from the global RNG, so adding a head never shifts a stage's data order.
        generator = torch.Generator().manual_seed(init_seed)
        std = getattr(backbone.config, "initializer_range", 0.02)
        weight = torch.randn(self.score.weight.shape, generator=generator) * std
        self.score.weight = nn.Parameter(weight.to(device=parameter.device, dtype=parameter.dtype))

    @property
    def config(self) -> Any:
        return self.backbone.config

    def hidden(self, input_ids: torch.Tensor, position_ids: torch.Tensor, blocks: BlockLayout | None = None
               ) -> torch.Tensor:
        """Final hidden states [B, T, H] of right-padded rows (causal attention needs no mask),
        or of one packed row [1, T] whose attention follows ``blocks`` (no padding; responses
        that share one copy of their prompt; see ``posttrain.models.block_attention``)."""
        return hidden_states(self.backbone, input_ids, position_ids, blocks)

    def scores_at(self, input_ids: torch.Tensor, position_ids: torch.Tensor, rows: torch.Tensor,
                  columns: torch.Tensor, blocks: BlockLayout | None = None) -> torch.Tensor:
        """Head outputs [N, K] at the N positions (rows[i], columns[i]); only those hidden
        states go through the head."""
        hidden = self.hidden(input_ids, position_ids, blocks)
        return self.score(hidden[rows, columns]).float()

    def rewards(self, input_ids: torch.Tensor, position_ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Rewards [B, K] of right-padded sequences, read at ``last`` [B] (each one's last token)."""
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return self.scores_at(input_ids, position_ids, rows, last)

    forward = rewards

    def token_scores(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Head outputs at every token [B, T, K]."""
        return self.score(self.hidden(input_ids, position_ids)).float()

    def values(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Per-token values [B, T] of a one-head model (a PPO critic, or a reward model used as one)."""
        if len(self.head_names) != 1:
            raise ValueError(f"values() needs a one-head model; this one has heads {self.head_names}")
        return self.token_scores(input_ids, position_ids)[..., 0]

    def merged(self) -> RewardModel:
        """This model with LoRA adapters merged into the backbone (itself when there are none)."""
        if is_peft(self.backbone):
            self.backbone = self.backbone.merge_and_unload()
        return self


def value_model(backbone: PreTrainedModel, init_seed: int = 0) -> RewardModel:
    """A fresh per-token value head on ``backbone`` (PPO's critic)."""
    return RewardModel(backbone, ("value",), kind="value", init_seed=init_seed)


# ---------------------------------------------------------------- saving


@dataclass(frozen=True)
class HeadInfo:
    """What ``reward_head.json`` records."""

    kind: str
    heads: list[str]
    layout: str  # "hf" (an <Arch>For...Classification checkpoint) or "causal_lm" (+ reward_head.safetensors)
    backbone_architecture: str
    hf_pooling_matches: bool  # AutoModelForSequenceClassification reads the same token as we do
    meta: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, **self.__dict__}


def _hf_class_name(backbone: PreTrainedModel, kind: str) -> str | None:
    """The transformers class that can hold this backbone + head, if its weights line up."""
    import transformers

    causal = type(backbone).__name__
    if not causal.endswith("ForCausalLM"):
        return None
    name = causal.removesuffix("ForCausalLM") + _HF_SUFFIX[kind]
    cls = getattr(transformers, name, None)
    if cls is None or getattr(cls, "base_model_prefix", None) != backbone.base_model_prefix:
        return None
    return name


def _classification_config(backbone: PreTrainedModel, model: RewardModel, class_name: str, pad_id: int | None):
    config = copy.deepcopy(backbone.config)
    config.architectures = [class_name]
    config.num_labels = len(model.head_names)
    config.id2label = dict(enumerate(model.head_names))
    config.label2id = {name: i for i, name in enumerate(model.head_names)}
    config.pad_token_id = pad_id
    if model.kind != "reward":
        config.token_classification_bias = False  # our head has no bias
        config.classifier_dropout = 0.0
    return config


def save_reward_model(model: RewardModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> Path:
    """Write the model (LoRA merged) and tokenizer under ``out_dir/model``; returns that folder."""
    folder = out_dir / MODEL_DIR
    folder.mkdir(parents=True, exist_ok=True)
    backbone = model.merged().backbone
    class_name = _hf_class_name(backbone, model.kind)
    score = model.score.weight.detach().contiguous()
    if class_name is not None:
        state = {k: v.detach().contiguous() for k, v in backbone.state_dict().items() if not k.startswith("lm_head.")}
        save_file({**state, "score.weight": score}, str(folder / "model.safetensors"), metadata={"format": "pt"})
        _classification_config(backbone, model, class_name, tokenizer.pad_token_id).save_pretrained(folder)
        if not backbone.config.get_text_config().tie_word_embeddings:
            _, head = decoder_and_head(backbone)
            save_file({"lm_head.weight": head.weight.detach().contiguous()}, str(folder / LM_HEAD_FILE),
                      metadata={"format": "pt"})
    else:
        backbone.save_pretrained(folder, safe_serialization=True)
        save_file({"score.weight": score}, str(folder / FALLBACK_HEAD_FILE), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)
    pooling = tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    info = HeadInfo(model.kind, model.head_names, "hf" if class_name else "causal_lm", type(backbone).__name__,
                    pooling and model.kind == "reward", model.meta)
    (folder / HEAD_FILE).write_text(json.dumps(info.as_dict(), indent=2))
    return folder


def read_head_info(folder: Path) -> HeadInfo:
    """The ``reward_head.json`` of an artifact (or of its ``model/`` folder)."""
    folder = folder / MODEL_DIR if (folder / MODEL_DIR).is_dir() else folder
    path = folder / HEAD_FILE
    if not path.exists():
        raise UserError(problem(str(folder), f"not a reward model (no {HEAD_FILE})",
                                "point at the artifact folder of a reward_model or prm stage"))
    raw = json.loads(path.read_text())
    return HeadInfo(raw["kind"], list(raw["heads"]), raw["layout"], raw["backbone_architecture"],
                    bool(raw.get("hf_pooling_matches")), dict(raw.get("meta") or {}))


def load_reward_model(folder: Path, *, dtype: torch.dtype = torch.float32
                      ) -> tuple[RewardModel, PreTrainedTokenizerBase]:
    """What ``save_reward_model`` wrote (any layout), in eval mode."""
    folder = folder / MODEL_DIR if (folder / MODEL_DIR).is_dir() else folder
    info = read_head_info(folder)
    if info.layout == "hf":
        config = AutoConfig.from_pretrained(folder)
        config.architectures = [info.backbone_architecture]
        backbone = AutoModelForCausalLM.from_config(config, dtype=dtype)
        state = load_file(str(folder / "model.safetensors"))
        score = state.pop("score.weight")
        if (folder / LM_HEAD_FILE).exists():
            state.update(load_file(str(folder / LM_HEAD_FILE)))
        missing, unexpected = backbone.load_state_dict(state, strict=False)
        tied = config.get_text_config().tie_word_embeddings
        if unexpected or [k for k in missing if not (tied and k.startswith("lm_head."))]:
            raise UserError(problem(str(folder), f"weights do not match the backbone (missing {missing[:3]}, "
                                    f"unexpected {unexpected[:3]})", "re-save the reward model"))
        backbone.tie_weights()
    else:
        backbone = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        score = load_file(str(folder / FALLBACK_HEAD_FILE))["score.weight"]
    model = RewardModel(backbone, info.heads, kind=info.kind, meta=info.meta)
    with torch.no_grad():
        model.score.weight.copy_(score)
    return model.eval(), AutoTokenizer.from_pretrained(str(folder))
