"""Per-unit rows of a round: the one view every sink shows, in its own form.

:func:`unit_row` builds the row of one unit from :attr:`UnitExplanation.shown <lightning_neurons.results.
UnitExplanation.shown>` (the description, ``"low-level: <statistic>"``, ``"no clear concept"`` or ``"dead unit"``),
its kind, score and significance, and its drift. Every sink uses it: the TensorBoard table and unit cards, the W&B
table (``wandb.Table``), MLflow's ``table_epoch_N.csv`` / ``.json``, the CSV files of any other logger, the HTML
report, the projector, and the ``lightning-neurons history`` / ``explain`` printouts, so that no sink shows a raw best
concept where another shows "no clear concept". :func:`concept_distribution` counts the layer's units per shown
text, so that a layer collapsing onto one word is visible.

Example:
    >>> from lightning_neurons.results import ExplanationRound, UnitExplanation
    >>> rnd = ExplanationRound(0, [UnitExplanation("fc", 0, 0, "dots", 0.8, activations=[1.5], kind="unclear")])
    >>> out = RoundOutput(rnd, drift=[], summaries=[], step=0, epoch=0)
    >>> row = layer_rows(out, "fc")[0]
    >>> row["description"], row["kind"], row["score"], is_dead(rnd.units[0])
    ('no clear concept', 'unclear', 0.8, False)
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from lightning_neurons.drift.metrics import UnitDrift, has_concept
from lightning_neurons.explanation.multi_concept import format_combination
from lightning_neurons.explanation.scoring import shown_description
from lightning_neurons.logging.base import RoundOutput
from lightning_neurons.results import NO_CLEAR_CONCEPT, UnitExplanation

#: Columns of :func:`unit_row`, in order. ``description`` is the *shown* text (``UnitExplanation.shown``), never the
#: raw best concept of a unit without one; ``previous_description`` is the text shown at the unit's previous round.
ROW_COLUMNS = (
    "epoch",
    "unit",
    "description",
    "kind",
    "score",
    "q_value",
    "p_value",
    "concept_gain",
    "confidence",
    "combination",
    "changed",
    "gained",
    "lost",
    "baseline",
    "previous_description",
    "similarity",
    "drift",
    "jaccard",
    "alternatives",
    "concept_jaccard",
    "concepts_changed",
)


def _num(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def is_dead(u: UnitExplanation) -> bool:
    """Whether a unit is dead on the probe: kind ``"dead"``.

    Records without kinds: no description, or no positive activation among its top samples. A ReLU unit whose
    largest probe activation is ``<= 0`` never fires; a unit without top samples got no description (empty text,
    NaN score).

    Example:
        >>> is_dead(UnitExplanation("fc", 0, 0, "", float("nan")))
        True
        >>> is_dead(UnitExplanation("fc", 1, 0, "dots", 0.5, activations=[0.0, 0.0]))
        True
        >>> is_dead(UnitExplanation("fc", 2, 0, "dots", 0.5, kind="concept"))
        False
    """
    if u.kind is not None:
        return u.kind == "dead"
    if not u.description or not u.activations:
        return True
    return max(u.activations) <= 0.0


def shown(u: UnitExplanation, confidence_threshold: float | None = None) -> str:
    """The text a sink displays for a unit: :attr:`UnitExplanation.shown`.

    Records made before kinds existed (``kind=None``) keep the rule they were shown with: "no clear concept" at or
    below their round's ``confidence_threshold``.

    Example:
        >>> shown(UnitExplanation("fc", 0, 0, "bottle neck", 0.9, kind="unclear"))
        'no clear concept'
        >>> shown(UnitExplanation("fc", 0, 0, "bottle neck", 0.9, confidence=0.6), 0.85)
        'no clear concept'
    """
    if u.kind is not None:
        return u.shown
    return shown_description(u.description, u.confidence, confidence_threshold)


def shows_concept(u: UnitExplanation, confidence_threshold: float | None = None) -> bool:
    """Whether the unit is shown with a concept (its combination and alternatives are shown only then).

    Example:
        >>> shows_concept(UnitExplanation("fc", 0, 0, "dots", 0.9, kind="low_level", low_level="red"))
        False
    """
    text = shown(u, confidence_threshold)
    return bool(text) and has_concept(u.kind) and text != NO_CLEAR_CONCEPT


def unit_row(
    u: UnitExplanation,
    d: UnitDrift | None = None,
    *,
    epoch: int | None = None,
    confidence_threshold: float | None = None,
) -> dict[str, Any]:
    """The row every sink shows for one unit (columns :data:`ROW_COLUMNS`).

    Args:
        u: The unit's explanation.
        d: Its drift against its previous round (``None``: none computed).
        epoch: The epoch (or step) the row is filed under (default ``u.epoch``).
        confidence_threshold: The round's confidence threshold, for records without kinds (see :func:`shown`).

    Returns:
        ``description`` (the shown text), ``kind``, ``score``, ``q_value`` / ``p_value`` (significance; ``None``
        where not computed), ``concept_gain``, ``confidence`` (records without kinds), ``combination`` (concept
        units only, ``"stripes (0.62) + zebra (0.38)"``), ``changed`` / ``gained`` / ``lost`` / ``baseline`` (see
        :class:`~lightning_neurons.drift.metrics.UnitDrift`), ``previous_description`` (the text shown at the
        previous round), ``similarity`` and ``drift`` of the two descriptions, top-k ``jaccard``, ``alternatives``
        (concept units only), ``concept_jaccard`` and ``concepts_changed``. Missing values are ``None`` (JSON
        ``null``, an empty CSV cell), never NaN.

    Example:
        >>> u = UnitExplanation("fc", 3, 1, "stripes", 0.41, kind="concept", q_value=0.002)
        >>> d = UnitDrift("fc", 3, 1, "stripes", 0.41, 0, "grass", 0.3, kind="concept", previous_kind="low_level",
        ...               previous_shown="low-level: green", gained=True)
        >>> row = unit_row(u, d)
        >>> row["description"], row["gained"], row["changed"], row["previous_description"]
        ('stripes', True, False, 'low-level: green')
    """
    concept = shows_concept(u, confidence_threshold)
    previous = None
    if d is not None and d.previous_description is not None:
        previous = d.previous_shown if d.previous_shown is not None else d.previous_description
    return {
        "epoch": u.epoch if epoch is None else epoch,
        "unit": int(u.unit),
        "description": shown(u, confidence_threshold),
        "kind": u.kind,
        "score": _num(u.score),
        "q_value": _num(u.q_value),
        "p_value": _num(u.p_value),
        "concept_gain": _num(u.concept_gain),
        "confidence": _num(u.confidence),
        # "stripes (0.62) + zebra (0.38)": the multi-concept explanation, weights summing to 1 (None without)
        "combination": format_combination(u.combination) if u.combination and concept else None,
        "changed": bool(d is not None and d.changed),
        "gained": bool(d is not None and d.gained),
        "lost": bool(d is not None and d.lost),
        "baseline": bool(d is not None and d.baseline),
        "previous_description": previous,
        "similarity": _num(d.similarity) if d is not None else None,
        "drift": _num(d.drift) if d is not None else None,
        "jaccard": _num(d.jaccard) if d is not None else None,
        "alternatives": "; ".join(a.text for a in u.alternatives) if concept else "",
        "concept_jaccard": _num(d.concept_jaccard) if d is not None else None,
        "concepts_changed": bool(d is not None and d.concepts_changed),
    }


class _Record(Protocol):
    # What a history record offers (drift.history.HistoryRecord), without importing the store here.
    explanation: UnitExplanation
    drift: UnitDrift
    confidence_threshold: float | None


def record_row(record: _Record) -> dict[str, Any]:
    """:func:`unit_row` of a history record (the report, ``lightning-neurons history`` and the dashboard).

    Example:
        >>> from lightning_neurons.drift.history import HistoryRecord
        >>> u = UnitExplanation("fc", 0, 1, "dots", 0.8, kind="low_level", low_level="red")
        >>> record_row(HistoryRecord(u, UnitDrift("fc", 0, 1, "dots", 0.8)))["description"]
        'low-level: red'
    """
    d = record.drift
    return unit_row(record.explanation, d, epoch=d.epoch, confidence_threshold=record.confidence_threshold)


def round_threshold(output: RoundOutput) -> float | None:
    """The round's confidence threshold (``meta["confidence_threshold"]``), for records without kinds."""
    value = output.round.meta.get("confidence_threshold")
    return None if value is None else float(value)


def layer_rows(output: RoundOutput, layer: str) -> list[dict[str, Any]]:
    """One :func:`unit_row` per unit of ``layer`` in ``output``, in unit order.

    Example:
        >>> from lightning_neurons.results import ExplanationRound
        >>> rnd = ExplanationRound(2, [UnitExplanation("fc", 0, 2, "", float("nan"), kind="dead")])
        >>> [(r["description"], r["score"]) for r in layer_rows(RoundOutput(rnd, [], [], step=2, epoch=2), "fc")]
        [('dead unit', None)]
    """
    by_key = {(d.layer, d.unit): d for d in output.drift}
    threshold = round_threshold(output)
    return [
        unit_row(u, by_key.get(u.key), epoch=output.epoch, confidence_threshold=threshold)
        for u in output.round.layer(layer)
    ]


@dataclass(frozen=True)
class ConceptDistribution:
    """How a layer's units spread over the texts shown for them, so that a collapse onto one word is visible.

    Args:
        counts: Units per shown text, most frequent first (every unit: "no clear concept" and "low-level: ..."
            texts included).
        n_units: The layer's units.
        n_concept: Units shown with a concept.
        top_concept: The concept shown for the most units (``None`` when no unit has one).
        top_concept_share: Its units over ``n_concept`` (0.0 when no unit has a concept).

    Example:
        >>> units = [UnitExplanation("fc", i, 0, t, 0.5, kind=k) for i, (t, k) in enumerate(
        ...     [("dog", "concept"), ("dog", "concept"), ("cat", "concept"), ("x", "unclear")])]
        >>> dist = concept_distribution(units)
        >>> dist.top_concept, round(dist.top_concept_share, 3), dist.counts[0]
        ('dog', 0.667, ('dog', 2))
    """

    counts: tuple[tuple[str, int], ...]
    n_units: int
    n_concept: int
    top_concept: str | None
    top_concept_share: float

    def table(self, top: int = 10) -> list[dict[str, Any]]:
        """The ``top`` most frequent shown texts as rows ``{"description", "units", "share"}`` (share of all units)."""
        return [
            {"description": text, "units": n, "share": n / self.n_units if self.n_units else 0.0}
            for text, n in self.counts[:top]
        ]


def concept_distribution(
    units: Iterable[UnitExplanation], confidence_threshold: float | None = None
) -> ConceptDistribution:
    """Count a layer's units per shown text (:func:`shown`).

    The share of the most frequent concept among the units shown with a concept is ``top_concept_share`` (logged per
    round as ``<prefix>/<layer>/top_concept_share``).
    """
    texts: list[str] = []
    concepts: Counter[str] = Counter()
    for u in units:
        text = shown(u, confidence_threshold)
        texts.append(text)
        if shows_concept(u, confidence_threshold):
            concepts[text] += 1
    counts = tuple(sorted(Counter(texts).items(), key=lambda kv: (-kv[1], kv[0])))
    n_concept = sum(concepts.values())
    top = min(concepts.items(), key=lambda kv: (-kv[1], kv[0])) if concepts else None
    return ConceptDistribution(
        counts=counts,
        n_units=len(texts),
        n_concept=n_concept,
        top_concept=top[0] if top else None,
        top_concept_share=top[1] / n_concept if top else 0.0,
    )


def layer_distribution(output: RoundOutput, layer: str) -> ConceptDistribution:
    """:func:`concept_distribution` of one layer of a round."""
    return concept_distribution(output.round.layer(layer), round_threshold(output))


def distribution_csv(dist: ConceptDistribution, top: int | None = None) -> str:
    """The distribution as CSV text (``description,units,share``), most frequent first."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["description", "units", "share"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(dist.table(len(dist.counts) if top is None else top))
    return buf.getvalue()


def format_row(row: Mapping[str, Any]) -> str:
    """One printable line of a row (the CLI's ``explain`` and ``history`` printouts).

    Example:
        >>> print(format_row({"unit": 3, "description": "stripes", "kind": "concept", "score": 0.412,
        ...                   "q_value": 0.002, "changed": True, "previous_description": "grass"}))
        unit 3: stripes [concept, score 0.412, q 0.002] changed from grass
    """
    facts = [str(row["kind"])] if row.get("kind") else []
    if row.get("score") is not None:
        facts.append(f"score {row['score']:.3f}")
    if row.get("q_value") is not None:
        facts.append(f"q {row['q_value']:.3g}")
    elif row.get("confidence") is not None:
        facts.append(f"confidence {row['confidence']:.3f}")
    line = f"unit {row['unit']}: {row['description']}" + (f" [{', '.join(facts)}]" if facts else "")
    if row.get("combination"):
        line += f" = {row['combination']}"
    prev = row.get("previous_description")
    moves = (("changed", "changed from"), ("gained", "gained a concept, was"), ("lost", "lost its concept, was"))
    for flag, verb in moves:
        if row.get(flag) and prev is not None:
            line += f" {verb} {prev}"
    if row.get("baseline"):
        line += " (new baseline: settings changed)"
    return line


def rows_csv(rows: list[dict[str, Any]]) -> str:
    """The rows as CSV text with a header (columns :data:`ROW_COLUMNS`)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(ROW_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def rows_json(rows: list[dict[str, Any]]) -> str:
    """The rows as strict JSON (``{"columns": [...], "data": [[...], ...]}``, the layout of a W&B table file)."""
    data = [[row[c] for c in ROW_COLUMNS] for row in rows]
    return json.dumps({"columns": list(ROW_COLUMNS), "data": data}, indent=1, allow_nan=False)


def round_label(output: RoundOutput) -> str:
    """File-name label of a round: ``epoch_<epoch>``, or ``step_<step>`` when rounds are filed by global step.

    Under step-based validation several rounds share an epoch; their files must not overwrite each other.

    Example:
        >>> from lightning_neurons.results import ExplanationRound
        >>> round_label(RoundOutput(ExplanationRound(0), [], [], step=1200, epoch=3))
        'step_1200'
    """
    return f"epoch_{output.epoch}" if output.step == output.epoch else f"step_{output.step}"


def top_crop(output: RoundOutput, layer: str, unit: int) -> torch.Tensor | None:
    """The unit's best region crop (``uint8 [3, h, w]``) from the round's previews, or ``None`` without one."""
    previews = output.round.previews.get((layer, unit))
    if previews is None or previews.numel() == 0:
        return None
    return previews[0]


def hwc(image: torch.Tensor) -> Any:
    """A ``uint8 [3, h, w]`` tensor as the ``[h, w, 3]`` numpy array that W&B and MLflow take."""
    return image.detach().cpu().permute(1, 2, 0).contiguous().numpy()


__all__ = [
    "ROW_COLUMNS",
    "ConceptDistribution",
    "concept_distribution",
    "distribution_csv",
    "format_row",
    "hwc",
    "is_dead",
    "layer_distribution",
    "layer_rows",
    "record_row",
    "round_label",
    "round_threshold",
    "rows_csv",
    "rows_json",
    "shown",
    "shows_concept",
    "top_crop",
    "unit_row",
]
