"""The forward pass that training uses: final hidden states, not logits.

Losses project hidden states onto the vocabulary themselves, in chunks and only at target
positions (see ``posttrain.models.logprobs``).
"""

from __future__ import annotations

import torch

from posttrain.models.load import decoder_and_head


def hidden_states(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Final-layer hidden states [B, T, H]; right padding needs no mask under causal attention,
    and restarting position ids separate packed segments."""
    decoder, _ = decoder_and_head(model)
    return decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state


def head_weight(model: torch.nn.Module) -> torch.Tensor:
    """The vocabulary projection's weight [V, H] (the tied embedding for tied models)."""
    _, head = decoder_and_head(model)
    if getattr(head, "bias", None) is not None:
        raise NotImplementedError("vocabulary projections with a bias are not supported yet")
    return head.weight
