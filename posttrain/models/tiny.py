"""Small models and tokenizers built locally: tests, the demo world and benchmarks.

Nothing here downloads anything. A byte-level BPE tokenizer is trained with ``tokenizers`` on the
caller's texts; the model is a Llama-style ``LlamaForCausalLM`` initialised from a seed.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from posttrain.config.components import TinyModelConfig

BOS = "<|endoftext|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, IM_START, IM_END]

# ChatML. The end-of-turn marker is the tokenizer's EOS, so generation stops there and the
# marker is a training target of every assistant turn.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

BUILTIN_TEMPLATES = {"chatml": CHATML_TEMPLATE}


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, *, split_digits: bool = True, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts``, with ChatML special tokens.

    Digits are split one per token when ``split_digits`` (arithmetic is learnable per digit).
    """
    tokenizer = Tokenizer(models.BPE())
    steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if split_digits:
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=IM_END,
        pad_token=PAD,
        additional_special_tokens=[IM_START],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.padding_side = "right"
    return fast


def tiny_llama_config(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attention_dropout=0.0,
    )


def build_tiny_llama(
    cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerFast, *, attn_implementation: str = "sdpa"
) -> LlamaForCausalLM:
    """A freshly initialised Llama-style model; the same ``cfg.init_seed`` gives the same weights."""
    config = tiny_llama_config(cfg, tokenizer)
    config._attn_implementation = attn_implementation
    devices = torch.random.get_rng_state()
    try:
        torch.manual_seed(cfg.init_seed)
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(devices)
    return model


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
