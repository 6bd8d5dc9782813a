"""Packing: best-fit bins, and packed rows that never attend across examples."""

from __future__ import annotations

import random

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.data.batching import SEQ_MEAN_TOKEN_MEAN, TOKEN_MEAN, collate, make_rows, row_units
from posttrain.data.render import render_example
from posttrain.models.forward import head_weight, hidden_states
from posttrain.models.logprobs import token_logprobs
from posttrain.types import ChatExample, RowSource, TokenizedExample


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=60), st.integers(64, 200))
def test_best_fit_places_every_item_once_within_capacity(lengths, capacity):
    examples = [TokenizedExample([0] * n, [0] + [1] * (n - 1)) for n in lengths]
    rows = make_rows(examples, packing=True, max_length=capacity)
    placed = sorted(id(s) for r in rows for s in r.segments)
    assert placed == sorted(id(e) for e in examples)
    assert all(len(r) <= capacity for r in rows)
    # Best fit never leaves two bins that could have been merged.
    sizes = sorted(len(r) for r in rows)
    assert len(sizes) < 2 or sizes[0] + sizes[1] > capacity


def _examples(tokenizer, n: int, seed: int = 0) -> list[TokenizedExample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        turns = [{"role": "user", "content": f"What is {a} + {b}?" + " please" * rng.randint(0, 6)},
                 {"role": "assistant", "content": f"{a} + {b} = {a + b}"}]
        out.append(render_example(tokenizer, ChatExample(turns, RowSource("x", i + 1)), "assistant"))
    return out


def _per_token_logprobs(model, batch) -> torch.Tensor:
    hidden = hidden_states(model, batch.input_ids, batch.position_ids)
    targets = batch.input_ids[:, 1:]
    logp = token_logprobs(hidden[:, :-1].reshape(-1, hidden.shape[-1]), head_weight(model), targets.reshape(-1))
    return logp.view_as(targets)


@torch.no_grad()
def test_packed_logprobs_equal_unpacked(demo_tokenizer, tiny_model):
    model = tiny_model(demo_tokenizer).eval()
    examples = _examples(demo_tokenizer, 9)
    packed_rows = make_rows(examples, packing=True, max_length=128)
    assert any(len(r.segments) > 1 for r in packed_rows)  # the test must actually pack
    pad = demo_tokenizer.pad_token_id
    packed = collate(packed_rows, pad)
    packed_logp = _per_token_logprobs(model, packed)
    worst = 0.0
    for b, row in enumerate(packed_rows):
        offset = 0
        for segment in row.segments:
            alone = _per_token_logprobs(model, collate(make_rows([segment], packing=False, max_length=128), pad))[0]
            n = len(segment)
            # Position offset+t predicts token offset+t+1; within the segment that is t -> t+1.
            in_pack = packed_logp[b, offset : offset + n - 1]
            worst = max(worst, float((in_pack - alone[: n - 1]).abs().max()))
            offset += n
    assert worst < 1e-5, worst


def test_collate_weights_and_units_for_both_aggregations(demo_tokenizer):
    examples = _examples(demo_tokenizer, 3)
    rows = make_rows(examples, packing=True, max_length=256)
    token_batch = collate(rows, 0, TOKEN_MEAN)
    seq_batch = collate(rows, 0, SEQ_MEAN_TOKEN_MEAN)
    total_targets = sum(e.n_targets for e in examples)
    assert float(token_batch.target_weights.sum()) == total_targets
    assert sum(row_units(r, TOKEN_MEAN) for r in rows) == total_targets
    # Each example's weights sum to 1 under seq-mean-token-mean; units count examples.
    assert abs(float(seq_batch.target_weights.sum()) - 3.0) < 1e-6
    assert sum(row_units(r, SEQ_MEAN_TOKEN_MEAN) for r in rows) == 3
    assert token_batch.tokens == sum(len(e) for e in examples)
