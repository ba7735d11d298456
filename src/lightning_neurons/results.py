"""Result types of an explanation round.

One :class:`UnitExplanation` per explained unit, gathered in an :class:`ExplanationRound` per
explained epoch (or per post-hoc call). Both round-trip through plain JSON so that nothing
downstream (drift history, reports, evaluation) depends on TensorBoard or on pickles.

Example:
    >>> unit = UnitExplanation(layer="layer4", unit=3, epoch=2, description="stripes", score=0.91)
    >>> rnd = ExplanationRound(epoch=2, units=[unit])
    >>> ExplanationRound.from_dict(rnd.to_dict()).get("layer4", 3).description
    'stripes'
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class Alternative:
    """A runner-up concept for a unit.

    Args:
        text: The concept.
        score: Its corrected image-text similarity with the unit's top crops (same scale as the winner).
    """

    text: str
    score: float


@dataclass
class UnitExplanation:
    """The explanation of one unit at one epoch.

    Args:
        layer: Layer name as given by ``model.named_modules()``.
        unit: Channel / hidden-dimension index inside the layer.
        epoch: Training epoch the explanation belongs to (``None`` post hoc without an epoch).
        description: Short natural-language description (the best concept or the describe-stage phrase).
        score: AUC in ``[0, 1]`` of the description's image-text similarity over the unit's top crops against
            the control crops (0.5 = chance).
        margin: Mean similarity of the description with the top crops minus its mean with the control crops.
        concept_score: The corrected, rank-weighted concept score that chose the description.
        alternatives: The next best concepts with their concept scores.
        source: ``"concept"`` when the description is a vocabulary concept, ``"describe"`` when it is a
            caption-and-summarise phrase.
        top_sample_ids: Probe-sample ids of the unit's top activations, best first.
        activations: The matching activation values.
        boxes: Region of each top sample the crop was cut from, ``(x0, y0, x1, y1)`` in input pixels.
        ablation: Classes hurt most when the unit is zeroed, as ``(class, drop)``: the drop of the class's mean
            true-class probability on the probe's reservoir samples (``ExplainConfig.ablation_measure``).
    """

    layer: str
    unit: int
    epoch: int | None
    description: str
    score: float
    margin: float = 0.0
    concept_score: float = 0.0
    alternatives: list[Alternative] = field(default_factory=list)
    source: str = "concept"
    top_sample_ids: list[int] = field(default_factory=list)
    activations: list[float] = field(default_factory=list)
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)
    ablation: list[tuple[str, float]] | None = None

    @property
    def key(self) -> tuple[str, int]:
        """``(layer, unit)``, the identity of the unit across epochs."""
        return (self.layer, self.unit)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dictionary."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UnitExplanation:
        """Inverse of :meth:`to_dict`."""
        data = dict(data)
        data["alternatives"] = [Alternative(**a) for a in data.get("alternatives", [])]
        data["boxes"] = [tuple(b) for b in data.get("boxes", [])]
        if data.get("ablation") is not None:
            data["ablation"] = [tuple(a) for a in data["ablation"]]
        return cls(**data)


@dataclass
class ExplanationRound:
    """All unit explanations of one explanation round.

    Args:
        epoch: Training epoch of the round (``None`` post hoc).
        units: One explanation per unit, ordered by layer then unit.
        meta: Free-form facts about the round (backend, vocabulary size, correction, timings, counts).
        previews: Per ``(layer, unit)``, a ``uint8`` tensor ``[n, 3, h, w]`` of the unit's top region crops with
            the activated region outlined; for logging only, never serialised.
    """

    epoch: int | None
    units: list[UnitExplanation] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    previews: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    def __iter__(self) -> Iterator[UnitExplanation]:
        return iter(self.units)

    def __len__(self) -> int:
        return len(self.units)

    @property
    def layers(self) -> list[str]:
        """Layer names in first-seen order."""
        return list(dict.fromkeys(u.layer for u in self.units))

    def layer(self, name: str) -> list[UnitExplanation]:
        """The explanations of one layer, ordered by unit."""
        return sorted((u for u in self.units if u.layer == name), key=lambda u: u.unit)

    def get(self, layer: str, unit: int) -> UnitExplanation:
        """The explanation of one unit.

        Raises:
            KeyError: If the unit was not explained in this round.
        """
        for u in self.units:
            if u.layer == layer and u.unit == unit:
                return u
        raise KeyError(f"unit {unit} of layer {layer!r} is not in this round (layers: {self.layers})")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dictionary (previews are left out)."""
        return {"epoch": self.epoch, "meta": self.meta, "units": [u.to_dict() for u in self.units]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExplanationRound:
        """Inverse of :meth:`to_dict`."""
        return cls(
            epoch=data.get("epoch"),
            units=[UnitExplanation.from_dict(u) for u in data.get("units", [])],
            meta=dict(data.get("meta", {})),
        )

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialise to JSON, and write it to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> ExplanationRound:
        """Read a round from a JSON string or a file path."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        return cls.from_dict(json.loads(text))
