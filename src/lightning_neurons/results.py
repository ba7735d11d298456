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
import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from lightning_neurons.files import write_text_atomic


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf) replaced by ``None``, so it is strict JSON.

    Python's ``json`` writes bare ``NaN``, which ``jq``, browsers and most JSON parsers reject. Tuples become lists,
    numpy and torch scalars become Python numbers.

    Example:
        >>> json_safe({"score": float("nan"), "ids": (1, 2), "x": [float("inf"), 0.5]})
        {'score': None, 'ids': [1, 2], 'x': [None, 0.5]}
    """
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return json_safe(value.item())
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item):
        return json_safe(item())
    return value


def dumps_strict(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` that writes ``null`` for NaN/inf (see :func:`json_safe`) and never a bare ``NaN``.

    Example:
        >>> dumps_strict({"auc": float("nan")})
        '{"auc": null}'
    """
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


def _nan(value: Any) -> float:
    # Inverse of json_safe for float fields: null reads back as NaN.
    return float("nan") if value is None else float(value)


#: What a unit's explanation amounts to (``UnitExplanation.kind``): ``"concept"`` (associated with its description
#: and beyond simple image statistics), ``"low_level"`` (explained by image statistics alone), ``"unclear"`` (no
#: significant association) or ``"dead"`` (never active on the probe set).
UnitKind = Literal["concept", "low_level", "unclear", "dead"]

#: Kinds in display order.
UNIT_KINDS: tuple[str, ...] = ("concept", "low_level", "unclear", "dead")

#: Text shown for a unit of kind ``"unclear"``.
NO_CLEAR_CONCEPT = "no clear concept"

#: Text shown for a unit of kind ``"dead"``.
DEAD_UNIT = "dead unit"


def shown_text(description: str, kind: str | None, low_level: str | None = None) -> str:
    """The text every sink displays for a unit: its description, ``"low-level: <statistic>"``, or a fixed label.

    ``kind=None`` (records written before kinds existed) shows the description as it is.

    Example:
        >>> shown_text("stripes", "concept"), shown_text("stripes", "low_level", "brightness")
        ('stripes', 'low-level: brightness')
        >>> shown_text("stripes", "unclear"), shown_text("", "dead")
        ('no clear concept', 'dead unit')
    """
    if kind == "dead":
        return DEAD_UNIT
    if kind == "unclear":
        return NO_CLEAR_CONCEPT
    if kind == "low_level":
        return f"low-level: {low_level or 'image statistics'}"
    return description


@dataclass(frozen=True)
class RoundIdentity:
    """What a round describes: which run, which weights, which epoch and step, under which settings.

    One value, checked wherever a round is filed, read or compared, so that a round is never filed under the
    wrong run, weights or epoch, and a change of settings starts a new drift baseline instead of counting as drift.

    Args:
        run: Identifier of the run (training run or post-hoc output folder) the round belongs to.
        weights: Fingerprint of the weights the round describes (e.g. a hash of the explained layers' parameters),
            or ``None`` where unknown.
        epoch: Epoch the round is filed under (``None`` post hoc without an epoch).
        step: Global step of the weights (``None`` where unknown).
        settings: Fingerprint of the settings that change what a round means (vocabulary, class names, backend and
            its model, top_k, reduction): rounds with different fingerprints are never compared for drift.
        settings_summary: Those settings in readable form, so a new baseline can name what changed.

    Example:
        >>> a = RoundIdentity("run-1", "w0", 0, 10, "s1", {"top_k": 16})
        >>> RoundIdentity.from_dict(a.to_dict()) == a
        True
    """

    run: str
    weights: str | None = None
    epoch: int | None = None
    step: int | None = None
    settings: str = ""
    settings_summary: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dictionary."""
        return {
            "run": self.run,
            "weights": self.weights,
            "epoch": self.epoch,
            "step": self.step,
            "settings": self.settings,
            "settings_summary": json_safe(self.settings_summary),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RoundIdentity:
        """Inverse of :meth:`to_dict`."""
        return cls(
            run=str(data.get("run", "")),
            weights=data.get("weights"),
            epoch=None if data.get("epoch") is None else int(data["epoch"]),
            step=None if data.get("step") is None else int(data["step"]),
            settings=str(data.get("settings", "")),
            settings_summary=dict(data.get("settings_summary") or {}),
        )


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
        score: The headline score, in ``[-1, 1]``: the Pearson correlation between the unit's activations and the
            description's image-text similarity over the recording's reservoir (a uniform sample of the probe set)
            plus the unit's top samples, whole images (:func:`lightning_neurons.explanation.metrics.correlation`; a
            metric that passes NeuronEval's missing- and extra-labels tests, on one scale across models and
            vocabulary sizes). NaN for a dead unit.
        margin: Mean similarity of the description with the top crops minus its mean with the control crops.
        concept_score: The value that chose the description: its correlation (``ExplainConfig.selection=
            "correlation"``, the default) or its corrected, rank-weighted top-crop concept score (``"concept_score"``).
        alternatives: The next best concepts with their values on the same scale.
        source: ``"concept"`` when the description is a vocabulary concept, ``"describe"`` when it is a
            caption-and-summarise phrase.
        top_sample_ids: Probe-sample ids of the unit's top activations, best first.
        activations: The matching activation values.
        boxes: Region of each top sample the crop was cut from, ``(x0, y0, x1, y1)`` in input pixels.
        ablation: Classes hurt most when the unit is zeroed, as ``(class, drop)``: the drop of the class's mean
            true-class probability on the probe's reservoir samples (``ExplainConfig.ablation_measure``).
        combination: A multi-concept explanation, ``[Alternative(concept, weight), ...]`` heaviest first (a
            sparse non-negative combination fitted to the unit's activations, kept only where it predicts them
            better than the description; :mod:`lightning_neurons.explanation.multi_concept`), or ``None``.
        confidence: How often the description beats the best concept of a random set of the layer's top crops, in
            ``[0, 1]`` (0.5 = chance; a random-weight network sits near it), or ``None`` where not computed.
        kind: What the explanation amounts to (:data:`UnitKind`): ``"concept"``, ``"low_level"``, ``"unclear"`` or
            ``"dead"``; ``None`` in records written before kinds existed (shown as the description).
        p_value: Significance of the unit's association with its description: the permutation p-value with the
            selection among all concepts repeated under the null (``None`` where not computed).
        q_value: ``p_value`` adjusted by Benjamini-Hochberg over the layer's units.
        low_level: The simple image statistic that explains the unit best (``"brightness"``, ``"red"``, ...), shown
            for kind ``"low_level"``.
        concept_gain: Cross-validated correlation the concept adds beyond the image statistics.
        auc: Secondary score: AUC of the description's similarity over the top crops against control crops.
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
    combination: list[Alternative] | None = None
    confidence: float | None = None
    kind: str | None = None
    p_value: float | None = None
    q_value: float | None = None
    low_level: str | None = None
    concept_gain: float | None = None
    auc: float | None = None

    @property
    def shown(self) -> str:
        """The text every sink displays (:func:`shown_text`).

        The description, ``"low-level: ..."``, ``"no clear concept"`` or ``"dead unit"``.
        """
        return shown_text(self.description, self.kind, self.low_level)

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
        for key in ("score", "margin", "concept_score"):
            if key in data:
                data[key] = _nan(data[key])
        data["alternatives"] = [Alternative(a["text"], _nan(a["score"])) for a in data.get("alternatives", [])]
        data["activations"] = [_nan(a) for a in data.get("activations", [])]
        data["boxes"] = [tuple(b) for b in data.get("boxes", [])]
        if data.get("ablation") is not None:
            data["ablation"] = [(str(c), _nan(v)) for c, v in data["ablation"]]
        if data.get("combination") is not None:
            data["combination"] = [Alternative(a["text"], _nan(a["score"])) for a in data["combination"]]
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class RoundEvaluation:
    """The quality metrics of a round and of its baselines, measured on the same held-out probe samples.

    Args:
        method: Name of the explaining method (the backend's name).
        metrics: The round's metrics (see :func:`~lightning_neurons.evaluation.evaluate_round`).
        baselines: ``{"random" | "constant" | "label": metrics}`` of the baselines.

    Example:
        >>> ev = RoundEvaluation("embedded", {"simulation": 0.3}, {"random": {"simulation": 0.0}})
        >>> ev.methods()["random"]["simulation"]
        0.0
    """

    method: str
    metrics: dict[str, Any] = field(default_factory=dict)
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)

    def methods(self) -> dict[str, dict[str, Any]]:
        """``{method: metrics}``: the round's method first, then the baselines."""
        return {self.method: self.metrics, **self.baselines}

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dictionary."""
        return {"method": self.method, "metrics": self.metrics, "baselines": self.baselines}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoundEvaluation:
        """Inverse of :meth:`to_dict`."""
        return cls(str(data["method"]), dict(data.get("metrics", {})), dict(data.get("baselines", {})))


@dataclass
class ExplanationRound:
    """All unit explanations of one explanation round.

    Args:
        epoch: Training epoch of the round (``None`` post hoc).
        units: One explanation per unit, ordered by layer then unit.
        meta: Free-form facts about the round (backend, vocabulary size, correction, timings, counts).
        previews: Per ``(layer, unit)``, a ``uint8`` tensor ``[n, 3, h, w]`` of the unit's top region crops with
            the activated region outlined; for logging only, never serialised.
        evaluation: The round's quality metrics and baselines (``evaluate=True``), else ``None``.
        identity: Which run, weights, epoch, step and settings the round describes (:class:`RoundIdentity`), or
            ``None`` for rounds made before identities existed.
    """

    epoch: int | None
    units: list[UnitExplanation] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    previews: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict, repr=False, compare=False)
    evaluation: RoundEvaluation | None = None
    identity: RoundIdentity | None = None

    def __iter__(self) -> Iterator[UnitExplanation]:
        return iter(self.units)

    def __len__(self) -> int:
        return len(self.units)

    @property
    def layers(self) -> list[str]:
        """Layer names in first-seen order."""
        return list(dict.fromkeys(u.layer for u in self.units))

    def units_of(self, name: str) -> list[int]:
        """The unit indices of one layer in this round, ascending."""
        return sorted(u.unit for u in self.units if u.layer == name)

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
        data: dict[str, Any] = {"epoch": self.epoch, "meta": self.meta, "units": [u.to_dict() for u in self.units]}
        if self.evaluation is not None:
            data["evaluation"] = self.evaluation.to_dict()
        if self.identity is not None:
            data["identity"] = self.identity.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExplanationRound:
        """Inverse of :meth:`to_dict`."""
        return cls(
            epoch=data.get("epoch"),
            units=[UnitExplanation.from_dict(u) for u in data.get("units", [])],
            meta=dict(data.get("meta", {})),
            evaluation=RoundEvaluation.from_dict(data["evaluation"]) if data.get("evaluation") else None,
            identity=RoundIdentity.from_dict(data["identity"]) if data.get("identity") else None,
        )

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialise to strict JSON (``null`` for NaN), and write it to ``path`` when given.

        The file is written to a temporary name, flushed to disk and renamed, so a crash or a full disk never
        leaves half a round file.
        """
        text = dumps_strict(self.to_dict(), indent=1, ensure_ascii=False)
        if path is not None:
            write_text_atomic(path, text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> ExplanationRound:
        """Read a round from a JSON string or a file path."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text(encoding="utf-8")
        return cls.from_dict(json.loads(text))
