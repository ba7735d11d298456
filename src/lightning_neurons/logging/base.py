"""The output interface: what every logger family receives after an explanation round.

The session builds one :class:`RoundOutput` per round (the round, its drift, the per-layer summaries, the step to
log at and, with ``evaluate=True``, the quality metrics of the method and its baselines) and hands it to every
:class:`RoundWriter` it holds: one per configured logger family (TensorBoard, W&B, MLflow, any other Lightning
logger), chosen by ``isinstance`` over ``trainer.loggers``. Writers never read the callback, the Trainer or the
session: what they need is in the value they are given.

Example:
    >>> class PrintWriter:
    ...     def write_round(self, output: RoundOutput) -> None:
    ...         print(output.step, output.round.layers)
    ...     def close(self) -> None:
    ...         pass
    >>> from lightning_neurons.results import ExplanationRound
    >>> PrintWriter().write_round(RoundOutput(ExplanationRound(0, []), drift=[], summaries=[], step=0, epoch=0))
    0 []
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from lightning_neurons.drift.metrics import LayerDriftSummary, UnitDrift
from lightning_neurons.results import ExplanationRound


@dataclass(frozen=True)
class RoundOutput:
    """Everything a writer logs for one explained round.

    Args:
        round: The explanation round (its ``previews`` hold the region crops of the logged units).
        drift: Per-unit drift against the previous round (``RunHistory.add_round``).
        summaries: Per-layer drift summaries of this round (``RunHistory.summary``).
        step: The step every logger files the round under (the epoch, or the global step under step-based
            validation).
        epoch: The trainer epoch the round belongs to.
        evaluation: ``{method: {metric: value}}`` with ``evaluate=True`` (the backend's name first, then the
            ``random`` / ``constant`` / ``label`` baselines); empty otherwise.
        output_dir: The run's ``neurons`` folder (history, report, previews), if any.
        prefix: First component of every tag (the explainer's name-derived prefix, ``"neurons"`` by default).
        global_step: The trainer's global step at the round (W&B files every metric under
            ``trainer/global_step``); ``None`` post hoc, where writers use ``step``.
    """

    round: ExplanationRound
    drift: Sequence[UnitDrift]
    summaries: Sequence[LayerDriftSummary]
    step: int
    epoch: int
    evaluation: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    output_dir: Path | None = None
    prefix: str = "neurons"
    global_step: int | None = None


@runtime_checkable
class RoundWriter(Protocol):
    """One logger family's view of an explanation round."""

    def write_round(self, output: RoundOutput) -> None:
        """Log one round (called on global rank 0 only)."""

    def close(self) -> None:
        """Flush what is buffered (end of the run)."""


__all__ = ["RoundOutput", "RoundWriter"]
