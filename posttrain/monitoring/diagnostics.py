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


class RLHealth:
    """Per-step health of an online run: alarms, and a stop when a run is training on nothing.

    Stops (``TrainingAborted``, naming the likely cause and the setting to change) when, for
    ``stop_after`` steps in a row, nearly every completion was truncated or nearly every group had
    zero reward variance. Alarms: sampler/trainer logprob gap, importance ratio, KL, response
    length growth, masked (None) rewards.
    """

    def __init__(self, cfg, where: str) -> None:
        self.cfg, self.where = cfg, where
        self.truncated_run = 0
        self.flat_run = 0
        self.lengths: deque[float] = deque(maxlen=cfg.window)
        self.last_fired: dict[str, int] = {}

    def state_dict(self) -> dict[str, object]:
        return {"truncated_run": self.truncated_run, "flat_run": self.flat_run, "lengths": list(self.lengths),
                "last_fired": dict(self.last_fired)}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.truncated_run, self.flat_run = int(state["truncated_run"]), int(state["flat_run"])
        self.lengths = deque(state["lengths"], maxlen=self.cfg.window)
        self.last_fired = dict(state["last_fired"])

    def check(self, step: int, m: dict[str, float]) -> list[str]:
        """Alarm messages for this step (each kind at most once per window)."""
        self._stops(step, m)
        out = []
        for kind, message in self._alarms(m):
            if step - self.last_fired.get(kind, -self.cfg.window) >= self.cfg.window:
                self.last_fired[kind] = step
                out.append(message)
        return out

    def _alarms(self, m: dict[str, float]) -> list[tuple[str, str]]:
        alarms = []
        c = self.cfg
        if m.get("logprob_gap_max", 0.0) > c.logprob_gap:
            alarms.append(("gap", f"sampler and trainer disagree: max logprob gap {m['logprob_gap_max']:.3g} nats "
                          f"(> {c.logprob_gap}); check that the sampler has the current weights and the same "
                          "temperature, or enable tis_cap"))
        if m.get("ratio_max", 1.0) > c.max_ratio:
            alarms.append(("ratio", f"importance ratio {m['ratio_max']:.3g} > {c.max_ratio}: updates are far off-policy; "
                          "lower lr or ppo_epochs"))
        if m.get("kl", 0.0) > c.kl:
            alarms.append(("kl", f"KL to the reference {m['kl']:.3g} per token > {c.kl}: the policy is drifting; raise "
                          "kl.beta or set kl.target"))
        if m.get("masked_reward_share", 0.0) > 0.5:
            alarms.append(("masked", f"{m['masked_reward_share']:.0%} of rewards are masked (None): check the reward"))
        alarms += [("length", message) for message in self._length_trend(m)]
        return alarms

    def _stops(self, step: int, m: dict[str, float]) -> None:
        from posttrain.errors import problem
        from posttrain.loops.offline import TrainingAborted

        c = self.cfg
        self.truncated_run = self.truncated_run + 1 if m.get("truncated_share", 0.0) >= c.truncated_share else 0
        self.flat_run = self.flat_run + 1 if m.get("zero_variance_share", 0.0) >= c.zero_variance_share else 0
        if self.truncated_run >= c.stop_after:
            raise TrainingAborted(problem(
                f"{self.where} step {step}", f"{m['truncated_share']:.0%} of completions hit the length limit for "
                f"{self.truncated_run} steps in a row: the policy is learning from cut-off text",
                "raise sampling.max_new_tokens, check that the EOS/stop tokens are right, or add an overlong "
                "penalty reward"))
        if self.flat_run >= c.stop_after:
            raise TrainingAborted(problem(
                f"{self.where} step {step}", f"{m['zero_variance_share']:.0%} of groups had identical rewards for "
                f"{self.flat_run} steps in a row: the advantages are zero, nothing is being learned",
                "check the reward on a few samples (is it constant?), make the prompts easier/harder, raise "
                "sampling.temperature or sampling.n, or enable dynamic_sampling"))

    def _length_trend(self, m: dict[str, float]) -> list[str]:
        length = m.get("completion_length")
        if length is None:
            return []
        self.lengths.append(length)
        if len(self.lengths) < self.cfg.window or self.lengths[0] <= 0:
            return []
        growth = self.lengths[-1] / self.lengths[0] - 1
        if growth > self.cfg.length_growth:
            first = self.lengths[0]
            self.lengths.clear()
            return [f"response length grew {growth:.0%} over {self.cfg.window} steps ({first:.1f} -> {length:.1f} "
                    "tokens): check for a reward that pays for length (reward hacking)"]
        return []
