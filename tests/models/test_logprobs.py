"""Chunked log-probabilities equal the plain log-softmax, in value and gradient."""

from __future__ import annotations

import pytest
import torch

from posttrain.models.logprobs import token_logprobs, weighted_nll


def _inputs(n: int = 37, h: int = 16, v: int = 53, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    token_weights = torch.rand(n, generator=g)
    return hidden, weight, targets, token_weights


def _reference_logprobs(hidden, weight, targets, temperature=1.0):
    return torch.log_softmax(hidden @ weight.T / temperature, -1).gather(1, targets[:, None]).squeeze(1)


@pytest.mark.parametrize("chunk", [1, 5, 37, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_weighted_nll_matches_log_softmax(chunk, temperature):
    hidden, weight, targets, w = _inputs()
    reference = -(_reference_logprobs(hidden, weight, targets, temperature) * w).sum()
    ref_grads = torch.autograd.grad(reference * 1.7, (hidden, weight))
    ours = weighted_nll(hidden, weight, targets, w, chunk=chunk, temperature=temperature)
    grads = torch.autograd.grad(ours * 1.7, (hidden, weight))  # a non-unit upstream gradient
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(grads, ref_grads):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 8, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_token_logprobs_match_log_softmax(chunk, temperature):
    hidden, weight, targets, _ = _inputs()
    upstream = torch.randn(hidden.shape[0])
    reference = _reference_logprobs(hidden, weight, targets, temperature)
    ref_grads = torch.autograd.grad((reference * upstream).sum(), (hidden, weight))
    ours = token_logprobs(hidden, weight, targets, chunk=chunk, temperature=temperature)
    grads = torch.autograd.grad((ours * upstream).sum(), (hidden, weight))
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(grads, ref_grads):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)


def test_no_grad_path_and_empty_inputs():
    hidden, weight, targets, w = _inputs()
    with torch.no_grad():
        value = weighted_nll(hidden, weight, targets, w)
    assert value.ndim == 0 and torch.isfinite(value)
    empty = weighted_nll(hidden[:0], weight, targets[:0], w[:0])
    empty.backward()  # zero-target micro-batches still produce a graph
    assert float(empty.detach()) == 0.0


def test_extreme_logits_stay_finite():
    hidden, weight, targets, w = _inputs()
    big = (hidden * 1e3).detach().requires_grad_()
    value = weighted_nll(big, weight, targets, w)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(big.grad).all()
