"""The hf rollout engine: deterministic at temperature 0, seeded otherwise, and its logprobs are the
trainer's logprobs of the same tokens."""

from __future__ import annotations

import pytest
import torch

from posttrain.data.render import render_prompt
from posttrain.models.forward import head_weight, hidden_states
from posttrain.models.logprobs import token_logprobs
from posttrain.rollout.hf import HFSampler, SamplingParams


@pytest.fixture(scope="module")
def setup(demo_tokenizer, tiny_model):
    model = tiny_model(demo_tokenizer, hidden=64, layers=2, seed=3).eval()
    prompts = [render_prompt(demo_tokenizer, [{"role": "user", "content": q}])
               for q in ("What is 12 + 30?", "Compute 99 - 9.", "7 + 5 = ?")]
    return model, demo_tokenizer, prompts


def _trainer_logprobs(model, rollout, temperature: float) -> torch.Tensor:
    ids = torch.tensor([rollout.prompt_ids + rollout.completion_ids])
    hidden = hidden_states(model, ids, torch.arange(ids.shape[1])[None])
    start = len(rollout.prompt_ids) - 1
    h = hidden[0, start : start + len(rollout.completion_ids)]
    return token_logprobs(h, head_weight(model), torch.tensor(rollout.completion_ids), temperature=temperature)


def test_greedy_is_deterministic_and_batch_independent(setup):
    model, tokenizer, prompts = setup
    sampler = HFSampler(model, tokenizer, batch_size=8)
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    first = sampler.generate(prompts, params)
    again = sampler.generate(prompts, params)
    one_by_one = [HFSampler(model, tokenizer, batch_size=1).generate([p], params)[0] for p in prompts]
    assert [r.completion_ids for r in first] == [r.completion_ids for r in again]
    assert [r.completion_ids for r in first] == [r.completion_ids for r in one_by_one]  # left padding is inert


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_equal_trainer_logprobs(setup, temperature):
    model, tokenizer, prompts = setup
    rollouts = HFSampler(model, tokenizer, batch_size=16).generate(
        prompts, SamplingParams(n=4, temperature=temperature, max_new_tokens=10, seed=1))
    assert len(rollouts) == 12 and [r.prompt_index for r in rollouts] == [i // 4 for i in range(12)]
    gap = 0.0
    with torch.no_grad():
        for r in rollouts:
            trainer = _trainer_logprobs(model, r, temperature)
            gap = max(gap, float((trainer - torch.tensor(r.logprobs)).abs().max()))
    assert gap < 1e-4, gap


def test_seeded_sampling_is_reproducible_and_samples_differ(setup):
    model, tokenizer, prompts = setup
    sampler = HFSampler(model, tokenizer)
    a = sampler.generate(prompts[:1], SamplingParams(n=6, temperature=1.0, max_new_tokens=8, seed=5))
    b = sampler.generate(prompts[:1], SamplingParams(n=6, temperature=1.0, max_new_tokens=8, seed=5))
    assert [r.completion_ids for r in a] == [r.completion_ids for r in b]
    assert len({tuple(r.completion_ids) for r in a}) > 1  # n samples are not copies of one
    state = torch.random.get_rng_state()
    sampler.generate(prompts[:1], SamplingParams(n=2, temperature=1.0, max_new_tokens=4, seed=9))
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is left alone


def test_finish_reasons_and_top_k_one_equals_greedy(setup):
    model, tokenizer, prompts = setup
    sampler = HFSampler(model, tokenizer)
    greedy = sampler.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=6))
    top1 = sampler.generate(prompts, SamplingParams(temperature=1.0, top_k=1, max_new_tokens=6, seed=2))
    assert [r.completion_ids for r in greedy] == [r.completion_ids for r in top1]
    for r in greedy:
        ended = r.completion_ids[-1] == tokenizer.eos_token_id
        assert r.finish_reason == ("stop" if ended else "length")
        assert len(r.completion_ids) <= 6 and len(r.logprobs) == len(r.completion_ids)


def test_sampling_is_batch_invariant(setup):
    """A prompt's samples depend on (seed, its key, sample index) only: not on the other prompts
    in its batch, the batch size, or how prompts are split over processes."""
    model, tokenizer, prompts = setup
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=10, seed=11)
    together = HFSampler(model, tokenizer, batch_size=9).generate(prompts, params, keys=[10, 11, 12])
    alone = HFSampler(model, tokenizer, batch_size=3).generate([prompts[1]], params, keys=[11])
    assert [r.completion_ids for r in together[3:6]] == [r.completion_ids for r in alone]
    assert [r.prompt_index for r in alone] == [11, 11, 11]


def test_reserved_cache_growth_changes_nothing(setup, monkeypatch):
    """The sampler's growing key/value buffer (doubled when full) gives exactly the plain cache's
    tokens and logprobs: force it to grow many times, and compare with no reservation at all."""
    import posttrain.rollout.hf as hf

    model, tokenizer, prompts = setup
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=24, seed=4)
    original = hf._reserve
    monkeypatch.setattr(hf, "_reserve", lambda cache, extra: original(cache, 1))  # grows 1, 2, 4, ...
    grown = HFSampler(model, tokenizer).generate(prompts, params)
    monkeypatch.setattr(hf, "_reserve", lambda cache, extra: None)
    plain = HFSampler(model, tokenizer).generate(prompts, params)
    assert [r.completion_ids for r in grown] == [r.completion_ids for r in plain]
    assert max(abs(a - b) for g, p in zip(grown, plain) for a, b in zip(g.logprobs, p.logprobs)) < 1e-5
