"""Saves are HF-compatible; LoRA trains only adapters and reloads onto its base."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.config import LoraConfig, ModelConfig
from posttrain.errors import UserError
from posttrain.models.load import apply_lora, load_model, load_saved, load_tokenizer, save_model


def test_save_then_plain_transformers_loads_the_same_model(demo_tokenizer, tiny_model, tmp_path):
    model = tiny_model(demo_tokenizer).eval()
    save_model(model, demo_tokenizer, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    ids = torch.tensor([tokenizer("12 + 30 = 42")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    messages = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == demo_tokenizer.apply_chat_template(
        messages, tokenize=False)


def test_lora_trains_adapters_only_and_reloads_merged(demo_tokenizer, tiny_model, tmp_path):
    base = tiny_model(demo_tokenizer)
    save_model(base, demo_tokenizer, tmp_path / "base")
    model = apply_lora(tiny_model(demo_tokenizer), LoraConfig(r=4, alpha=8))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # fresh LoRA is a no-op; make it matter
    save_model(model, demo_tokenizer, tmp_path / "tuned")
    assert (tmp_path / "tuned" / "adapter" / "adapter_config.json").exists()
    with pytest.raises(UserError):
        load_saved(tmp_path / "tuned")  # an adapter alone is not a model: says which base it needs
    merged, _ = load_saved(tmp_path / "tuned", base=tmp_path / "base")
    ids = torch.tensor([demo_tokenizer("7 + 5 = 12")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, merged(ids).logits, rtol=1e-5, atol=1e-5)


def test_missing_paths_are_user_errors(demo_tokenizer, tmp_path):
    with pytest.raises(UserError) as info:
        load_model(ModelConfig(path=str(tmp_path / "nope")), demo_tokenizer, where="stages.x.model")
    assert "stages.x.model.path" in info.value.render()
    with pytest.raises(UserError) as info:
        load_tokenizer("builtin:nope", where="stages.x.model.tokenizer")
    assert "unknown builtin tokenizer" in info.value.render()
