"""The token-level negative log-likelihood used by pretraining and SFT."""

from __future__ import annotations

import torch

from posttrain.models.logprobs import weighted_nll


def sft_loss(hidden: torch.Tensor, head_weight: torch.Tensor, input_ids: torch.Tensor,
             target_weights: torch.Tensor, normaliser: float, *, chunk: int = 1024
             ) -> tuple[torch.Tensor, dict[str, float]]:
    """sum over targets of w_t * -log p(x_t | x_<t), divided by the global-batch normaliser.

    hidden [B, T, H] final hidden states, head_weight [V, H], input_ids [B, T],
    target_weights [B, T] (0 where a token is not a target). Position t predicts token t + 1.
    With w = 1 and normaliser = target tokens of the global batch this is token-mean
    cross-entropy; with w = 1 / targets-of-its-sequence and normaliser = sequences it is
    seq-mean-token-mean. Returns (loss contribution, {"loss": contribution, "targets": n}).
    """
    weights = target_weights[:, 1:]
    selected = weights != 0
    h = hidden[:, :-1][selected]
    targets = input_ids[:, 1:][selected]
    total = weighted_nll(h, head_weight, targets, weights[selected], chunk=chunk)
    loss = total / normaliser
    return loss, {"loss": float(loss.detach()), "targets": float(selected.sum())}
