"""Diagnostics: silent failures turned into alarms.

A diagnostic is called after every optimizer step with the step's metrics and returns alarm
messages (usually none). It keeps its own window of history; after it fires it waits a window
before firing again, so one problem gives one alarm per window, not one per step.
"""

from __future__ import annotations

import math
from collections import deque


class _Windowed:
    def __init__(self, window: int) -> None:
        self.window = window
        self.history: deque[dict[str, float]] = deque(maxlen=window)
        self.quiet_until = 0

    def _ready(self, step: int, metrics: dict[str, float], keys: tuple[str, ...]) -> bool:
        if not all(k in metrics and math.isfinite(metrics[k]) for k in keys):
            return False
        self.history.append({k: metrics[k] for k in keys})
        return len(self.history) == self.window and step >= self.quiet_until

    def _fired(self, step: int) -> None:
        self.quiet_until = step + self.window


class MarginCollapseAlarm(_Windowed):
    """Chosen log-probs falling together with rejected ones (likelihood displacement).

    DPO can raise the margin while pushing probability off *both* responses; the loss looks
    healthy while the model unlearns the chosen answers. Fires when, over the window, the mean
    per-token chosen logp fell by more than ``threshold`` nats and the rejected logp fell too.
    """

    keys = ("logps_per_token/chosen", "logps_per_token/rejected")

    def __init__(self, window: int, threshold: float) -> None:
        super().__init__(window)
        self.threshold = threshold

    def __call__(self, step: int, metrics: dict[str, float]) -> list[str]:
        if not self._ready(step, metrics, self.keys):
            return []
        first, last = self.history[0], self.history[-1]
        chosen_drop = first[self.keys[0]] - last[self.keys[0]]
        rejected_drop = first[self.keys[1]] - last[self.keys[1]]
        if chosen_drop > self.threshold and rejected_drop > 0:
            self._fired(step)
            return [f"margin collapse: over the last {self.window} steps chosen log-probs fell by "
                    f"{chosen_drop:.2f} nats/token together with rejected ({rejected_drop:.2f}); the policy is "
                    "moving probability off both responses. Consider an NLL term (loss rpo or + sft), a "
                    "lower lr or a higher beta."]
        return []


class LengthBiasAlarm(_Windowed):
    """The margin tracks the length gap: the policy learns "longer wins", not "better wins".

    Fires when the Pearson correlation, over the window's pairs, between the per-pair margin and
    (chosen length - rejected length) exceeds ``threshold``. Works from summed moments
    (``sum_x``, ``sum_y``, ``sum_xy``, ``sum_xx``, ``sum_yy``, ``sum_n``) so it is exact over
    micro-batches and processes.
    """

    keys = ("sum_x", "sum_y", "sum_xy", "sum_xx", "sum_yy", "sum_n")

    def __init__(self, window: int, threshold: float, min_pairs: int = 32) -> None:
        super().__init__(window)
        self.threshold, self.min_pairs = threshold, min_pairs

    def __call__(self, step: int, metrics: dict[str, float]) -> list[str]:
        if not self._ready(step, metrics, tuple(f"length_bias/{k}" for k in self.keys)):
            return []
        total = {k: sum(h[f"length_bias/{k}"] for h in self.history) for k in self.keys}
        correlation = pearson(total)
        if total["sum_n"] >= self.min_pairs and correlation is not None and correlation > self.threshold:
            self._fired(step)
            return [f"length bias: the reward margin correlates with the length gap (r = {correlation:.2f} "
                    f"over {int(total['sum_n'])} pairs); the policy may be learning that longer wins. Check the "
                    "data's length balance, or use a length-normalised loss (dpo_norm, simpo)."]
        return []


def pearson(moments: dict[str, float]) -> float | None:
    """Correlation from summed moments; None when a variance is zero."""
    n = moments["sum_n"]
    if n < 2:
        return None
    cov = moments["sum_xy"] - moments["sum_x"] * moments["sum_y"] / n
    var_x = moments["sum_xx"] - moments["sum_x"] ** 2 / n
    var_y = moments["sum_yy"] - moments["sum_y"] ** 2 / n
    if var_x <= 1e-12 or var_y <= 1e-12:
        return None
    return cov / math.sqrt(var_x * var_y)
