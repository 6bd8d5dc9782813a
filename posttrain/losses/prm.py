"""Process reward model loss: one label per reasoning step, read at the step's last token.

``prm_step_loss(step_logits [S], labels [S]) -> (losses [S], stats)``, S counting labelled steps
over the batch (every step of every solution, flattened). A label is the probability that the
step is correct: hard (0 or 1, PRM800K-style human labels) or soft (Math-Shepherd: the share of
continuations from the step that reach the verified answer). The loss is binary cross-entropy
with logits, which equals Math-Shepherd's cross-entropy over its two label tokens ("+" / "-";
Wang et al. 2024, "Math-Shepherd", eq. 3) written as one logit (their logit difference); soft
labels are its "soft estimation" variant. Lightman et al. 2023 ("Let's verify step by step")
use three classes; their "neutral" maps onto a label of 0.5 or 1 here, the caller's choice.

Losses are per step and unreduced; the caller divides their sum by the global step count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

Stats = dict[str, Tensor]


def prm_step_loss(step_logits: Tensor, labels: Tensor) -> tuple[Tensor, Stats]:
    """Binary cross-entropy of each step's logit against its (hard or soft) label [S].

    Stats: ``probability`` (sigmoid of the logit), ``accuracy`` (1.0 where probability and label
    fall on the same side of 0.5), ``label``.
    """
    logits = step_logits if step_logits.dtype in (torch.float32, torch.float64) else step_logits.float()
    labels = labels.to(logits.dtype).detach()
    if labels.numel() and (bool((labels < 0).any()) or bool((labels > 1).any())):
        raise ValueError("PRM step labels must lie in [0, 1]")
    losses = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    probability = torch.sigmoid(logits.detach())
    accuracy = ((probability > 0.5) == (labels > 0.5)).to(logits.dtype)
    return losses, {"probability": probability, "accuracy": accuracy, "label": labels}
