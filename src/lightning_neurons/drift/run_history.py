"""Drift over the records of a run: :class:`RunHistory`, per (layer, unit, epoch) what a unit meant and how it drifted.

:class:`RunHistory` lives in the callback's ``state_dict`` (plain Python types, so it fits a Lightning checkpoint)
and, when given a path, in the store (:mod:`lightning_neurons.drift.store`), a JSON Lines file that gets the records
of every round appended as the round is added; records are :class:`~lightning_neurons.drift.records.HistoryRecord`.

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
import json
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from filelock import FileLock

from lightning_neurons.drift.baseline import baseline_units, round_settings
from lightning_neurons.drift.columns import concat_rounds, records_to_table, table_to_dicts
from lightning_neurons.drift.metrics import (
    DEFAULT_CHANGE_THRESHOLD,
    DEFAULT_STABLE_ROUNDS,
    EmbedFn,
    LayerDriftSummary,
    UnitDrift,
    UnitStability,
    compare_units,
    summarize_units,
)
from lightning_neurons.drift.records import (
    _CSV_COLUMNS,
    SCHEMA_VERSION,
    HistoryRecord,
    Key,
    _epoch_runs,
    _gc_paused,
    _trim,
)
from lightning_neurons.drift.round_store import RoundStore
from lightning_neurons.drift.store import (
    _read_rounds,
    acquire_lock,
    append_rounds,
    find_history_file,
    release_lock,
)
from lightning_neurons.explanation.multi_concept import format_combination
from lightning_neurons.files import write_text_atomic
from lightning_neurons.results import Alternative, ExplanationRound, UnitExplanation, dumps_strict


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
    path: Path | str | None = None
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
    # The round store the history writes to (a folder of Parquet rounds; None: memory or a JSON Lines file), and
    # the store a lazily loaded history reads its records from on first use (load_history).
    _store: RoundStore | None = field(default=None, init=False, repr=False, compare=False)
    _pending: RoundStore | None = field(default=None, init=False, repr=False, compare=False)
    # Size of the attached file after this history last wrote or checked it: a smaller (or missing) file was
    # truncated or deleted behind the run's back, and is rewritten instead of appended to.
    _file_size: int | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.stable_rounds < 1:
            raise ValueError(f"stable_rounds must be >= 1, got {self.stable_rounds}")
        if self.path is not None:
            self.path = _as_location(self.path)
            if not _is_jsonl(self.path):
                self._store = RoundStore(self.path)
        given, self._records = self._records, {}
        for record in sorted(given.values(), key=lambda r: r.key[2]):
            self._insert(record)

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        self._ready()
        return len(self._records)

    def __contains__(self, key: object) -> bool:
        self._ready()
        return key in self._records

    @property
    def records(self) -> list[HistoryRecord]:
        """All records ordered by epoch, layer (first-seen order), unit."""
        self._ready()
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
        if self._pending is not None:
            return [f.epoch for f in self._pending.effective()]
        return sorted(self._by_epoch)

    @property
    def layers(self) -> list[str]:
        """Layer names in the order first seen (by epoch)."""
        self._ready()
        return list(dict.fromkeys(layer for ep in sorted(self._by_epoch) for layer in self._by_epoch[ep]))

    def units(self, layer: str) -> list[int]:
        """Units of ``layer`` explained at any epoch, ascending."""
        self._ready()
        return sorted(self._by_unit.get(layer, {}))

    def get(self, layer: str, unit: int, epoch: int) -> HistoryRecord:
        """The record of one unit at one epoch.

        Raises:
            KeyError: If there is none.
        """
        self._ready()
        try:
            return self._records[(layer, unit, epoch)]
        except KeyError:
            raise KeyError(
                f"no history for unit {unit} of layer {layer!r} at epoch {epoch} "
                f"(epochs: {self.epochs}, layers: {self.layers})"
            ) from None

    def timeline(self, layer: str, unit: int) -> list[HistoryRecord]:
        """One unit's records in epoch order (read from the store alone while the history is not loaded)."""
        if self._pending is not None:
            store = self._pending
            return [
                HistoryRecord.from_dict(d)
                for f in store.effective()
                for d in table_to_dicts(store.read(f, layer=layer, unit=int(unit)))
            ]
        return list(self._by_unit.get(layer, {}).get(unit, {}).values())

    def latest(self) -> list[HistoryRecord]:
        """Every unit's latest record, by layer (first-seen order) then unit: what the next round's drift needs.

        Example:
            >>> RunHistory().latest()
            []
        """
        self._ready()
        return [
            timeline[next(reversed(timeline))]
            for layer in self.layers
            for _, timeline in sorted(self._by_unit[layer].items())
        ]

    def _epoch_records(self, ep: int) -> list[tuple[str, dict[int, HistoryRecord]]]:
        self._ready()
        # (layer, unit -> record) of one epoch, layers in self.layers order.
        by_layer = self._by_epoch.get(ep, {})
        if len(by_layer) > 1:
            rank = {name: i for i, name in enumerate(self.layers)}
            return [(layer, by_layer[layer]) for layer in sorted(by_layer, key=rank.__getitem__)]
        return list(by_layer.items())

    def drift(self, epoch: int | None = None) -> list[UnitDrift]:
        """Drift records of one epoch (default: all epochs), in :attr:`records` order."""
        self._ready()
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
        self._ready()
        out = []
        for ep in self.epochs if epoch is None else [epoch]:
            for layer, units in self._epoch_records(ep):
                rows = ((u, units[u].drift, self._stability[(layer, u, ep)]) for u in sorted(units))
                out.append(summarize_units(layer, ep, rows, self.stable_rounds))
        return out

    def format_summary(self) -> list[str]:
        """Terminal lines of the drift summary (deprecated: use ``printout.history_lines``).

        ``history_lines`` is the one printout of a history (what ``lightning-neurons history`` prints: gained, lost
        and dead units and the shown texts of the row every sink uses). It lives above ``drift/`` (it reads the
        sinks' row builder), so this method cannot call it without an import cycle; it keeps its old columns and
        only shows the shown texts (``"no clear concept"``, ``"low-level: red"``), never a raw best concept.

        Example:
            >>> import warnings
            >>> with warnings.catch_warnings():
            ...     warnings.simplefilter("ignore", DeprecationWarning)
            ...     RunHistory().format_summary()
            ['(empty history)']
        """
        warnings.warn(
            "RunHistory.format_summary is deprecated: use lightning_neurons.logging.printout.history_lines(history)",
            DeprecationWarning,
            stacklevel=2,
        )
        self._ready()
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
        changes = [r for r in records if r.drift.changed]
        if changes:
            lines.append("meaning changes:")
            lines += [
                f"  {r.drift.layer}[{r.drift.unit}] epoch {r.drift.epoch}: "
                f"{r.drift.previous_shown or r.drift.previous_description!r} -> {r.explanation.shown!r} "
                f"(similarity {r.drift.similarity:.2f})"
                for r in changes
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

    def _ready(self) -> None:
        # A history loaded from a round store reads its records on first use (load_history returns at once).
        store, self._pending = self._pending, None
        if store is not None:
            with _gc_paused():
                self._replay((f.rid, store.read_records(f)) for f in store.effective())

    @property
    def store(self) -> RoundStore | None:
        """The round store this history writes to or was loaded from (``None``: memory or JSON Lines)."""
        return self._pending or self._store

    def to_arrow(self) -> pa.Table:
        """Every record as one Arrow table, a column per field (read from the store's files where it has one).

        Example:
            >>> RunHistory().to_arrow().num_rows
            0
        """
        store = self._pending
        if store is not None:
            files = store.effective()
            if files:
                return concat_rounds([store.read(f) for f in files])
        records = self.records
        return records_to_table(records) if records else pa.table({})

    def to_pandas(self, arrow_dtypes: bool = True) -> Any:
        """Every record as a ``pandas.DataFrame`` (a column per field): the history for analysis.

        Args:
            arrow_dtypes: Keep the columns Arrow-backed (``pd.ArrowDtype``: no copy, lists stay lists; 100 rounds of
                98k units convert in seconds); ``False`` converts to NumPy/object columns (much slower for the
                list columns).

        Example:
            >>> RunHistory().to_pandas().shape
            (0, 0)
        """
        import pandas as pd

        table = self.to_arrow()
        return table.to_pandas(types_mapper=pd.ArrowDtype) if arrow_dtypes else table.to_pandas()

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
        self._ready()
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
        previous_settings: dict[tuple[str, int], str | None] = {}
        for u in units:
            timeline = self._by_unit.get(u.layer, {}).get(u.unit)
            for e in reversed(timeline or {}):  # newest first; usually the first one is already before ep
                if e < ep:
                    previous[u.key] = timeline[e].explanation  # type: ignore[index]
                    previous_settings[u.key] = timeline[e].settings  # type: ignore[index]
                    break
        # A change of settings (vocabulary, backend, top_k, ...) starts a new baseline: never counted as drift.
        settings = round_settings(round)
        baseline = baseline_units(previous_settings, settings)
        drifts = compare_units(previous, units, embed, threshold=self.threshold, epoch=ep, baseline=baseline)
        shown_at = round.meta.get("confidence_threshold")
        shown_at = None if shown_at is None else float(shown_at)
        new = [
            HistoryRecord(u, d, revisit=revisit, confidence_threshold=shown_at, settings=settings)
            for u, d in zip(units, drifts)
        ]
        # First on disk: a failed write changes nothing.
        if self._store is not None:
            self._restore_store()
            identity = None if round.identity is None else round.identity.to_dict()
            ids = [self._store.write_round(new, identity=identity, meta=round.meta, revisit=revisit)] if new else []
        else:
            ids = self._append(new) if self.path is not None else []
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
        self._pending = None
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
        self._ready()
        location = _as_location(path)
        if self.path is not None and location != self.path:
            self.close()
        self.path = location
        if not _is_jsonl(location):
            self._attach_store(RoundStore(location))
            return
        self._store = None
        assert isinstance(self.path, Path)
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
                self._file_size = self.path.stat().st_size
                return
        self._round_ids = dict(self._append(self.records))

    def _attach_store(self, store: RoundStore) -> None:
        # The round store: on disk, each epoch of this history is one round file; bring the store in line.
        self._store = store
        store.acquire()
        if not self._records:
            if store.exists():
                warnings.warn(
                    f"{store.url} already holds history rounds; new rounds are added and replace those of the same "
                    "or later epochs when read",
                    stacklevel=3,
                )
            return
        on_disk = {f.epoch: f for f in store.effective()}
        if set(on_disk) == set(self._by_epoch) and all(
            [r.to_dict() for r in store.read_records(f)] == [r.to_dict() for r in self._epoch_list(ep)]
            for ep, f in on_disk.items()
        ):
            self._round_ids = {ep: f.rid for ep, f in on_disk.items()}
            return
        ids = {}
        for ep in self.epochs:
            group = self._epoch_list(ep)
            ids[ep] = store.write_round(group, revisit=group[0].revisit)[1]
        self._round_ids = ids

    def _restore_store(self) -> None:
        # Round files this history wrote that were deleted or cut by hand (a user cleaning up) are noticed before the
        # next round and every round is written again, so that the store, the report and the run agree.
        assert self._store is not None
        lost = self._store.tampered()
        if not lost or not self._records:
            return
        how = sorted({h for _, h in lost})
        warnings.warn(
            f"{self._store.url}: history round files were {' and '.join(how)} since this run last wrote them "
            f"({', '.join(n for n, _ in lost[:3])}{' ...' if len(lost) > 3 else ''}); rewriting the run's "
            f"{len(self.epochs)} rounds, so that the store, the report and the run agree again",
            stacklevel=3,
        )
        self._store.forget([n for n, _ in lost])
        self._round_ids = {ep: self._store.write_round(self._epoch_list(ep))[1] for ep in self.epochs}

    def _epoch_list(self, ep: int) -> list[HistoryRecord]:
        return [units[u] for _, units in self._epoch_records(ep) for u in sorted(units)]

    def close(self) -> None:
        """Release the file lock taken by :meth:`attach` or the first write (the records stay in memory).

        Example:
            >>> RunHistory().close()  # nothing attached: a no-op
        """
        lock, self._lock = self._lock, None
        release_lock(lock)
        if self._store is not None:
            self._store.close()

    def _acquire(self) -> None:
        if self._lock is not None or self.path is None:
            return
        self._lock = acquire_lock(Path(self.path))

    def _append(self, records: Iterable[HistoryRecord]) -> list[tuple[int, str]]:
        # One write per call, then fsync: readers see each round complete or not at all. A file that lost rounds
        # this history wrote (deleted or truncated by hand) is rewritten whole: every round written is read back.
        assert self.path is not None
        self._acquire()
        path = Path(self.path)
        size = path.stat().st_size if path.is_file() else None
        if self._file_size is not None and (size is None or size < self._file_size) and self._records:
            warnings.warn(
                f"{self.path} was {'deleted' if size is None else 'truncated'} since this run last wrote it "
                f"({self._file_size} bytes, now {size or 0}); rewriting it with the run's {len(self._records)} "
                "records, so that the file, the report and the run agree again",
                stacklevel=3,
            )
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            records = [*self.records, *records]
        ids = append_rounds(path, records)
        self._file_size = path.stat().st_size
        return ids

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
        self._ready()
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
        self._ready()
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
        path = _as_location(store["path"])
        wanted = [(int(ep), str(rid)) for ep, rid in store["rounds"]]
        found: dict[str, list[HistoryRecord]] = {}
        exists = False
        if not _is_jsonl(path):
            rounds = RoundStore(path)
            files = rounds.files()
            exists = bool(files)
            ids = {rid for _, rid in wanted}
            with _gc_paused():
                found = {f.rid: rounds.read_records(f) for f in files if f.rid in ids}
        elif Path(path).is_file():
            exists = True
            with warnings.catch_warnings(), _gc_paused():
                warnings.simplefilter("ignore")  # skipped lines belong to rounds this history does not use
                found = {rid: group for rid, group in _read_rounds(Path(path)) if rid is not None}
        missing = [ep for ep, rid in wanted if rid not in found]
        if not missing:
            with _gc_paused():
                self._replay((rid, found[rid]) for _, rid in wanted)
            return
        shown = ", ".join(map(str, missing[:10])) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        warnings.warn(
            f"the checkpoint's history lives in {path}, which "
            + ("does not hold the rounds of epochs " + shown if exists else "does not exist")
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


def _as_location(path: str | Path) -> Path | str:
    # Local paths as Path; fsspec URLs ("memory://...", "s3://...") stay strings (Path would fold their "//").
    text = str(path)
    return text if "://" in text and not text.startswith("file://") else Path(text.removeprefix("file://"))


def _is_jsonl(path: Path | str) -> bool:
    # A JSON Lines history (earlier runs, exports) is a file; the round store is a folder.
    return str(path).endswith(".jsonl")


def _read_store(store: RoundStore) -> RunHistory:
    # Lazy: only the listing and the last round's threshold now; the records on first use (RunHistory._ready).
    files = store.effective()
    threshold = DEFAULT_CHANGE_THRESHOLD
    if files:
        column = store.read(files[-1], columns=["threshold"]).column("threshold")
        if len(column) and column[len(column) - 1].is_valid:
            threshold = float(column[len(column) - 1].as_py())
    history = RunHistory(threshold=threshold)
    history._pending = store
    return history


def _read_jsonl(path: Path, warn: bool = True) -> RunHistory:
    with _gc_paused():
        rounds = _read_rounds(path, warn)
        last = next((group[-1] for _, group in reversed(rounds) if group), None)
        history = RunHistory(threshold=float(last.drift.threshold if last is not None else DEFAULT_CHANGE_THRESHOLD))
        history._replay(rounds)
    return history


def load_history(path_or_run_dir: str | Path) -> RunHistory:
    """Read a run's history.

    Accepts the run's log directory (holding the round store ``history/`` or, from earlier runs,
    ``history.jsonl``, possibly in one subdirectory such as ``version_0``), the store folder or its fsspec URL, a
    ``history.jsonl`` file, or a JSON file written by :meth:`RunHistory.to_json`. A store is read lazily: the
    records are read on first use, and :meth:`RunHistory.timeline`, :attr:`RunHistory.epochs` and
    :meth:`RunHistory.to_pandas` read the round files directly. The rounds (or the JSON Lines file) are replayed in
    order: the last record per ``(layer, unit, epoch)`` wins, and a round that goes back in
    epochs (a resumed run) discards the later epochs before it. A partial last line is skipped with a warning.

    Args:
        path_or_run_dir: Run directory or file.

    Returns:
        The history, with the change threshold its records were computed with.

    Raises:
        FileNotFoundError: If no history is found.
        ValueError: If a directory holds several histories, or the path is a CSV export (not read back).

    Example:
        >>> history = load_history("lightning_logs/version_0")  # doctest: +SKIP
        >>> history.to_csv("drift.csv")  # doctest: +SKIP
        >>> for s in history.summary(): print(s.layer, s.epoch, s.fraction_changed)  # doctest: +SKIP
    """
    path = find_history_file(path_or_run_dir)
    if not str(path).endswith((".json", ".jsonl", ".csv")):
        return _read_store(RoundStore(path))
    path = Path(path)
    if path.suffix == ".csv":
        raise ValueError(
            f"{path} is a CSV export of a history, which is not read back; pass the run folder or its history.jsonl"
        )
    if path.suffix == ".json":
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return _read_jsonl(path)  # JSON Lines under a .json name
        if isinstance(state, dict) and "records" in state:
            return RunHistory.from_state_dict(state)
    return _read_jsonl(path)
