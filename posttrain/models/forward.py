"""The forward pass that training uses: final hidden states, not logits.

Losses project hidden states onto the vocabulary themselves, in chunks and only at target
positions (see ``posttrain.models.logprobs``).
"""

from __future__ import annotations

import torch

from posttrain.models.block_attention import NO_MASK, BlockLayout, use_block_attention
from posttrain.models.load import decoder_and_head
from posttrain.models.logprobs import token_logprobs


def hidden_states(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                  blocks: BlockLayout | None = None) -> torch.Tensor:
    """Final-layer hidden states [B, T, H]; right padding needs no mask under causal attention,
    and restarting position ids separate packed segments. With ``blocks``: of one packed row
    [1, T] whose attention follows that layout (sequences sharing one copy of their prompt; see
    ``posttrain.models.block_attention``)."""
    decoder, _ = decoder_and_head(model)
    if blocks is None:
        return decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
    if not use_block_attention(model):
        raise ValueError(f"block layouts need SDPA attention, not {model.config._attn_implementation!r}")
    return decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=NO_MASK.to(input_ids.device),
                   use_cache=False, posttrain_blocks=blocks).last_hidden_state


def head_weight(model: torch.nn.Module) -> torch.Tensor:
    """The vocabulary projection's weight [V, H] (the tied embedding for tied models)."""
    _, head = decoder_and_head(model)
    if getattr(head, "bias", None) is not None:
        raise NotImplementedError("vocabulary projections with a bias are not supported yet")
    return head.weight


def sequence_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                      target_mask: torch.Tensor, *, chunk: int = 1024, temperature: float = 1.0
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the summed log-probability of its target tokens, and how many there are.

    input_ids, position_ids, target_mask [R, T] (mask[t] = 1: token t is a target, predicted from
    position t - 1) -> (logp sums [R] fp32, target counts [R]). The same code path scores
    reference, policy and rollout tokens.
    """
    hidden = hidden_states(model, input_ids, position_ids)
    mask = target_mask[:, 1:] != 0
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(mask)[mask]
    logp = token_logprobs(hidden[:, :-1][mask], head_weight(model), input_ids[:, 1:][mask], chunk=chunk,
                          temperature=temperature)
    sums = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device).index_add(0, rows, logp)
    return sums, mask.sum(dim=1)
