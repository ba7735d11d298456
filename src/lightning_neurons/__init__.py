"""lightning_neurons: natural-language explanations of vision neurons while a Lightning model trains.

Example:
    >>> from lightning_neurons import NeuronExplainer
    >>> explainer = NeuronExplainer(layers=["layer3", "layer4"], top_k=16)  # doctest: +SKIP
    >>> trainer = lightning.Trainer(callbacks=[explainer])  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> defining module. Imported lazily so that `import lightning_neurons` stays cheap
# (no transformers/open_clip import until a backend is actually used).
_EXPORTS = {
    "NeuronExplainer": "lightning_neurons.callback",
    "collect_top_k": "lightning_neurons.recording.recorder",
    "ActivationRecorder": "lightning_neurons.recording.recorder",
    "Recording": "lightning_neurons.recording.types",
    "LayerTopK": "lightning_neurons.recording.types",
    "explain": "lightning_neurons.posthoc",
    "explain_checkpoints": "lightning_neurons.posthoc",
    "ExplainConfig": "lightning_neurons.explanation.pipeline",
    "explain_recording": "lightning_neurons.explanation.pipeline",
    "UnitExplanation": "lightning_neurons.results",
    "ExplanationRound": "lightning_neurons.results",
    "Alternative": "lightning_neurons.results",
    "Backend": "lightning_neurons.backends.base",
    "load_backend": "lightning_neurons.backends",
    "Vocabulary": "lightning_neurons.concepts.vocabulary",
    "RunHistory": "lightning_neurons.drift.history",
    "load_history": "lightning_neurons.drift.history",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from lightning_neurons.backends import load_backend
    from lightning_neurons.backends.base import Backend
    from lightning_neurons.callback import NeuronExplainer
    from lightning_neurons.concepts.vocabulary import Vocabulary
    from lightning_neurons.drift.history import RunHistory, load_history
    from lightning_neurons.explanation.pipeline import ExplainConfig, explain_recording
    from lightning_neurons.posthoc import explain, explain_checkpoints
    from lightning_neurons.recording.recorder import ActivationRecorder, collect_top_k
    from lightning_neurons.recording.types import LayerTopK, Recording
    from lightning_neurons.results import Alternative, ExplanationRound, UnitExplanation


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_neurons' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
