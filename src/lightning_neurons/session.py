"""The explanation half of :class:`~lightning_neurons.NeuronExplainer` (work in progress: filled by the lead).

The callback owns recording; this object owns what lives across explanation rounds: the loaded backend, the
vocabulary, the drift history and the TensorBoard writer. It reads its settings from the callback's attributes
(the callback's ``__init__`` arguments, stored under the same names).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl

from lightning_neurons.recording.samples import SampleSource
from lightning_neurons.recording.types import Recording
from lightning_neurons.results import ExplanationRound

if TYPE_CHECKING:
    from lightning_neurons.callback import NeuronExplainer


class ExplanationSession:
    """Backend, vocabulary, history and logging of one run. Used on global rank 0 only."""

    def __init__(self, explainer: NeuronExplainer) -> None:
        self.explainer = explainer
        self.rounds: list[ExplanationRound] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Load and check the foundation models and the vocabulary (before the first training step)."""

    def run(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, recording: Recording, source: SampleSource
    ) -> ExplanationRound:
        """Explain one recording, update the drift history, log it; returns the round."""
        rnd = ExplanationRound(epoch=recording.epoch)
        self.rounds.append(rnd)
        return rnd

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue the drift history."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""

    def teardown(self) -> None:
        """Release the models."""
