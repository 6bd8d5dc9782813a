"""Eval gates: ``"demo_accuracy >= 0.4"`` or ``"ifeval_prompt_strict >= parent - 0.02"``.

A gate compares one of the stage's eval metrics with a number, or with the same metric of the
stage's parent (its ``from`` stage) plus or minus a margin. A failed gate marks the stage failed:
its descendants do not run and the pipeline head stays on the last good model.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

_GATE = re.compile(
    r"^\s*(?P<metric>[A-Za-z_][\w@.\-/]*)\s*(?P<op>>=|<=|>|<|==)\s*"
    r"(?:(?P<number>[-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)|parent\s*(?:(?P<sign>[-+])\s*(?P<offset>\d+(?:\.\d*)?(?:[eE][-+]?\d+)?))?)\s*$"
)
_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}


@dataclass(frozen=True)
class Gate:
    text: str
    metric: str
    op: str
    threshold: float | None  # absolute threshold, or None for a parent-relative gate
    offset: float = 0.0  # parent-relative: parent value + offset

    @property
    def relative(self) -> bool:
        return self.threshold is None

    def evaluate(self, metrics: dict[str, float], parent: dict[str, float] | None) -> dict[str, object]:
        """A verdict: the value, the bound it was compared with, and whether it passed."""
        value = metrics.get(self.metric)
        if self.relative:
            base = None if parent is None else parent.get(self.metric)
            bound = None if base is None else base + self.offset
        else:
            bound = self.threshold
        passed = value is not None and bound is not None and bool(_OPS[self.op](value, bound))
        reason = ("passed" if passed else "the metric is missing" if value is None
                  else "the parent has no such metric" if bound is None else "below the bound")
        return {"gate": self.text, "metric": self.metric, "value": value, "bound": bound, "passed": passed,
                "reason": reason}


def parse_gate(text: str) -> Gate:
    """Parse one gate; raises ValueError with the fix (pydantic turns it into a problem)."""
    match = _GATE.match(text)
    if not match:
        raise ValueError(f"cannot parse gate {text!r}; fix: write 'METRIC OP NUMBER' or "
                         "'METRIC OP parent [+|- NUMBER]', e.g. 'demo_accuracy >= parent - 0.02'")
    number = match["number"]
    if number is not None:
        return Gate(text, match["metric"], match["op"], float(number))
    offset = float(match["offset"] or 0.0) * (-1 if match["sign"] == "-" else 1)
    return Gate(text, match["metric"], match["op"], None, offset)


def produced_by(metric: str, tasks: list[str]) -> bool:
    """Eval metrics are named ``<task>`` or ``<task>_<detail>`` (e.g. gsm8k_accuracy)."""
    return any(metric == t or metric.startswith(t + "_") or metric.startswith(t.split(":")[-1] + "_")
               for t in tasks)
