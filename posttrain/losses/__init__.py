"""Pure loss functions: tensors in, ``(loss, stats)`` out. One registry per kind of loss."""

from posttrain.losses.kto import UNPAIRED_LOSSES, kto_kl_baseline, kto_loss
from posttrain.losses.preference import (
    PREFERENCE_LOSSES,
    PreferenceLogps,
    combine_losses,
    get_preference_loss,
)

__all__ = [
    "PREFERENCE_LOSSES",
    "UNPAIRED_LOSSES",
    "PreferenceLogps",
    "combine_losses",
    "get_preference_loss",
    "kto_kl_baseline",
    "kto_loss",
]
