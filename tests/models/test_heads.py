"""Reward, multi-head, process and value heads: what they read, and that transformers loads their
saves back with the same outputs."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

import posttrain.models.heads as heads_module
from posttrain.config import LoraConfig
from posttrain.errors import UserError
from posttrain.models.heads import RewardModel, load_reward_model, save_reward_model, value_model
from posttrain.models.load import apply_lora

TEXTS = ["12 + 30 = 42", "7 + 5 = 12. 4 + 8 + 1 = 13.", "9 - 3 = 6"]


def _batch(tokenizer):
    """Right-padded sequences ending with the end-of-turn token, and each one's last index."""
    sequences = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in TEXTS]
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), tokenizer.pad_token_id)
    for r, s in enumerate(sequences):
        ids[r, : len(s)] = torch.tensor(s)
    positions = torch.arange(width).expand_as(ids)
    return ids, positions, torch.tensor([len(s) - 1 for s in sequences])


def _perturbed(model: RewardModel) -> RewardModel:
    with torch.no_grad():  # a fresh head is near zero; make every output count
        model.score.weight.normal_(0, 1.0)
    return model.eval()


def test_reward_reads_each_sequences_last_token(demo_tokenizer, tiny_model):
    model = _perturbed(RewardModel(tiny_model(demo_tokenizer)))
    ids, positions, last = _batch(demo_tokenizer)
    with torch.no_grad():
        batched = model.rewards(ids, positions, last)[:, 0]
        alone = [model.rewards(ids[r : r + 1, : int(last[r]) + 1], positions[r : r + 1, : int(last[r]) + 1],
                               last[r : r + 1])[0, 0] for r in range(len(TEXTS))]
        per_token = model.token_scores(ids, positions)[torch.arange(len(TEXTS)), last, 0]
    torch.testing.assert_close(batched, torch.stack(alone), rtol=1e-5, atol=1e-6)  # padding is never read
    torch.testing.assert_close(batched, per_token, rtol=1e-5, atol=1e-6)


def test_scalar_head_loads_as_sequence_classification_with_the_same_rewards(demo_tokenizer, tiny_model, tmp_path):
    model = _perturbed(RewardModel(tiny_model(demo_tokenizer)))
    folder = save_reward_model(model, demo_tokenizer, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1
    assert config["pad_token_id"] == demo_tokenizer.pad_token_id != demo_tokenizer.eos_token_id
    hf = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    ids, positions, last = _batch(demo_tokenizer)
    with torch.no_grad():
        ours = model.rewards(ids, positions, last)
        theirs = hf(input_ids=ids, attention_mask=(ids != demo_tokenizer.pad_token_id).long()).logits
    assert theirs.shape == (3, 1) and float(ours.abs().min()) > 1e-3
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_multi_head_loads_with_named_labels_and_reloads(demo_tokenizer, tiny_model, tmp_path):
    model = _perturbed(RewardModel(tiny_model(demo_tokenizer), ["helpfulness", "harmlessness"]))
    folder = save_reward_model(model, demo_tokenizer, tmp_path)
    hf = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert hf.config.id2label == {0: "helpfulness", 1: "harmlessness"}
    ids, positions, last = _batch(demo_tokenizer)
    again, tokenizer = load_reward_model(tmp_path)
    assert again.head_names == ["helpfulness", "harmlessness"] and again.kind == "reward"
    with torch.no_grad():
        ours = model.rewards(ids, positions, last)
        torch.testing.assert_close(ours, hf(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours, again.rewards(ids, positions, last), rtol=0, atol=0)
        # the causal LM survives the round trip (a reward model can seed a value model or a policy)
        torch.testing.assert_close(model.backbone(ids).logits, again.backbone(ids).logits, rtol=0, atol=0)
    assert tokenizer.pad_token_id == demo_tokenizer.pad_token_id


@pytest.mark.parametrize("kind", ["prm", "value"])
def test_per_token_heads_load_as_token_classification(demo_tokenizer, tiny_model, tmp_path, kind):
    backbone = tiny_model(demo_tokenizer)
    model = _perturbed(value_model(backbone) if kind == "value" else
                       RewardModel(backbone, ["step"], kind="prm", meta={"separator": ". "}))
    folder = save_reward_model(model, demo_tokenizer, tmp_path)
    hf = AutoModelForTokenClassification.from_pretrained(folder).eval()
    ids, positions, _ = _batch(demo_tokenizer)
    with torch.no_grad():
        values = model.values(ids, positions)
        assert values.shape == ids.shape
        torch.testing.assert_close(values, hf(input_ids=ids).logits[..., 0], rtol=1e-5, atol=1e-5)
    again, _ = load_reward_model(tmp_path)
    assert again.kind == kind and again.meta == model.meta


def test_tied_embeddings_and_lora_are_saved_merged(demo_tokenizer, tmp_path):
    from posttrain.config import TinyModelConfig
    from posttrain.models.tiny import build_tiny_llama

    tied = build_tiny_llama(TinyModelConfig(hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64,
                                            tie_embeddings=True), demo_tokenizer)
    model = RewardModel(apply_lora(tied, LoraConfig(r=4, alpha=8)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    _perturbed(model)
    ids, positions, last = _batch(demo_tokenizer)
    with torch.no_grad():
        before = model.rewards(ids, positions, last)
    save_reward_model(model, demo_tokenizer, tmp_path)
    assert not (tmp_path / "model" / heads_module.LM_HEAD_FILE).exists()  # tied: the embedding is the head
    again, _ = load_reward_model(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again.rewards(ids, positions, last), before, rtol=1e-5, atol=1e-5)


def test_architectures_without_a_classification_class_use_the_documented_fallback(
        demo_tokenizer, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(heads_module, "_hf_class_name", lambda backbone, kind: None)
    model = _perturbed(RewardModel(tiny_model(demo_tokenizer), ["a", "b"]))
    save_reward_model(model, demo_tokenizer, tmp_path)
    assert (tmp_path / "model" / heads_module.FALLBACK_HEAD_FILE).exists()
    assert json.loads((tmp_path / "model" / heads_module.HEAD_FILE).read_text())["layout"] == "causal_lm"
    again, _ = load_reward_model(tmp_path)
    ids, positions, last = _batch(demo_tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(again.rewards(ids, positions, last), model.rewards(ids, positions, last))


def test_a_policy_folder_is_not_a_reward_model(demo_tokenizer, tiny_model, tmp_path):
    from posttrain.models.load import save_model

    save_model(tiny_model(demo_tokenizer), demo_tokenizer, tmp_path)
    with pytest.raises(UserError, match="not a reward model"):
        load_reward_model(tmp_path)


def test_head_init_is_seeded_and_leaves_the_global_rng_alone(demo_tokenizer, tiny_model):
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a = RewardModel(tiny_model(demo_tokenizer), init_seed=5)
    assert torch.equal(torch.rand(1), expected)
    b = RewardModel(tiny_model(demo_tokenizer), init_seed=5)
    assert torch.equal(a.score.weight, b.score.weight)
    with pytest.raises(ValueError, match="exactly one head"):
        RewardModel(tiny_model(demo_tokenizer), ["a", "b"], kind="prm")
