"""The vllm engine's own logic, on CPU and without vLLM: output conversion (fed small objects shaped
like vLLM's RequestOutput / CompletionOutput / Logprob), the logprobs-mode choice, request
parameters, the stale-engine check and weight naming. None of this exercises vLLM itself; that is
benchmarks/gpu_vllm_check.py's job on a GPU machine."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from posttrain.rollout.base import SamplingParams
from posttrain.rollout.vllm import (
    VLLMSampler,
    load_into_engine,
    matching_logprobs_modes,
    policy_weights,
    request_params,
    request_seed,
    require_fresh,
    require_logprobs_mode,
    to_rollouts,
    vllm_weight_name,
    weight_updates,
)


def _logprob(value: float) -> SimpleNamespace:  # vllm.sequence.Logprob
    return SimpleNamespace(logprob=value, rank=1, decoded_token=None)


def _completion(index: int, ids: list[int], logprobs: list[float], reason: str, extra: bool = True):
    """A CompletionOutput whose per-step maps also hold another (top-k) token, as vLLM's do."""
    steps = [{t: _logprob(lp), **({t + 1000: _logprob(-9.0)} if extra else {})} for t, lp in zip(ids, logprobs)]
    return SimpleNamespace(index=index, token_ids=tuple(ids), logprobs=steps, finish_reason=reason,
                           text="ignored", cumulative_logprob=sum(logprobs))


def _request(prompt: list[int], completions: list) -> SimpleNamespace:  # vllm.RequestOutput
    return SimpleNamespace(prompt_token_ids=list(prompt), outputs=completions, finished=True)


def _decode(ids: list[int]) -> str:
    return " ".join(map(str, ids))


PROMPTS = [[1, 2, 3], [4, 5]]


def _outputs():
    return [
        # samples out of index order: the rollouts must come back by index
        _request(PROMPTS[0], [_completion(1, [9, 2], [-0.5, -0.25], "stop"),
                              _completion(0, [7, 8, 2], [-1.0, -2.0, -0.125], "stop")]),
        _request(PROMPTS[1], [_completion(0, [6], [-3.0], "length"),
                              _completion(1, [5, 5], [-0.75, -0.5], "length")]),
    ]


def test_outputs_become_rollouts_grouped_by_prompt_with_the_exact_ids_and_sampled_logprobs():
    rollouts = to_rollouts(_outputs(), PROMPTS, keys=[40, 41], n=2, version=7, decode=_decode)
    assert [(r.prompt_index, r.sample_index) for r in rollouts] == [(40, 0), (40, 1), (41, 0), (41, 1)]
    assert [r.completion_ids for r in rollouts] == [[7, 8, 2], [9, 2], [6], [5, 5]]
    assert [r.logprobs for r in rollouts] == [[-1.0, -2.0, -0.125], [-0.5, -0.25], [-3.0], [-0.75, -0.5]]
    assert [r.finish_reason for r in rollouts] == ["stop", "stop", "length", "length"]
    assert [r.prompt_ids for r in rollouts] == [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    assert all(r.policy_version == 7 for r in rollouts)
    assert rollouts[0].text == "7 8 2" and rollouts[3].truncated


@pytest.mark.parametrize(("break_it", "message"), [
    (lambda outs: outs[0].outputs[0].logprobs[0].pop(9), "do not include the sampled token 9"),
    (lambda outs: outs[1].outputs[1].logprobs.pop(), "1 logprob steps for 2 tokens"),
    (lambda outs: setattr(outs[1].outputs[0], "logprobs", None), "0 logprob steps for 1 tokens"),
    (lambda outs: setattr(outs[0].outputs[1], "finish_reason", "abort"), "finish reason 'abort'"),
    (lambda outs: setattr(outs[1], "prompt_token_ids", [4, 5, 0]), "other prompt ids than prompt 41"),
    (lambda outs: outs[1].outputs.pop(), "1 completions of prompt 41, not n = 2"),
    (lambda outs: outs.pop(), "1 results for 2 prompts"),
])
def test_malformed_outputs_raise_instead_of_training_on_them(break_it, message):
    outputs = _outputs()
    break_it(outputs)
    with pytest.raises(RuntimeError, match=message):
        to_rollouts(outputs, PROMPTS, keys=[40, 41], n=2, version=0, decode=_decode)


@pytest.mark.parametrize(("temperature", "top_k", "top_p", "modes"), [
    (1.0, 0, 1.0, ["raw_logprobs", "processed_logprobs"]),
    (1.0, 20, 0.9, ["raw_logprobs"]),  # processed would be renormalised over the kept tokens
    (0.0, 20, 0.9, ["raw_logprobs", "processed_logprobs"]),  # greedy: vLLM applies neither T nor top-k/p
    (0.7, 0, 1.0, ["processed_logprobs"]),  # raw would ignore the temperature
    (0.7, 20, 1.0, []),
    (0.7, 0, 0.95, []),
    (1e-6, 0, 1.0, []),  # vLLM samples greedily below 1e-5 and reports T = 1 logprobs
])
def test_the_logprobs_mode_is_one_whose_values_are_the_trainers(temperature, top_k, top_p, modes):
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    assert matching_logprobs_modes(params) == modes
    for mode in ("raw_logprobs", "processed_logprobs"):
        if mode in modes:
            require_logprobs_mode(mode, params)
        else:
            with pytest.raises(ValueError, match="not the trainer's logprobs"):
                require_logprobs_mode(mode, params)


def test_request_parameters_map_ours_and_seed_each_prompt_by_its_key():
    params = SamplingParams(n=4, temperature=0.8, top_p=1.0, top_k=0, max_new_tokens=32, seed=3)
    request = request_params(params, key=12, stop_token_ids=[2])
    assert request == {"n": 4, "temperature": 0.8, "top_p": 1.0, "top_k": -1, "max_tokens": 32, "stop": None,
                       "stop_token_ids": [2], "include_stop_str_in_output": True, "detokenize": False,
                       "seed": request_seed(3, 12), "logprobs": 0}
    with_stop = request_params(SamplingParams(top_k=5, stop=["\n\n"], temperature=0.0), key=0, stop_token_ids=[])
    assert with_stop["top_k"] == 5 and with_stop["stop"] == ["\n\n"] and with_stop["detokenize"]
    assert with_stop["temperature"] == 0.0
    seeds = {request_seed(3, key) for key in range(1000)}
    assert len(seeds) == 1000 and request_seed(3, 12) == request_seed(3, 12) != request_seed(4, 12)
    assert max(seeds) + 10_000 < 2**63  # vLLM adds the sample index; stays an int64


def test_a_stale_engine_refuses_to_generate():
    require_fresh(5, 5)
    with pytest.raises(RuntimeError, match="no policy weights yet"):
        require_fresh(None, 0)
    with pytest.raises(RuntimeError, match="holds the weights of policy version 4, but the trainer is at version 5"):
        require_fresh(4, 5)


class _FakeEngineModel:
    def __init__(self, fail: bool = False):
        self.loaded: dict[str, torch.Tensor] = {}
        self.fail = fail

    def load_weights(self, weights):
        if self.fail:
            raise RuntimeError("out of memory")
        self.loaded.update({name: tensor.clone() for name, tensor in weights})
        return set(self.loaded)


class _FakeLLM:
    """Stands in for vllm.LLM: the weight-load entry points and the prefix-cache reset."""

    def __init__(self, apply_model: bool, fail: bool = False):
        self.engine_model = _FakeEngineModel(fail)
        self.resets = 0
        self.generate_calls = 0
        runner = SimpleNamespace(model=self.engine_model)
        executor = SimpleNamespace(driver_worker=SimpleNamespace(model_runner=runner))
        self.llm_engine = SimpleNamespace(model_executor=executor)
        if apply_model:
            self.llm_engine.apply_model = lambda fn: [fn(self.engine_model)]

    def apply_model(self, fn):
        return self.llm_engine.apply_model(fn)

    def reset_prefix_cache(self) -> bool:
        self.resets += 1
        return True

    def generate(self, *args, **kwargs):
        self.generate_calls += 1
        raise AssertionError("a stale engine must not be asked to generate")


def _sampler(llm: _FakeLLM) -> VLLMSampler:
    """A VLLMSampler around a fake engine (the real constructor needs vLLM and a GPU)."""
    sampler = object.__new__(VLLMSampler)
    sampler.llm, sampler.logprobs_mode, sampler.version, sampler.engine_version = llm, "raw_logprobs", 0, None
    sampler.model, sampler.synced_updates = None, None
    return sampler


@pytest.mark.parametrize("apply_model", [True, False])
def test_sync_loads_every_weight_resets_the_prefix_cache_and_marks_the_version(demo_tokenizer, tiny_model,
                                                                               apply_model):
    model = tiny_model(demo_tokenizer)
    llm = _FakeLLM(apply_model)
    sampler = _sampler(llm)
    sampler.sync(model, 3)
    assert sampler.version == sampler.engine_version == 3 and llm.resets == 1
    expected = dict(model.named_parameters())
    assert set(llm.engine_model.loaded) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(llm.engine_model.loaded[name], tensor)


def test_a_failed_sync_leaves_the_engine_stale_and_generate_refuses(demo_tokenizer, tiny_model):
    model = tiny_model(demo_tokenizer)
    sampler = _sampler(_FakeLLM(apply_model=True))
    sampler.sync(model, 1)
    sampler.llm.engine_model.fail = True
    with pytest.raises(RuntimeError, match="out of memory"):
        sampler.sync(model, 2)
    assert sampler.version == 2 and sampler.engine_version == 1
    with pytest.raises(RuntimeError, match="stale vLLM engine"):
        sampler.generate([[1, 2]], SamplingParams())
    sampler.version = 3  # the trainer moved on without a sync
    with pytest.raises(RuntimeError, match="trainer is at version 3"):
        sampler.generate([[1, 2]], SamplingParams())
    assert sampler.llm.generate_calls == 0


def test_an_optimizer_step_without_a_sync_leaves_the_engine_stale(demo_tokenizer, tiny_model):
    model = tiny_model(demo_tokenizer)
    sampler = _sampler(_FakeLLM(apply_model=True))
    sampler.sync(model, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    with pytest.raises(RuntimeError, match="weights changed since sync"):
        sampler.generate([[1, 2]], SamplingParams())
    assert sampler.llm.generate_calls == 0
    sampler.sync(model, 1)  # the same version number, the new weights: fresh again
    require_fresh(sampler.engine_version, sampler.version, sampler.synced_updates, weight_updates(model))


def test_generate_refuses_params_the_engines_logprobs_mode_misreports(demo_tokenizer, tiny_model):
    sampler = _sampler(_FakeLLM(apply_model=True))
    sampler.sync(tiny_model(demo_tokenizer), 0)
    with pytest.raises(ValueError, match="reports raw_logprobs"):
        sampler.generate([[1, 2]], SamplingParams(temperature=0.7))
    assert sampler.llm.generate_calls == 0


def test_load_into_engine_raises_when_the_prefix_cache_cannot_be_reset():
    llm = _FakeLLM(apply_model=True)
    llm.reset_prefix_cache = lambda: False
    with pytest.raises(RuntimeError, match="prefix cache"):
        load_into_engine(llm, [("w", torch.zeros(1))])


@pytest.mark.parametrize(("name", "expected"), [
    ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.weight"),
    ("_orig_mod.model.norm.weight", "model.norm.weight"),
    ("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight", "model.layers.0.self_attn.q_proj.weight"),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", None),
    ("base_model.model.lm_head.modules_to_save.default.weight", "lm_head.weight"),
    ("base_model.model.lm_head.original_module.weight", None),
])
def test_trainer_parameter_names_map_to_vllm_names(name, expected):
    assert vllm_weight_name(name) == expected


def test_lora_weights_are_sent_merged_and_the_adapters_unmerged_after(demo_tokenizer, tiny_model):
    from posttrain.config.components import LoraConfig
    from posttrain.models.load import apply_lora

    base = tiny_model(demo_tokenizer)
    names = {n for n, _ in base.named_parameters()}
    model = apply_lora(base, LoraConfig(r=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)  # B starts at zero: make the adapters change the weights
    merged = dict(copy.deepcopy(model).merge_and_unload().named_parameters())
    ids = torch.tensor([[1, 5, 9, 4]])
    before = model(input_ids=ids).logits
    with policy_weights(model) as weights:
        sent = {name: tensor.clone() for name, tensor in weights}
    assert set(sent) == names
    for name, tensor in sent.items():
        torch.testing.assert_close(tensor, merged[name])
    torch.testing.assert_close(model(input_ids=ids).logits, before)  # adapters unmerged again
