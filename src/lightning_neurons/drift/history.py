"""The explanation history of a run: per (layer, unit, epoch) what the unit meant and how that drifted.

:class:`RunHistory` lives in the callback's ``state_dict`` (plain Python types, so it fits a Lightning checkpoint)
and, when given a path, in a JSON Lines file that gets the records of every round appended as the round is added.

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
    alternatives          list   [{"text": str, "score": float}, ...] runner-up concepts
    top_sample_ids        list   probe-sample ids of the top activations, best first
    ablation              list?  [{"class": str, "drop": float}, ...] classes hurt most when the unit is zeroed
                                 (only for units the ablation check ran on; absent in older files)
    combination           list?  [{"text": str, "score": float}, ...] multi-concept explanation, concept and weight
                                 (only for units whose combination was kept; absent otherwise)
    previous_epoch        int?   the unit's previous explained epoch (null on its first)
    previous_description  str?   the description at previous_epoch
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
    revisit               bool?  true when the round re-explains an earlier epoch and keeps the later ones
                                 (``trainer.validate(ckpt_path=...)`` of an older checkpoint); absent otherwise
    round_id              str    which write of a round the record belongs to (absent in older files)
    round_index           int    the record's position in that round, 0 .. round_size - 1
    round_size            int    records in that round

Crash safety: a round (or the records :meth:`RunHistory.attach` brings in line) is written with one ``write``,
flushed to disk with ``fsync``; a round counts only once all its ``round_size`` records with its ``round_id`` were
read, so an interrupted or failed write (a crash, a full disk) leaves no partial epoch behind: readers skip it, and
every line that is not valid UTF-8 JSON, with one warning that names the file and the lines. A writer first ends a
cut last line with a newline, and holds a lock (``history.jsonl.lock``, released when the process ends) so that a
second process writing the same file fails at once with :class:`HistoryLockedError`. Records of older files (no
``round_id``) count one by one, as they did.

Reading the file (:func:`load_history`) replays it in order: a later record replaces an earlier one with the same
``(layer, unit, epoch)``, and a round whose epoch is not after the latest one seen so far discards the later epochs
(the run was resumed from an earlier checkpoint, so they belong to an abandoned timeline). The same rule holds for
:meth:`RunHistory.add_round`.

Example:
    >>> import torch
    >>> from lightning_neurons.results import ExplanationRound, UnitExplanation
    >>> embed = lambda texts: torch.eye(8)[[len(t) % 8 for t in texts]]  # toy embedder
    >>> history = RunHistory()
    >>> for epoch, text in [(0, "dots"), (1, "dots"), (2, "stripes")]:
    ...     unit = UnitExplanation("fc", 0, epoch=epoch, description=text, score=0.8)
    ...     drift = history.add_round(ExplanationRound(epoch, [unit]), embed)
    >>> [d.changed for d in history.drift()]
    [False, False, True]
    >>> RunHistory.from_state_dict(history.state_dict()).records == history.records
    True
"""

from __future__ import annotations

import contextlib
import csv
import errno
import gc
import json
import math
import os
import uuid
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from lightning_neurons.drift.metrics import (
    DEFAULT_CHANGE_THRESHOLD,
    DEFAULT_STABLE_ROUNDS,
    EmbedFn,
    LayerDriftSummary,
    UnitDrift,
    UnitStability,
    compare_units,
    stored_changed,
    summarize_units,
)
from lightning_neurons.explanation.multi_concept import format_combination
from lightning_neurons.files import write_text_atomic
from lightning_neurons.results import Alternative, ExplanationRound, UnitExplanation, dumps_strict

#: File name of the history inside a run's log directory.
HISTORY_FILENAME = "history.jsonl"

#: Version of the record format (the ``schema`` field of every JSON Lines record).
SCHEMA_VERSION = 1

Key = tuple[str, int, int]


class HistoryLockedError(RuntimeError):
    """Another process is writing the same history file (two runs must not share one history)."""


class HistoryWriteError(OSError):
    """A round could not be written (e.g. the disk is full); the file keeps every round before it."""


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


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
    """

    explanation: UnitExplanation
    drift: UnitDrift
    revisit: bool = False
    confidence_threshold: float | None = None

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
            "source": e.source,
            "alternatives": [{"text": a.text, "score": _finite(a.score)} for a in e.alternatives],
            "top_sample_ids": [int(i) for i in e.top_sample_ids],
            "ablation": None if not e.ablation else [{"class": c, "drop": _finite(v)} for c, v in e.ablation],
            **(
                {"combination": [{"text": a.text, "score": _finite(a.score)} for a in e.combination]}
                if e.combination
                else {}
            ),
            "previous_epoch": d.previous_epoch,
            "previous_description": d.previous_description,
            "similarity": _finite(d.similarity),
            "changed": bool(d.changed),
            "concepts_changed": d.concepts_changed,
            "jaccard": _finite(d.jaccard),
            "score_delta": _finite(d.score_delta),
            "threshold": d.threshold,
            **({"concept_jaccard": _finite(d.concept_jaccard)} if d.concept_jaccard is not None else {}),
            **({"confidence_threshold": self.confidence_threshold} if self.confidence_threshold is not None else {}),
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
        )
        shown_at = data.get("confidence_threshold")
        return cls(
            explanation=explanation,
            drift=drift,
            revisit=bool(data.get("revisit", False)),
            confidence_threshold=None if shown_at is None else float(shown_at),
        )


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
    )


@dataclass
class RunHistory:
    """Per ``(layer, unit, epoch)`` the explanation and its drift; the memory of a run across epochs.

    Args:
        threshold: Description similarity below which a unit's meaning counts as changed
            (see :data:`~lightning_neurons.drift.metrics.DEFAULT_CHANGE_THRESHOLD`).
        stable_rounds: ``N`` of "stable for the last N comparisons" in the summaries.
        path: JSON Lines file to append every added round to (``None``: memory only). Set it with :meth:`attach`
            to bring an existing file in line with a restored history.

    Example:
        >>> history = RunHistory(threshold=0.75)  # doctest: +SKIP
        >>> history.load_state_dict(checkpoint_state)  # on resume  # doctest: +SKIP
        >>> history.attach(Path(trainer.log_dir) / HISTORY_FILENAME)  # doctest: +SKIP
        >>> drift = history.add_round(rnd, backend.encode_descriptions)  # each round  # doctest: +SKIP
        >>> summaries = history.summary(epoch=rnd.epoch)  # doctest: +SKIP
    """

    threshold: float = DEFAULT_CHANGE_THRESHOLD
    stable_rounds: int = DEFAULT_STABLE_ROUNDS
    path: Path | None = None
    _records: dict[Key, HistoryRecord] = field(default_factory=dict, repr=False)
    _lock: FileLock | None = field(default=None, repr=False, compare=False)
    # Indexes kept in step with _records, so that every query costs what it returns and a round costs its units:
    # epoch -> layer (first-seen order) -> unit -> record; layer -> unit -> epoch (ascending) -> record; the
    # running stability after each record (for summaries); per epoch the id of the round written or read for it.
    _by_epoch: dict[int, dict[str, dict[int, HistoryRecord]]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _by_unit: dict[str, dict[int, dict[int, HistoryRecord]]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _stability: dict[Key, UnitStability] = field(default_factory=dict, init=False, repr=False, compare=False)
    _round_ids: dict[int, str] = field(default_factory=dict, init=False, repr=False, compare=False)
    _ordered: list[HistoryRecord] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.stable_rounds < 1:
            raise ValueError(f"stable_rounds must be >= 1, got {self.stable_rounds}")
        if self.path is not None:
            self.path = Path(self.path)
        given, self._records = self._records, {}
        for record in sorted(given.values(), key=lambda r: r.key[2]):
            self._insert(record)

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, key: object) -> bool:
        return key in self._records

    @property
    def records(self) -> list[HistoryRecord]:
        """All records ordered by epoch, layer (first-seen order), unit."""
        if self._ordered is None:
            rank = {name: i for i, name in enumerate(self.layers)}
            ordered: list[HistoryRecord] = []
            for ep in sorted(self._by_epoch):
                by_layer = self._by_epoch[ep]
                for layer in sorted(by_layer, key=rank.__getitem__):
                    units = by_layer[layer]
                    ordered.extend(units[u] for u in sorted(units))
            self._ordered = ordered
        return list(self._ordered)

    @property
    def epochs(self) -> list[int]:
        """Explained epochs, ascending."""
        return sorted(self._by_epoch)

    @property
    def layers(self) -> list[str]:
        """Layer names in the order first seen (by epoch)."""
        return list(dict.fromkeys(layer for ep in sorted(self._by_epoch) for layer in self._by_epoch[ep]))

    def units(self, layer: str) -> list[int]:
        """Units of ``layer`` explained at any epoch, ascending."""
        return sorted(self._by_unit.get(layer, {}))

    def get(self, layer: str, unit: int, epoch: int) -> HistoryRecord:
        """The record of one unit at one epoch.

        Raises:
            KeyError: If there is none.
        """
        try:
            return self._records[(layer, unit, epoch)]
        except KeyError:
            raise KeyError(
                f"no history for unit {unit} of layer {layer!r} at epoch {epoch} "
                f"(epochs: {self.epochs}, layers: {self.layers})"
            ) from None

    def timeline(self, layer: str, unit: int) -> list[HistoryRecord]:
        """One unit's records in epoch order."""
        return list(self._by_unit.get(layer, {}).get(unit, {}).values())

    def latest(self) -> list[HistoryRecord]:
        """Every unit's latest record, by layer (first-seen order) then unit: what the next round's drift needs.

        Example:
            >>> RunHistory().latest()
            []
        """
        return [
            timeline[next(reversed(timeline))]
            for layer in self.layers
            for _, timeline in sorted(self._by_unit[layer].items())
        ]

    def _epoch_records(self, ep: int) -> list[tuple[str, dict[int, HistoryRecord]]]:
        # (layer, unit -> record) of one epoch, layers in self.layers order.
        by_layer = self._by_epoch.get(ep, {})
        if len(by_layer) > 1:
            rank = {name: i for i, name in enumerate(self.layers)}
            return [(layer, by_layer[layer]) for layer in sorted(by_layer, key=rank.__getitem__)]
        return list(by_layer.items())

    def drift(self, epoch: int | None = None) -> list[UnitDrift]:
        """Drift records of one epoch (default: all epochs), in :attr:`records` order."""
        if epoch is None:
            return [r.drift for r in self.records]
        return [units[u].drift for _, units in self._epoch_records(epoch) for u in sorted(units)]

    def summary(self, epoch: int | None = None) -> list[LayerDriftSummary]:
        """Per-layer drift summaries of one epoch (default: every explained epoch), by epoch then layer.

        Each record keeps its unit's running stability (:class:`~lightning_neurons.drift.metrics.UnitStability`),
        so a summary costs the units it summarises; it equals
        :func:`~lightning_neurons.drift.metrics.summarize_layer_epochs` over the unit timelines.

        Example:
            >>> RunHistory().summary()
            []
        """
        out = []
        for ep in self.epochs if epoch is None else [epoch]:
            for layer, units in self._epoch_records(ep):
                rows = ((u, units[u].drift, self._stability[(layer, u, ep)]) for u in sorted(units))
                out.append(summarize_units(layer, ep, rows, self.stable_rounds))
        return out

    def format_summary(self) -> list[str]:
        """Terminal lines of the drift summary.

        One line per layer and epoch (units, changes of meaning, with multi-concept explanations also changes of
        the concept set, mean score and similarity, stable units), then the units whose meaning changed (their
        descriptions), then, apart, the units whose description kept its meaning while their combination's concept
        set changed (both combinations and the concept overlap).

        Example:
            >>> RunHistory().format_summary()
            ['(empty history)']
        """
        if not self._records:
            return ["(empty history)"]
        multi = any(r.explanation.combination for r in self._records.values())
        width = max([24, *(len(layer) for layer in self.layers)])
        concepts_head = f" {'concepts':>9}" if multi else ""
        lines = [
            f"{'layer':<{width}} {'epoch':>5} {'units':>5} {'changed':>9}{concepts_head} {'mean score':>10} "
            f"{'mean sim':>8} {'stable':>6}"
        ]
        for s in self.summary():
            changed = f"{s.n_changed}/{s.n_compared}" if s.n_compared else "-"
            concepts = f" {f'{s.n_concepts_changed}/{s.n_compared}' if s.n_compared else '-':>9}" if multi else ""
            sim = "-" if s.mean_similarity is None else f"{s.mean_similarity:.3f}"
            lines.append(
                f"{s.layer:<{width}} {s.epoch:>5} {s.n_units:>5} {changed:>9}{concepts} {s.mean_score:>10.3f} "
                f"{sim:>8} {s.n_stable:>6}"
            )
        records = self.records
        changes = [r.drift for r in records if r.drift.changed]
        if changes:
            lines.append("meaning changes:")
            lines += [
                f"  {d.layer}[{d.unit}] epoch {d.epoch}: {d.previous_description!r} -> {d.description!r} "
                f"(similarity {d.similarity:.2f})"
                for d in changes
            ]
        concept_changes = [r for r in records if r.drift.concepts_only_changed]
        if concept_changes:
            lines.append("concept-set changes (same meaning, other concepts in the combination):")
            lines += [f"  {self._format_concept_change(r)}" for r in concept_changes]
        return lines

    def _format_concept_change(self, record: HistoryRecord) -> str:
        # "fc[7] epoch 2: 'fruit' [fruit (0.74) + dog (0.26)] -> 'fruit' [fruit (0.65) + grass (0.35)] (concept
        # overlap 0.33)"; the previous combination from the previous record (d.previous_combination when that record
        # is not in this history, e.g. restored from a checkpoint's latest records only).
        d = record.drift
        previous = None if d.previous_epoch is None else self._records.get((d.layer, d.unit, d.previous_epoch))
        before = previous.explanation.combination if previous is not None else d.previous_combination
        was = d.previous_description or ""
        # Without the previous record nor its combination, what it was is unknown: the description alone.
        shown = repr(was) if previous is None and before is None else _with_combination(was, before)
        overlap = "" if d.concept_jaccard is None else f" (concept overlap {d.concept_jaccard:.2f})"
        return (
            f"{d.layer}[{d.unit}] epoch {d.epoch}: {shown} -> "
            f"{_with_combination(d.description, record.explanation.combination)}{overlap}"
        )

    # ------------------------------------------------------------------ updates
    def add_round(
        self, round: ExplanationRound, embed: EmbedFn, epoch: int | None = None, *, keep_later: bool = False
    ) -> list[UnitDrift]:
        """Add one explanation round, compute its drift, and append it to the JSON Lines file.

        Idempotent per epoch: adding an epoch again replaces its records. Adding an epoch earlier than the latest
        one discards the later epochs with a warning (a resumed run rewinds the timeline). The cost is that of the
        round's units (plus the epochs it discards), whatever the length of the history.

        Args:
            round: The round (``round.epoch`` is used unless ``epoch`` is given).
            embed: Batched text embedder for description similarity, e.g. ``backend.encode_descriptions``;
                called at most once per round, only for descriptions that differ from the previous ones.
            epoch: Overrides ``round.epoch`` (needed when it is ``None``, e.g. post hoc).
            keep_later: Replace only this epoch and keep the later ones (a re-explained older checkpoint,
                ``trainer.validate(ckpt_path=...)``) instead of rewinding the timeline.

        Returns:
            One :class:`UnitDrift` per unit of the round, in round order.

        Raises:
            ValueError: If the round has no epoch and none is given.
            HistoryLockedError: If another process writes the file.
            HistoryWriteError: If the round could not be written (the disk is full, ...); the history, in memory
                and on disk, is then as it was before the call.
        """
        ep = round.epoch if epoch is None else epoch
        if ep is None:
            raise ValueError("the round has no epoch; pass epoch= to RunHistory.add_round")
        ep = int(ep)
        later = sorted(e for e in self._by_epoch if e > ep)
        if later and not keep_later:
            warnings.warn(
                f"adding epoch {ep} discards the later history epochs {later} (resumed from an earlier checkpoint?)",
                stacklevel=2,
            )
        revisit = keep_later and bool(later)
        units = [_trim(u, ep) for u in round.units]
        previous: dict[tuple[str, int], UnitExplanation] = {}
        for u in units:
            timeline = self._by_unit.get(u.layer, {}).get(u.unit)
            for e in reversed(timeline or {}):  # newest first; usually the first one is already before ep
                if e < ep:
                    previous[u.key] = timeline[e].explanation  # type: ignore[index]
                    break
        drifts = compare_units(previous, units, embed, threshold=self.threshold, epoch=ep)
        shown_at = round.meta.get("confidence_threshold")
        shown_at = None if shown_at is None else float(shown_at)
        new = [HistoryRecord(u, d, revisit=revisit, confidence_threshold=shown_at) for u, d in zip(units, drifts)]
        ids = self._append(new) if self.path is not None else []  # first on disk: a failed write changes nothing
        self._start_round(ep, revisit)
        for record in new:
            self._insert(record)
        self._round_ids.update(ids)
        return drifts

    def _start_round(self, ep: int, revisit: bool) -> None:
        # What a round of epoch ep replaces: that epoch (revisit) or that epoch and every later one (a rewind).
        for e in [ep] if revisit else sorted((e for e in self._by_epoch if e >= ep), reverse=True):
            self._remove_epoch(e)

    def _insert(self, record: HistoryRecord, stability: UnitStability | None = None) -> None:
        layer, unit, ep = record.key
        self._ordered = None
        self._records[record.key] = record
        self._by_epoch.setdefault(ep, {}).setdefault(layer, {})[unit] = record
        timeline = self._by_unit.setdefault(layer, {}).setdefault(unit, {})
        newest = next(reversed(timeline), None)
        if newest is None or newest < ep:  # the usual case: the unit's newest epoch
            if stability is None:
                before = None if newest is None else self._stability[(layer, unit, newest)]
                stability = UnitStability.advance(before, record.drift)
            timeline[ep] = record
            self._stability[record.key] = stability
            return
        timeline[ep] = record  # an earlier epoch (a revisit) or a repeated unit: re-sort and recompute the unit
        ordered = sorted(timeline.items())
        timeline.clear()
        timeline.update(ordered)
        self._restate(layer, unit)

    def _restate(self, layer: str, unit: int) -> None:
        state: UnitStability | None = None
        for ep, record in self._by_unit[layer][unit].items():
            state = UnitStability.advance(state, record.drift)
            self._stability[(layer, unit, ep)] = state

    def _remove_epoch(self, ep: int) -> None:
        self._ordered = None
        self._round_ids.pop(ep, None)
        for layer, units in self._by_epoch.pop(ep, {}).items():
            per_unit = self._by_unit[layer]
            for unit in units:
                del self._records[(layer, unit, ep)]
                del self._stability[(layer, unit, ep)]
                timeline = per_unit[unit]
                newest = next(reversed(timeline)) == ep
                del timeline[ep]
                if not timeline:
                    del per_unit[unit]
                elif not newest:
                    self._restate(layer, unit)
            if not per_unit:
                del self._by_unit[layer]

    def _clear(self) -> None:
        self._records, self._by_epoch, self._by_unit, self._stability, self._round_ids = {}, {}, {}, {}, {}
        self._ordered = None

    def attach(self, path: str | Path) -> None:
        """Write to ``path`` from now on, first bringing the file in line with this history.

        Call it after :meth:`load_state_dict` on resume: when the file does not already replay to this history
        (a new log directory, or a file that ran past the checkpoint) all records are appended, so that
        :func:`load_history` of the file equals this history again.

        The file is locked for this process until :meth:`close` (or the process ends): a second process
        attaching to it fails at once.

        Args:
            path: The JSON Lines file (created with its parent directories when missing).

        Raises:
            HistoryLockedError: If another process writes the file (e.g. another run given the same folder).
        """
        if self.path is not None and Path(path) != self.path:
            self.close()
        self.path = Path(path)
        self._acquire()
        if not self._records:
            if self.path.is_file() and self.path.stat().st_size > 0:
                warnings.warn(
                    f"{self.path} already holds history records; new rounds are appended and replace "
                    "those of the same or later epochs when read",
                    stacklevel=2,
                )
            return
        if self.path.is_file():
            on_disk = _read_jsonl(self.path)
            if _dicts(on_disk) == _dicts(self):
                self._round_ids = dict(on_disk._round_ids)  # the rounds this history is made of, in this file
                return
        self._round_ids = dict(self._append(self.records))

    def close(self) -> None:
        """Release the file lock taken by :meth:`attach` or the first write (the records stay in memory).

        Example:
            >>> RunHistory().close()  # nothing attached: a no-op
        """
        lock, self._lock = self._lock, None
        if lock is not None and lock.is_locked:
            lock.release()

    def _acquire(self) -> None:
        # One writing process per file. The lock is an flock: the kernel drops it when the process dies, so a run
        # killed mid-write can be resumed at once. Within one process the lock is shared (a resumed history may
        # re-attach the file its predecessor object wrote).
        if self._lock is not None or self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        lock = FileLock(lock_path, timeout=0, is_singleton=True, thread_local=False, fallback_to_soft=False)
        try:
            lock.acquire()
        except Timeout:
            raise HistoryLockedError(
                f"{self.path} is being written by another process (it holds {lock_path}); give this run its own "
                "output folder, or wait for the other run to end"
            ) from None
        except (NotImplementedError, OSError) as err:  # a file system without locks: write unguarded
            warnings.warn(f"cannot lock {lock_path} ({err}); concurrent writers will not be detected", stacklevel=3)
            return
        self._lock = lock

    def _append(self, records: Iterable[HistoryRecord]) -> list[tuple[int, str]]:
        # One write per call, then fsync: readers see each round complete (all its round_size records) or not at all.
        # Returns (epoch, round id) of every round written.
        assert self.path is not None
        self._acquire()
        encoded = _encode_rounds_with_ids(records)
        if not encoded:
            return []
        data = b"".join(chunk for _, _, chunk in encoded)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # end a line cut by a crash, so the new round does not glue onto it
            try:
                _write_all(fd, data)
                os.fsync(fd)
            except OSError as err:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)  # take back the partial round (needs no space)
                    os.fsync(fd)
                raise HistoryWriteError(
                    err.errno or errno.EIO,
                    f"{err.strerror or err} while writing {len(encoded)} history round(s); the file keeps the "
                    "rounds before them",
                    str(self.path),
                ) from err
        finally:
            os.close(fd)
        return [(ep, rid) for ep, rid, _ in encoded]

    def _replay(self, rounds: Iterable[tuple[str | None, list[HistoryRecord]]]) -> None:
        # File-order replay in one pass: each round (round id, records of one epoch) replaces its epoch and drops
        # any later ones, exactly like add_round; a revisit round replaces its epoch only. For an uninterrupted
        # run this is plain insertion.
        for rid, group in rounds:
            if not group:
                continue
            ep = group[0].key[2]
            self._start_round(ep, group[0].revisit)
            for record in group:
                self._insert(record)
            if rid is not None:
                self._round_ids[ep] = rid

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state holding every record (the file path is not part of it).

        A checkpoint of a run whose history is in a file needs less: see :meth:`checkpoint_state`.
        """
        return {
            "schema": SCHEMA_VERSION,
            "threshold": self.threshold,
            "stable_rounds": self.stable_rounds,
            "records": [r.to_dict() for r in self.records],
        }

    def checkpoint_state(self) -> dict[str, Any]:
        """What a resumed run needs, without the history the attached file already holds.

        The file's path and the ids of the rounds that make up this history (one per epoch), plus every unit's
        latest record and running stability: :meth:`load_state_dict` reads the rounds back from the file, and
        when the file is gone (a checkpoint moved to another machine) it keeps going from the latest records,
        with a warning, so drift and summaries of later rounds are still exact. Its size is that of one round,
        not of the whole run (:meth:`state_dict`: 100 rounds of 100k units are about 9 GB).

        Falls back to :meth:`state_dict` for a history that is not attached to a file, or holds epochs that
        came from an older file without round ids.

        Example:
            >>> RunHistory().checkpoint_state()["records"]  # memory only: the full state
            []
        """
        epochs = self.epochs
        if self.path is None or any(ep not in self._round_ids for ep in epochs):
            return self.state_dict()
        latest = self.latest()
        return {
            "schema": SCHEMA_VERSION,
            "threshold": self.threshold,
            "stable_rounds": self.stable_rounds,
            "store": {
                "path": str(self.path),
                "rounds": [[ep, self._round_ids[ep]] for ep in epochs],
                "records": len(self._records),
            },
            "latest": [r.to_dict() for r in latest],
            "latest_stability": [self._stability[r.key].to_list() for r in latest],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the records with those of :meth:`state_dict` or :meth:`checkpoint_state`.

        The configured ``threshold`` and ``stable_rounds`` are kept (the restored records keep the threshold they
        were computed with); a differing threshold is warned about. A :meth:`checkpoint_state` is restored from
        the file it names; when that file no longer holds its rounds, from each unit's latest record, with a
        warning.
        """
        if "threshold" in state and not math.isclose(float(state["threshold"]), self.threshold):
            warnings.warn(
                f"the restored history used change threshold {state['threshold']}; new rounds use {self.threshold}",
                stacklevel=2,
            )
        self._clear()
        if "store" in state:
            self._load_store(state)
            return
        self._replay(_epoch_runs(HistoryRecord.from_dict(d) for d in state.get("records", [])))

    def _load_store(self, state: Mapping[str, Any]) -> None:
        store = state["store"]
        path = Path(store["path"])
        wanted = [(int(ep), str(rid)) for ep, rid in store["rounds"]]
        found: dict[str, list[HistoryRecord]] = {}
        if path.is_file():
            with warnings.catch_warnings(), _gc_paused():
                warnings.simplefilter("ignore")  # skipped lines belong to rounds this history does not use
                found = {rid: group for rid, group in _read_rounds(path) if rid is not None}
        missing = [ep for ep, rid in wanted if rid not in found]
        if not missing:
            with _gc_paused():
                self._replay((rid, found[rid]) for _, rid in wanted)
            return
        shown = ", ".join(map(str, missing[:10])) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        warnings.warn(
            f"the checkpoint's history lives in {path}, which "
            + ("does not hold the rounds of epochs " + shown if path.is_file() else "does not exist")
            + f"; restored each unit's latest explanation only ({len(state.get('latest', []))} of "
            f"{store.get('records', '?')} records): drift and summaries go on exactly, earlier epochs are not "
            "restored (copy the history file with the checkpoint to keep them)",
            stacklevel=3,
        )
        latest = [HistoryRecord.from_dict(d) for d in state.get("latest", [])]
        stability = [UnitStability.from_list(s) for s in state.get("latest_stability", [])]
        order = sorted(range(len(latest)), key=lambda i: latest[i].key[2])
        for i in order:
            self._insert(latest[i], stability[i] if i < len(stability) else None)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> RunHistory:
        """A history restored from :meth:`state_dict` with the threshold it was written with."""
        history = cls(
            threshold=float(state.get("threshold", DEFAULT_CHANGE_THRESHOLD)),
            stable_rounds=int(state.get("stable_rounds", DEFAULT_STABLE_ROUNDS)),
        )
        history.load_state_dict(state)
        return history

    def to_jsonl(self, path: str | Path) -> Path:
        """Write all records to a new JSON Lines file (overwriting it); returns the path."""
        text = "".join(json.dumps(r.to_dict(), ensure_ascii=False, allow_nan=False) + "\n" for r in self.records)
        return write_text_atomic(path, text)

    def to_json(self, path: str | Path) -> Path:
        """Write one JSON document: :meth:`state_dict` plus ``"summary"`` (all per-layer summaries).

        Example:
            >>> RunHistory().to_json("/tmp/history.json").name
            'history.json'
        """
        data = {**self.state_dict(), "summary": [s.to_dict() for s in self.summary()]}
        return write_text_atomic(path, dumps_strict(data, indent=1, ensure_ascii=False))

    def to_csv(self, path: str | Path) -> Path:
        """Write one CSV row per record (the JSON Lines fields; lists joined: ``"text=score; ..."``, ``"3 1 7"``).

        Example:
            >>> RunHistory().to_csv("/tmp/history.csv").read_text().split(",")[:3]
            ['layer', 'unit', 'epoch']
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        columns = list(_CSV_COLUMNS)
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            for r in self.records:
                row = r.to_dict()
                row["alternatives"] = "; ".join(
                    f"{a['text']}={a['score']:.4g}" if a["score"] is not None else a["text"]
                    for a in row["alternatives"]
                )
                row["top_sample_ids"] = " ".join(str(i) for i in row["top_sample_ids"])
                combo = row.get("combination") or []  # the multi-concept explanation, concept=weight
                row["combination"] = "; ".join(
                    f"{a['text']}={a['score']:.4g}" if a["score"] is not None else a["text"] for a in combo
                )
                hurt = row["ablation"] or []
                row["ablation"] = "; ".join(
                    f"{a['class']}={a['drop']:.4g}" if a["drop"] is not None else a["class"] for a in hurt
                )
                writer.writerow({c: "" if row.get(c) is None else row[c] for c in columns})
        return path


def _with_combination(description: str, combination: list[Alternative] | None) -> str:
    """``'fruit' [fruit (0.74) + dog (0.26)]``: a description and its combination (``[no combination]``)."""
    return f"{description!r} [{format_combination(combination)}]"


def _dicts(history: RunHistory) -> list[dict[str, Any]]:
    return [r.to_dict() for r in history.records]


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


def _encode_rounds_with_ids(records: Iterable[HistoryRecord]) -> list[tuple[int, str, bytes]]:
    # Each round gets a fresh id; each record says which round it belongs to and where.
    out = []
    for _, group in _epoch_runs(records):
        rid = uuid.uuid4().hex[:16]
        lines = [
            json.dumps(
                {**r.to_dict(), "round_id": rid, "round_index": i, "round_size": len(group)},
                ensure_ascii=False,
                allow_nan=False,
            )
            + "\n"
            for i, r in enumerate(group)
        ]
        out.append((group[0].key[2], rid, "".join(lines).encode("utf-8")))
    return out


def _encode_rounds(records: Iterable[HistoryRecord]) -> list[bytes]:
    # The bytes of each round as _append writes them (consecutive records of one epoch form a round).
    return [chunk for _, _, chunk in _encode_rounds_with_ids(records)]


def _write_all(fd: int, data: bytes) -> None:
    # os.write may write less than asked (signals, nearly full disks): loop until all of it is down.
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


@dataclass
class _Round:
    id: str
    size: int
    first_line: int
    records: dict[int, HistoryRecord] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return len(self.records) == self.size

    def describe(self, last_line: int) -> str:
        epoch = next(iter(self.records.values())).key[2]
        return (
            f"lines {self.first_line}-{last_line}: an incomplete round of epoch {epoch} "
            f"({len(self.records)} of {self.size} records)"
        )


def _read_rounds(path: Path, warn: bool = True) -> list[tuple[str | None, list[HistoryRecord]]]:
    # Every complete round of the file in file order, as (round id, records); records of older files (no round
    # ids) come in runs of one epoch with id None. Everything else is skipped, with one warning.
    rounds: list[tuple[str | None, list[HistoryRecord]]] = []
    problems: list[str] = []
    pending: _Round | None = None
    last_line = 0

    def drop_pending() -> None:
        nonlocal pending
        if pending is not None:
            problems.append(pending.describe(last_line))
            pending = None

    for n, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            problems.append(f"line {n} is not valid UTF-8")  # e.g. cut inside a multi-byte character
            continue
        except json.JSONDecodeError:
            problems.append(f"line {n} is not valid JSON")  # e.g. a line cut by a crash
            continue
        if isinstance(data, dict) and int(data.get("schema", SCHEMA_VERSION)) > SCHEMA_VERSION:
            raise ValueError(
                f"{path}:{n}: history record schema {data['schema']} is newer than this version "
                f"({SCHEMA_VERSION}); upgrade lightning-neurons to read it"
            )
        try:
            record = HistoryRecord.from_dict(data)
            rid = data.get("round_id")
            index, size = (int(data["round_index"]), int(data["round_size"])) if rid is not None else (0, 0)
        except (KeyError, TypeError, ValueError, AttributeError):
            problems.append(f"line {n} is not a history record")
            continue
        if rid is None:  # older files: no rounds, every record counts on its own
            drop_pending()
            if rounds and rounds[-1][0] is None and rounds[-1][1][-1].key[2] == record.key[2]:
                rounds[-1][1].append(record)
            else:
                rounds.append((None, [record]))
            last_line = n
            continue
        if pending is None or pending.id != rid:
            drop_pending()
            pending = _Round(str(rid), size, n)
        pending.records.setdefault(index, record)
        last_line = n
        if pending.complete and set(pending.records) == set(range(pending.size)):
            rounds.append((pending.id, [pending.records[i] for i in range(pending.size)]))
            pending = None
    drop_pending()
    if problems and warn:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        warnings.warn(f"{path}: skipped {shown} (every complete round is kept)", stacklevel=4)
    return rounds


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


def _read_jsonl(path: Path, warn: bool = True) -> RunHistory:
    with _gc_paused():
        rounds = _read_rounds(path, warn)
        last = next((group[-1] for _, group in reversed(rounds) if group), None)
        history = RunHistory(threshold=float(last.drift.threshold if last is not None else DEFAULT_CHANGE_THRESHOLD))
        history._replay(rounds)
    return history


def find_history_file(path_or_run_dir: str | Path) -> Path:
    """The history file of a run directory (searched recursively when not at its top), or the path itself.

    Raises:
        FileNotFoundError: If there is none.
        ValueError: If a directory holds several (e.g. several ``version_*`` runs): pass one of them.
    """
    path = Path(path_or_run_dir)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither a history file nor a run directory")
    if (path / HISTORY_FILENAME).is_file():
        return path / HISTORY_FILENAME
    found = sorted(path.rglob(HISTORY_FILENAME))
    if not found:
        raise FileNotFoundError(f"no {HISTORY_FILENAME} under {path}: was the run logged with NeuronExplainer?")
    if len(found) > 1:
        listing = ", ".join(str(p.parent) for p in found)
        raise ValueError(f"{path} holds {len(found)} run histories; pass one of: {listing}")
    return found[0]


#: Alias of :func:`find_history_file` (used by the CLI).
resolve_history_path = find_history_file


def load_history(path_or_run_dir: str | Path) -> RunHistory:
    """Read a run's history.

    Accepts the run's log directory (holding ``history.jsonl``, possibly in one subdirectory such as
    ``version_0``), a ``history.jsonl`` file, or a JSON file written by :meth:`RunHistory.to_json`. The JSON Lines
    file is replayed in order: the last record per ``(layer, unit, epoch)`` wins, and a round that goes back in
    epochs (a resumed run) discards the later epochs before it. A partial last line is skipped with a warning.

    Args:
        path_or_run_dir: Run directory or file.

    Returns:
        The history, with the change threshold its records were computed with.

    Raises:
        FileNotFoundError: If no history is found.
        ValueError: If a directory holds several histories.

    Example:
        >>> history = load_history("lightning_logs/version_0")  # doctest: +SKIP
        >>> history.to_csv("drift.csv")  # doctest: +SKIP
        >>> for s in history.summary(): print(s.layer, s.epoch, s.fraction_changed)  # doctest: +SKIP
    """
    path = find_history_file(path_or_run_dir)
    if path.suffix == ".json":
        return RunHistory.from_state_dict(json.loads(path.read_text(encoding="utf-8")))
    return _read_jsonl(path)
