"""The record model of a run's history: one unit at one explained epoch, and its flat (de)serialised form.

JSON Lines schema (``history.jsonl``, one object per line, one line per unit and explained epoch)::

    schema                int    record format version (1)
    layer                 str    layer name (``model.named_modules()``)
    unit                  int    unit index in the layer
    epoch                 int    explained epoch
    description           str    the explanation
    score                 float  AUC of the description in [0, 1] (null when not finite)
    margin                float  mean top-crop similarity minus mean control similarity
    concept_score         float  corrected concept score that chose the description
    confidence            float? confidence of the description in [0, 1] (0.5 = chance; absent in older files
                                 and where not computed); the description stays the raw best concept
    source                str    "concept" or "describe"
    kind                  str?   "concept", "low_level", "unclear" or "dead" (absent in older files: legacy)
    shown                 str?   the text every sink displays (``UnitExplanation.shown``; written with kind)
    p_value, q_value      float? significance against permuted activations; q: Benjamini-Hochberg over the layer
    low_level             str?   the image statistic a low-level unit tracks ("brightness", "red", ...)
    concept_gain          float? correlation the concept adds beyond image statistics (cross-validated)
    auc                   float? the old AUC, kept as a secondary figure
    alternatives          list   [{"text": str, "score": float}, ...] runner-up concepts
    top_sample_ids        list   probe-sample ids of the top activations, best first
    ablation              list?  [{"class": str, "drop": float}, ...] classes hurt most when the unit is zeroed
                                 (only for units the ablation check ran on; absent in older files)
    combination           list?  [{"text": str, "score": float}, ...] multi-concept explanation, concept and weight
                                 normalised to sum to 1, as every view shows it (only for units whose combination
                                 was kept; absent otherwise; the raw fitted weights stay in round_epoch=N.json)
    previous_epoch        int?   the unit's previous explained epoch (null on its first)
    previous_description  str?   the description at previous_epoch
    previous_shown        str?   the text shown at previous_epoch where it was not its description ("no clear
                                 concept", "low-level: red", "dead unit"); absent otherwise
    similarity            float? cosine similarity of the two descriptions' text embeddings
    changed               bool   the description's meaning changed: similarity < threshold (false on the first
                                 epoch); a combination's concepts never set it
    concepts_changed      bool   the concept set changed: changed, or where either epoch has a combination,
                                 concept_jaccard < 0.5 (drift.metrics.COMBINATION_CHANGE_JACCARD). Absent in older
                                 files, whose ``changed`` counted both: read back with drift.metrics.stored_changed
                                 (``changed`` judged again from similarity and threshold)
    concept_jaccard       float? Jaccard index of the two epochs' concept sets (combination concepts, else the
                                 description); only where either epoch has a combination, absent otherwise
    jaccard               float? Jaccard index of the two top-k sample-id sets
    score_delta           float? score minus the previous score
    threshold             float  change threshold used
    confidence_threshold  float? confidence at or below which the unit is shown as "no clear concept" (the
                                 round's ``confidence_threshold``; absent in older files and when off)
    gained, lost          bool?  the unit gained / lost a concept since previous_epoch (drift.metrics.meaning_change;
                                 written when true)
    baseline              bool?  true when the settings changed since the unit's previous explanation: a new drift
                                 baseline, not compared (drift.baseline; written when true)
    settings              str?   fingerprint of the settings the round was explained under
                                 (``RoundIdentity.settings``; absent in older files and rounds without an identity)
    revisit               bool?  true when the round re-explains an earlier epoch and keeps the later ones
                                 (``trainer.validate(ckpt_path=...)`` of an older checkpoint); absent otherwise
    round_id              str    which write of a round the record belongs to (absent in older files)
    round_index           int    the record's position in that round, 0 .. round_size - 1
    round_size            int    records in that round
"""

from __future__ import annotations

import contextlib
import gc
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from lightning_neurons.drift.metrics import DEFAULT_CHANGE_THRESHOLD, UnitDrift, stored_changed
from lightning_neurons.results import Alternative, UnitExplanation

#: Version of the record format (the ``schema`` field of every JSON Lines record).
SCHEMA_VERSION = 1

Key = tuple[str, int, int]


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _opt_float(x: Any) -> float | None:
    return None if x is None else float(x)


#: The shared-contract fields of a unit (results.UnitExplanation), kept only where set (older records lack them).
CONTRACT_FIELDS = ("kind", "p_value", "q_value", "low_level", "concept_gain", "auc")


def _contract_fields(e: UnitExplanation) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in CONTRACT_FIELDS:
        value = getattr(e, name)
        if value is not None:
            out[name] = value if isinstance(value, str) else _finite(value)
    if e.kind is not None:
        out["shown"] = e.shown
    return out


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    # Reading a history makes millions of small objects, none in a reference cycle; the cyclic collector would
    # rescan all of them again and again (about 40% of the load time at 20k records, growing with the history).
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@dataclass
class HistoryRecord:
    """One unit at one explained epoch: its explanation and its drift from the previous explained epoch.

    Args:
        explanation: The unit's explanation, trimmed to what the history keeps (no boxes, no activations).
        drift: Its drift against the unit's previous explained epoch.
        revisit: The record re-explains an earlier epoch (``trainer.validate(ckpt_path=...)`` of an older
            checkpoint): reading it replaces that epoch only and keeps the later ones.
        confidence_threshold: The round's confidence threshold: at or below it the unit is shown as "no clear
            concept" (``None``: the round showed every description).
        settings: Fingerprint of the settings the round was explained under (``RoundIdentity.settings``); a later
            round under other settings starts a new drift baseline (:mod:`lightning_neurons.drift.baseline`).
    """

    explanation: UnitExplanation
    drift: UnitDrift
    revisit: bool = False
    confidence_threshold: float | None = None
    settings: str | None = None

    @property
    def key(self) -> Key:
        """``(layer, unit, epoch)``."""
        return (self.drift.layer, self.drift.unit, self.drift.epoch)

    def to_dict(self) -> dict[str, Any]:
        """The flat JSON Lines record (see the module docstring for the schema)."""
        e, d = self.explanation, self.drift
        return {
            "schema": SCHEMA_VERSION,
            "layer": d.layer,
            "unit": d.unit,
            "epoch": d.epoch,
            "description": e.description,
            "score": _finite(e.score),
            "margin": _finite(e.margin),
            "concept_score": _finite(e.concept_score),
            **({"confidence": _finite(e.confidence)} if e.confidence is not None else {}),
            **_contract_fields(e),
            "source": e.source,
            "alternatives": [{"text": a.text, "score": _finite(a.score)} for a in e.alternatives],
            "top_sample_ids": [int(i) for i in e.top_sample_ids],
            "ablation": None if not e.ablation else [{"class": c, "drop": _finite(v)} for c, v in e.ablation],
            **(
                {"combination": [{"text": a.text, "score": _finite(w)} for a, w in _normalised(e.combination)]}
                if e.combination
                else {}
            ),
            "previous_epoch": d.previous_epoch,
            "previous_description": d.previous_description,
            # What was shown then where it was not the description ("no clear concept", "low-level: red", ...).
            **(
                {"previous_shown": d.previous_shown}
                if d.previous_shown is not None and d.previous_shown != d.previous_description
                else {}
            ),
            "similarity": _finite(d.similarity),
            "changed": bool(d.changed),
            "concepts_changed": d.concepts_changed,
            "jaccard": _finite(d.jaccard),
            "score_delta": _finite(d.score_delta),
            "threshold": d.threshold,
            **({"concept_jaccard": _finite(d.concept_jaccard)} if d.concept_jaccard is not None else {}),
            **({"confidence_threshold": self.confidence_threshold} if self.confidence_threshold is not None else {}),
            **{flag: True for flag in ("gained", "lost", "baseline") if getattr(d, flag)},
            **({"settings": self.settings} if self.settings else {}),
            **({"revisit": True} if self.revisit else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HistoryRecord:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: If the record was written by a newer schema version.
        """
        if int(data.get("schema", SCHEMA_VERSION)) > SCHEMA_VERSION:
            raise ValueError(f"history record schema {data['schema']} is newer than this version ({SCHEMA_VERSION})")

        def num_or_nan(v: Any) -> float:
            return float("nan") if v is None else float(v)

        def num(k: str) -> float:
            return num_or_nan(data.get(k))

        explanation = UnitExplanation(
            layer=str(data["layer"]),
            unit=int(data["unit"]),
            epoch=int(data["epoch"]),
            description=str(data["description"]),
            score=num("score"),
            margin=num("margin"),
            concept_score=num("concept_score"),
            alternatives=[
                Alternative(a["text"], float("nan") if a["score"] is None else a["score"])
                for a in data.get("alternatives", [])
            ],
            source=str(data.get("source", "concept")),
            top_sample_ids=[int(i) for i in data.get("top_sample_ids", [])],
            ablation=[(str(a["class"]), num_or_nan(a["drop"])) for a in data.get("ablation") or []] or None,
            combination=[Alternative(a["text"], num_or_nan(a["score"])) for a in data.get("combination") or []] or None,
            confidence=None if data.get("confidence") is None else float(data["confidence"]),
            kind=None if data.get("kind") is None else str(data["kind"]),
            p_value=_opt_float(data.get("p_value")),
            q_value=_opt_float(data.get("q_value")),
            low_level=None if data.get("low_level") is None else str(data["low_level"]),
            concept_gain=_opt_float(data.get("concept_gain")),
            auc=_opt_float(data.get("auc")),
        )
        get = data.get
        changed = stored_changed(data)
        drift = UnitDrift(  # built directly (not UnitDrift.from_dict): loading a long history makes millions
            explanation.layer,
            explanation.unit,
            explanation.epoch,  # type: ignore[arg-type]
            explanation.description,
            explanation.score,
            get("previous_epoch"),
            get("previous_description"),
            get("similarity"),
            changed,
            get("jaccard"),
            get("score_delta"),
            get("threshold", DEFAULT_CHANGE_THRESHOLD),
            get("concept_jaccard"),
            kind=explanation.kind,
            previous_shown=get("previous_shown", get("previous_description")),
            gained=bool(get("gained", False)),
            lost=bool(get("lost", False)),
            baseline=bool(get("baseline", False)),
        )
        shown_at = data.get("confidence_threshold")
        return cls(
            explanation=explanation,
            drift=drift,
            revisit=bool(data.get("revisit", False)),
            confidence_threshold=None if shown_at is None else float(shown_at),
            settings=get("settings") or None,
        )


def _normalised(combination: list[Alternative]) -> list[tuple[Alternative, float]]:
    """Each concept with its weight normalised to sum to 1 (negative weights count as 0), as views show them."""
    total = sum(max(a.score, 0.0) for a in combination if math.isfinite(a.score)) or 1.0
    return [(a, a.score / total) for a in combination]


def _trim(u: UnitExplanation, epoch: int) -> UnitExplanation:
    # The history keeps what drift and reports need; boxes and activations stay in the round itself.
    return UnitExplanation(
        layer=u.layer,
        unit=int(u.unit),
        epoch=epoch,
        description=u.description,
        score=float(u.score),
        margin=float(u.margin),
        concept_score=float(u.concept_score),
        alternatives=[Alternative(a.text, float(a.score)) for a in u.alternatives],
        source=u.source,
        top_sample_ids=[int(i) for i in u.top_sample_ids],
        ablation=[(str(c), float(v)) for c, v in u.ablation] if u.ablation else None,
        combination=[Alternative(a.text, float(a.score)) for a in u.combination] if u.combination else None,
        confidence=None if u.confidence is None else float(u.confidence),
        kind=u.kind,
        p_value=_finite(u.p_value),
        q_value=_finite(u.q_value),
        low_level=u.low_level,
        concept_gain=_finite(u.concept_gain),
        auc=_finite(u.auc),
    )


_CSV_COLUMNS = [
    "layer",
    "unit",
    "epoch",
    "description",
    "score",
    "margin",
    "concept_score",
    "confidence",
    "source",
    "kind",
    "shown",
    "p_value",
    "q_value",
    "low_level",
    "concept_gain",
    "auc",
    "previous_epoch",
    "previous_description",
    "similarity",
    "changed",
    "jaccard",
    "score_delta",
    "threshold",
    "alternatives",
    "top_sample_ids",
    "ablation",
    "combination",
    "concept_jaccard",
    "concepts_changed",
]


def _epoch_runs(records: Iterable[HistoryRecord]) -> list[tuple[str | None, list[HistoryRecord]]]:
    # Consecutive records of one epoch form a round (records without round ids: state dicts, older files).
    groups: list[tuple[str | None, list[HistoryRecord]]] = []
    for r in records:
        if groups and groups[-1][1][0].key[2] == r.key[2]:
            groups[-1][1].append(r)
        else:
            groups.append((None, [r]))
    return groups
