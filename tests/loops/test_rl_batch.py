"""Shared-prompt packing of rollout micro-batches: the same logprobs and gradients as the padded
batch, whatever the mix of prompts, group splits and completion lengths."""

from __future__ import annotations

import torch

from posttrain.loops.rl_batch import build_batch, pack_shared_prompts, policy_logprobs
from posttrain.types import Rollout


def _rollouts(tokenizer, seed: int) -> list[Rollout]:
    """Prompts of different lengths, each with several completions of different lengths (one
    group split over two prompts' worth of rows, one prompt that reappears later)."""
    g = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (5, 9, 2)]
    order = [0, 0, 0, 1, 1, 2, 2, 2, 2, 0]  # prompt 0 again at the end: a new copy, not shared
    out = []
    for i, p in enumerate(order):
        length = int(torch.randint(1, 7, (1,), generator=g))
        completion = torch.randint(3, vocab, (length,), generator=g).tolist()
        out.append(Rollout(prompt_ids=prompts[p], completion_ids=completion, logprobs=[0.0] * length,
                           finish_reason="length", text="", prompt_index=p, sample_index=i, policy_version=0))
    return out


def test_packing_shares_each_prompt_once_per_run_of_rows(demo_tokenizer):
    rollouts = _rollouts(demo_tokenizer, 0)
    batch = build_batch(rollouts, [1.0] * len(rollouts), demo_tokenizer.pad_token_id, mask_truncated=False)
    pack = pack_shared_prompts(batch)
    prompts_copied = 5 + 9 + 2 + 5  # four runs of rows with one prompt each
    assert pack.input_ids.shape[1] == prompts_copied + sum(len(r.completion_ids) for r in rollouts)
    assert pack.reads.numel() == int(batch.completion.sum())
    # block i is row i: its context and its own tokens spell that row's sequence, at its positions
    packed, positions = pack.input_ids[0].tolist(), pack.position_ids[0].tolist()
    assert len(pack.blocks.blocks) == len(rollouts)
    for block, rollout in zip(pack.blocks.blocks, rollouts):
        seen = [i for a, b in block.context for i in range(a, b)] + list(range(block.start, block.end))
        assert [packed[i] for i in seen] == rollout.prompt_ids + rollout.completion_ids
        assert positions[block.start:block.end] == list(range(len(seen) - (block.end - block.start), len(seen)))

def test_packed_logprobs_and_gradients_equal_the_padded_batch(demo_tokenizer, tiny_model):
    model = tiny_model(demo_tokenizer, hidden=32, layers=2, heads=4, seed=1)
    rollouts = _rollouts(demo_tokenizer, 1)
    batch = build_batch(rollouts, [1.0] * len(rollouts), demo_tokenizer.pad_token_id, mask_truncated=False)
    results = []
    for share in (False, True):
        model.zero_grad()
        logp, entropy = policy_logprobs(model, batch, temperature=0.7, chunk=16, entropy=True, share_prompt=share)
        (logp * torch.linspace(0.5, 2.0, logp.numel()).view_as(logp)).sum().backward()
        results.append((logp.detach(), entropy, [p.grad.clone() for p in model.parameters()]))
    (padded, padded_entropy, padded_grads), (packed, packed_entropy, packed_grads) = results
    assert bool((padded != 0).sum() == batch.completion.sum())
    torch.testing.assert_close(packed, padded, rtol=0, atol=1e-5)
    torch.testing.assert_close(packed_entropy, padded_entropy, rtol=0, atol=1e-5)
    for a, b in zip(packed_grads, padded_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_packed_critic_values_and_gradients_equal_the_padded_batch(demo_tokenizer, tiny_model):
    from posttrain.config.components import OptimConfig
    from posttrain.loops.critic import Critic, CriticSettings
    from posttrain.loops.distributed import DistInfo
    from posttrain.models.heads import value_model

    rollouts = _rollouts(demo_tokenizer, 2)
    batch = build_batch(rollouts, [1.0] * len(rollouts), demo_tokenizer.pad_token_id, mask_truncated=False)
    results = []
    for share in (False, True):
        critic = Critic(value_model(tiny_model(demo_tokenizer, seed=3), init_seed=1), OptimConfig(lr=1e-3),
                        CriticSettings(share_prompt=share), updates=1, info=DistInfo(0, 1, 0, torch.device("cpu")))
        values = critic._values(batch)
        (values * batch.completion).sum().backward()
        results.append((torch.where(batch.completion, values, 0.0).detach(),
                        [p.grad.clone() for p in critic.model.parameters() if p.grad is not None]))
    (padded, padded_grads), (packed, packed_grads) = results
    assert bool((padded != 0).sum() == batch.completion.sum())
    torch.testing.assert_close(packed, padded, rtol=0, atol=1e-5)
    assert len(packed_grads) == len(padded_grads) > 0
    for a, b in zip(packed_grads, padded_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
