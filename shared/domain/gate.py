"""The evaluation gate's rule: is the new model good enough to take the live one's traffic? Pure.

The new and the live deployment answer the same test rows (greedy); both answers are scored against the
dataset's reference assistant turns (ROUGE-L F1, `shared.usecases.rollout.gate`). The new model is promoted
when its score is no worse than the live one's by more than the allowed regression and, when the sidecar sets
them, at least its absolute minimum and with a final eval_loss no higher than its maximum. The first model on
an endpoint has nothing to compare with: only the absolute thresholds apply (none by default).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

EPSILON = 1e-9
"""Scores equal up to float noise count as equal (a tie at the boundary passes)."""


@dataclass(frozen=True)
class GateThresholds:
    max_regression: float
    min_rouge_l: float | None = None
    max_eval_loss: float | None = None

    @classmethod
    def of(cls, *, setting_regression: float, sidecar: Mapping[str, Any] | None) -> GateThresholds:
        """GATE_MAX_REGRESSION, tightened (never loosened) by the sidecar's `gate.max_regression`."""
        gate = dict(sidecar or {})
        regression = setting_regression
        if gate.get("max_regression") is not None:
            regression = min(regression, float(gate["max_regression"]))
        return cls(
            max_regression=regression,
            min_rouge_l=None if gate.get("min_rouge_l") is None else float(gate["min_rouge_l"]),
            max_eval_loss=None if gate.get("max_eval_loss") is None else float(gate["max_eval_loss"]),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_regression": self.max_regression,
            "min_rouge_l": self.min_rouge_l,
            "max_eval_loss": self.max_eval_loss,
        }


@dataclass(frozen=True)
class Scores:
    """One model's scores on the gate's rows: mean ROUGE-L F1 (None: no row scored) and the final eval_loss
    of its job (None: not reported)."""

    rouge_l: float | None
    eval_loss: float | None = None


@dataclass(frozen=True)
class Verdict:
    promote: bool
    reasons: tuple[str, ...] = ()
    """Why not (empty when promoted)."""
    notes: tuple[str, ...] = field(default_factory=tuple)
    """What could not be checked, and why."""

    def sentence(self) -> str:
        return "; ".join(self.reasons) if self.reasons else "no threshold failed"


def decide(new: Scores, live: Scores | None, thresholds: GateThresholds) -> Verdict:
    """The gate's verdict. `live` is None for the first model on an endpoint (absolute thresholds only)."""
    reasons: list[str] = []
    notes: list[str] = []
    if live is None:
        notes.append("first model on this endpoint: nothing to compare with, absolute thresholds only")
    elif new.rouge_l is None or live.rouge_l is None:
        notes.append("no answers were scored (GATE_ROWS=0 or no test rows): ROUGE-L not compared")
    elif new.rouge_l < live.rouge_l - thresholds.max_regression - EPSILON:
        reasons.append(
            f"ROUGE-L {new.rouge_l:.4f} is {live.rouge_l - new.rouge_l:.4f} below the live model's "
            f"{live.rouge_l:.4f} (at most {thresholds.max_regression:g} allowed)"
        )
    if thresholds.min_rouge_l is not None:
        if new.rouge_l is None:
            reasons.append(f"min_rouge_l {thresholds.min_rouge_l:g} is set but no answer was scored")
        elif new.rouge_l < thresholds.min_rouge_l - EPSILON:
            reasons.append(f"ROUGE-L {new.rouge_l:.4f} is below the sidecar's min_rouge_l {thresholds.min_rouge_l:g}")
    if thresholds.max_eval_loss is not None:
        if new.eval_loss is None:
            notes.append(f"max_eval_loss {thresholds.max_eval_loss:g} not checked: the job reported no eval_loss")
        elif new.eval_loss > thresholds.max_eval_loss + EPSILON:
            reasons.append(
                f"final eval_loss {new.eval_loss:.4f} is above the sidecar's max_eval_loss {thresholds.max_eval_loss:g}"
            )
    return Verdict(promote=not reasons, reasons=tuple(reasons), notes=tuple(notes))
