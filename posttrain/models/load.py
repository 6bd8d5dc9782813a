"""Loading, LoRA and saving of causal LMs.

Models load by local path or Hugging Face hub id through ``AutoModelForCausalLM`` (weights are only
fetched from the hub where the user has network; tests build tiny models instead). Saves are
``save_pretrained`` of model and tokenizer, so transformers and vLLM load them back.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from posttrain.config.components import LoraConfig, ModelConfig
from posttrain.errors import UserError, problem
from posttrain.models.tiny import BUILTIN_TEMPLATES, build_tiny_llama

ADAPTER_DIR = "adapter"
MODEL_DIR = "model"

# Builtin tokenizers: name -> a function that trains it (deterministically) on a builtin corpus.
BUILTIN_TOKENIZERS: dict[str, Callable[[], PreTrainedTokenizerBase]] = {}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _looks_local(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or Path(spec).expanduser().exists()


def load_tokenizer(spec: str, *, where: str, base_dir: Path | None = None,
                   chat_template: str | None = None, revision: str | None = None,
                   trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """A tokenizer from a path, a hub id or ``builtin:NAME``; errors name ``where`` and the fix."""
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        if name not in BUILTIN_TOKENIZERS:
            _import_builtin_providers()
        if name not in BUILTIN_TOKENIZERS:
            raise UserError(problem(where, f"unknown builtin tokenizer {name!r}",
                                    "use one of: " + ", ".join(f"builtin:{n}" for n in BUILTIN_TOKENIZERS)))
        tokenizer = BUILTIN_TOKENIZERS[name]()
    else:
        path = _resolve(spec, base_dir)
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                str(path) if path else spec, revision=revision, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError) as err:
            raise UserError(problem(where, f"cannot load tokenizer {spec!r}: {_first_line(err)}",
                                    "check the path, or the hub id and your network")) from err
    if chat_template:
        tokenizer.chat_template = chat_template_text(chat_template, where, base_dir)
    if tokenizer.pad_token_id is None:
        # Padding positions are never targets and never attended to, so any id works.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def chat_template_text(spec: str, where: str, base_dir: Path | None) -> str:
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec]
    if "{%" in spec or "{{" in spec:
        return spec
    path = _resolve(spec, base_dir)
    if path is None or not path.is_file():
        raise UserError(problem(f"{where}.chat_template", f"no template file {spec!r}",
                                "use 'chatml', a .jinja file path, or an inline template"))
    return path.read_text(encoding="utf-8")


def resolve_local(spec: str, base_dir: Path | None) -> Path | None:
    """A model/tokenizer spec as a local path (relative to the recipe), or None for a hub id."""
    return _resolve(spec, base_dir)


def _resolve(spec: str, base_dir: Path | None) -> Path | None:
    """A local path (relative to the recipe) if ``spec`` names one; None for a hub id."""
    p = Path(spec).expanduser()
    if not p.is_absolute() and base_dir is not None and (base_dir / p).exists():
        p = base_dir / p
    if p.exists():
        return p
    if _looks_local(spec):
        return p  # a local-looking path that does not exist: let the loader report it
    return None


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _import_builtin_providers() -> None:
    import posttrain.demo.world  # noqa: F401  (registers builtin:demo)


def check_model_source(cfg: ModelConfig, where: str, base_dir: Path | None) -> list:
    """Problems with a model block that can be found without loading weights."""
    problems = []
    if cfg.path and _looks_local(cfg.path):
        path = _resolve(cfg.path, base_dir)
        if path is None or not path.exists():
            problems.append(problem(f"{where}.path", f"model path {cfg.path!r} does not exist",
                                    "check the path (relative paths start at the recipe's folder)"))
        elif not any((path / f).exists() for f in ("config.json", "HEAD.json", "model/config.json",
                                                    "adapter/adapter_config.json")):
            problems.append(problem(f"{where}.path", f"{cfg.path!r} has no config.json",
                                    "point at a save_pretrained folder, a stage artifact or a workdir"))
    return problems


def load_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, *, where: str,
               base_dir: Path | None = None) -> PreTrainedModel:
    """The model a ``model:`` block describes (LoRA not yet applied)."""
    if cfg.tiny is not None:
        return build_tiny_llama(cfg.tiny, tokenizer, attn_implementation=cfg.attn_implementation)
    assert cfg.path is not None
    path = _resolve(cfg.path, base_dir)
    return load_pretrained(str(path) if path else cfg.path, where=f"{where}.path", dtype=cfg.dtype,
                           attn_implementation=cfg.attn_implementation, revision=cfg.revision,
                           trust_remote_code=cfg.trust_remote_code)


def load_pretrained(spec: str, *, where: str, dtype: str = "float32", attn_implementation: str = "sdpa",
                    revision: str | None = None, trust_remote_code: bool = False) -> PreTrainedModel:
    try:
        return AutoModelForCausalLM.from_pretrained(
            spec, dtype=_DTYPES[dtype], attn_implementation=attn_implementation,
            revision=revision, trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError) as err:
        raise UserError(problem(where, f"cannot load model {spec!r}: {_first_line(err)}",
                                "check the path, or the hub id and your network")) from err


def apply_lora(model: PreTrainedModel, cfg: LoraConfig) -> PreTrainedModel:
    """Wrap the model with fresh LoRA adapters (PEFT); only adapter weights stay trainable."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, task_type="CAUSAL_LM",
        target_modules=cfg.target_modules, modules_to_save=cfg.modules_to_save or None,
    )
    return get_peft_model(model, peft_cfg)


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The transformer body (ids -> final hidden states) and the vocabulary projection.

    Training computes the projection in chunks itself so fp32 [B, T, V] logits never exist whole.
    """
    base = model.get_base_model() if is_peft(model) else model
    return base.get_decoder(), base.get_output_embeddings()


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path,
               *, merge_lora: bool = False) -> None:
    """HF-compatible save. A LoRA model saves its adapter (or merged weights with ``merge_lora``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if is_peft(model) and not merge_lora:
        model.save_pretrained(out_dir / ADAPTER_DIR)
        tokenizer.save_pretrained(out_dir / ADAPTER_DIR)
        return
    to_save = model.merge_and_unload() if is_peft(model) else model
    to_save.save_pretrained(out_dir / MODEL_DIR, safe_serialization=True)
    tokenizer.save_pretrained(out_dir / MODEL_DIR)


def load_saved(artifact_dir: Path, *, base: Path | None = None, dtype: str = "float32",
               attn_implementation: str = "sdpa") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load what ``save_model`` wrote. An adapter needs ``base``, the artifact it was trained on."""
    where = str(artifact_dir)
    if (artifact_dir / MODEL_DIR).is_dir():
        folder = artifact_dir / MODEL_DIR
        model = load_pretrained(str(folder), where=where, dtype=dtype, attn_implementation=attn_implementation)
        return model, AutoTokenizer.from_pretrained(str(folder))
    if (artifact_dir / ADAPTER_DIR).is_dir():
        from peft import PeftModel

        if base is None:
            config = json.loads((artifact_dir / ADAPTER_DIR / "adapter_config.json").read_text())
            raise UserError(problem(where, "this artifact is a LoRA adapter; its base model is needed",
                                    f"load it with base= (adapter trained on {config.get('base_model_name_or_path')})"))
        base_model, tokenizer = load_saved(base, dtype=dtype, attn_implementation=attn_implementation)
        model = PeftModel.from_pretrained(base_model, str(artifact_dir / ADAPTER_DIR))
        return model.merge_and_unload(), tokenizer
    raise UserError(problem(where, "no saved model here", "point at a stage's artifact folder"))
