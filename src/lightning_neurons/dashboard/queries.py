"""The views of a run's history, as queries over its round tables: one implementation each, for every reader.

The TensorBoard Neurons tab serves them as JSON (:mod:`lightning_neurons.dashboard.plugin`), and the HTML report is
a static export of the same views (:mod:`lightning_neurons.logging.report`). Each query reads only what it shows:
a layer's grid reads one round file, a unit's timeline the rows of one unit, the layer charts a few columns.

- :func:`layer_view`: the units of one layer at one epoch, with shown text, score, significance and drift state,
  filtered by state or text, sorted by unit, score or drift, one page at a time;
- :func:`unit_timeline`: one unit across epochs (description, combination, alternatives, ablation classes);
- :func:`search`: units whose shown text or description contains a text, across all layers of an epoch;
- :func:`layer_charts`: per epoch the fractions changed / gained / lost / dead and the concept distribution.

A unit's **state** against its previous explained epoch: ``dead`` (kind dead), ``gained`` (a concept where it had
none), ``lost`` (the reverse), ``changed`` (a concept both times, another meaning), ``new`` (first explained),
``stable`` (anything else). ``gained`` and ``lost`` come from the record's drift where it has them.

Example:
    >>> import torch
    >>> from lightning_neurons.drift.history import RunHistory
    >>> from lightning_neurons.results import ExplanationRound, UnitExplanation
    >>> embed = lambda texts: torch.eye(8)[[len(t) % 8 for t in texts]]
    >>> history = RunHistory()
    >>> for epoch, text in [(0, "dots"), (1, "stripes")]:
    ...     _ = history.add_round(ExplanationRound(epoch, [UnitExplanation("fc", 0, epoch, text, 0.8)]), embed)
    >>> tables = HistoryTables.of(history)
    >>> [(u["unit"], u["shown"], u["state"]) for u in layer_view(tables, "fc")["units"]]
    [(0, 'stripes', 'changed')]
    >>> [e["shown"] for e in unit_timeline(tables, "fc", 0)["epochs"]]
    ['dots', 'stripes']
    >>> [(m["layer"], m["unit"]) for m in search(tables, "STRIPES")["units"]]
    [('fc', 0)]
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lightning_neurons.drift.columns import records_to_table
from lightning_neurons.drift.round_store import RoundFile, RoundStore
from lightning_neurons.drift.run_history import RunHistory, load_history
from lightning_neurons.drift.store import find_history_file
from lightning_neurons.results import DEAD_UNIT, shown_text

#: Unit states, in the order the legend shows them.
STATES = ("changed", "gained", "lost", "stable", "new", "dead")
SortKey = Literal["unit", "score", "drift"]

_GRID_COLUMNS = (
    "layer",
    "unit",
    "description",
    "shown",
    "kind",
    "low_level",
    "score",
    "p_value",
    "q_value",
    "changed",
    "gained",
    "lost",
    "previous_epoch",
    "previous_description",
    "similarity",
    "score_delta",
)
# What the timeline shows, and no more: each column costs ~0.15 ms per round read.
_TIMELINE_COLUMNS = (
    "unit",
    "description",
    "shown",
    "kind",
    "score",
    "p_value",
    "q_value",
    "changed",
    "gained",
    "lost",
    "previous_epoch",
    "alternatives",
    "combination",
    "ablation",
)


class HistoryTables:
    """A run's history as one Arrow table per explained epoch, read from its round store or from memory.

    Args:
        store: The run's round store (files are listed again on every call: new rounds appear while a run trains).
        history: A history in memory (a JSON Lines history of an earlier run, or one not written to a store).
        previews_dir: The run's folder of crop PNGs (``<output folder>/previews``), if any.
    """

    def __init__(
        self,
        store: RoundStore | None = None,
        history: RunHistory | None = None,
        previews_dir: Path | None = None,
    ) -> None:
        if (store is None) == (history is None):
            raise ValueError("give exactly one of store= or history=")
        self.store = store
        self.history = history
        self.previews_dir = previews_dir
        self._memory: dict[int, pa.Table] = {}
        self._listing: dict[int, RoundFile] | None = None

    @classmethod
    def of(cls, history: RunHistory, previews_dir: Path | None = None) -> HistoryTables:
        """The tables of a history: its store's files when it has one, else its records in memory."""
        store = history.store
        if store is not None:
            return cls(store=store, previews_dir=previews_dir)
        return cls(history=history, previews_dir=previews_dir)

    @classmethod
    def open(cls, run_dir: str | Path) -> HistoryTables:
        """The tables of a run's output folder (its round store, or the ``history.jsonl`` of an earlier run).

        Raises:
            FileNotFoundError: If it holds no history.
        """
        found = find_history_file(run_dir)
        previews = Path(found).parent / "previews" if isinstance(found, Path) else None
        if str(found).endswith((".jsonl", ".json")):
            return cls(history=load_history(found), previews_dir=previews)
        return cls(store=RoundStore(found), previews_dir=previews)

    def _files(self, refresh: bool = True) -> dict[int, RoundFile]:
        assert self.store is not None
        if refresh or self._listing is None:
            self._listing = {f.epoch: f for f in self.store.effective()}
        return self._listing

    def epochs(self) -> list[int]:
        """Explained epochs, ascending (a store is listed again: each query starts here and sees new rounds)."""
        if self.store is not None:
            return sorted(self._files())
        assert self.history is not None
        return self.history.epochs

    def table(self, epoch: int, columns: Sequence[str], layer: str | None = None, unit: int | None = None) -> pa.Table:
        """The rows of one epoch (of ``layer`` and ``unit`` if given), with those of ``columns`` the epoch has."""
        if self.store is not None:
            f = self._files(refresh=False).get(epoch)
            if f is None:
                return pa.table({})
            return self.store.read(f, columns=list(columns), layer=layer, unit=unit)
        table = self._memory.get(epoch)
        if table is None:
            assert self.history is not None
            records = self.history._epoch_list(epoch) if epoch in self.history.epochs else []
            table = records_to_table(records) if records else pa.table({})
            self._memory[epoch] = table
        if not table.num_columns:
            return table
        if layer is not None:
            table = table.filter(pc.field("layer") == layer)
        if unit is not None:
            table = table.filter(pc.field("unit") == int(unit))
        return table.select([c for c in columns if c in table.column_names])

    def layers(self, epoch: int | None = None) -> list[str]:
        """Layers explained at ``epoch`` (default: the latest), in round order."""
        epochs = self.epochs()
        if not epochs:
            return []
        table = self.table(epochs[-1] if epoch is None else epoch, ["layer"])
        if not table.num_rows:
            return []
        return [str(x) for x in dict.fromkeys(table.column("layer").to_pylist())]

    def crop(self, layer: str, unit: int, epoch: int) -> str | None:
        """The unit's crop file at ``epoch``, relative to the run's output folder (``None`` where there is none)."""
        if self.previews_dir is None:
            return None
        from lightning_neurons.logging.previews import preview_path

        path = preview_path(self.previews_dir, layer, unit, epoch)
        return path.relative_to(self.previews_dir.parent).as_posix() if path.is_file() else None


# ---------------------------------------------------------------------------------------------------- helpers
def _column(table: pa.Table, name: str, default: Any = None) -> list[Any]:
    if name in table.column_names:
        return table.column(name).to_pylist()
    return [default] * table.num_rows


def _num(x: Any) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def _states(table: pa.Table) -> np.ndarray:
    # Vectorised state per row (STATES), in priority order dead > gained > lost > changed > new > stable.
    n = table.num_rows

    def flag(name: str) -> np.ndarray:
        if name not in table.column_names:
            return np.zeros(n, dtype=bool)
        return np.asarray(table.column(name).fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)

    kinds = table.column("kind") if "kind" in table.column_names else None
    dead = np.zeros(n, dtype=bool) if kinds is None else np.asarray(pc.fill_null(pc.equal(kinds, "dead"), False))
    first = (
        np.asarray(table.column("previous_epoch").is_null())
        if "previous_epoch" in table.column_names
        else np.ones(n, dtype=bool)
    )
    state = np.full(n, "stable", dtype=object)
    state[first] = "new"
    state[flag("changed")] = "changed"
    state[flag("lost")] = "lost"
    state[flag("gained")] = "gained"
    state[dead] = "dead"
    return state


def _shown_column(table: pa.Table) -> pa.ChunkedArray:
    # The shown text where the record has it, else the description (records written before kinds existed).
    desc = pc.cast(table.column("description"), pa.string())
    if "shown" not in table.column_names:
        return desc
    return pc.coalesce(pc.cast(table.column("shown"), pa.string()), desc)


def _row(table: pa.Table, i: int, state: str) -> dict[str, Any]:
    get = {name: table.column(name)[i].as_py() for name in table.column_names}
    description = get.get("description") or ""
    kind = get.get("kind")
    shown = get.get("shown") or shown_text(description, kind, get.get("low_level"))
    if not description and kind is None:
        shown = DEAD_UNIT if state == "dead" else shown
    return {
        "layer": get.get("layer"),
        "unit": int(get["unit"]),
        "shown": shown,
        "description": description,
        "kind": kind,
        "score": _num(get.get("score")),
        "p_value": _num(get.get("p_value")),
        "q_value": _num(get.get("q_value")),
        "state": state,
        "previous_description": get.get("previous_description"),
        "similarity": _num(get.get("similarity")),
        "score_delta": _num(get.get("score_delta")),
    }


# ---------------------------------------------------------------------------------------------------- views
def layer_view(
    tables: HistoryTables,
    layer: str,
    epoch: int | None = None,
    *,
    sort: SortKey = "unit",
    state: str | None = None,
    query: str | None = None,
    offset: int = 0,
    limit: int | None = 200,
) -> dict[str, Any]:
    """The units of ``layer`` at ``epoch`` (default: the latest explained epoch), one page of them.

    Args:
        tables: The run's history tables.
        layer: Layer name.
        epoch: Explained epoch (``None``: the latest).
        sort: ``"unit"``, ``"score"`` (highest first) or ``"drift"`` (least similar to the previous epoch first).
        state: Keep only units in this state (:data:`STATES`).
        query: Keep only units whose shown text or description contains it (case-insensitive).
        offset: First unit of the page (after filtering and sorting).
        limit: Units per page (``None``: all).

    Returns:
        ``{"layer", "epoch", "epochs", "total", "matched", "counts": {state: n}, "units": [row, ...]}``; a row has
        ``unit, shown, description, kind, score, p_value, q_value, state, previous_description, similarity,
        score_delta, crop``.
    """
    epochs = tables.epochs()
    ep = epochs[-1] if epoch is None and epochs else epoch
    empty: dict[str, Any] = {
        "layer": layer,
        "epoch": ep,
        "epochs": epochs,
        "total": 0,
        "matched": 0,
        "counts": {},
        "units": [],
    }
    if ep is None or ep not in epochs:
        return empty
    table = tables.table(ep, _GRID_COLUMNS, layer=layer)
    if not table.num_rows:
        return empty
    states = _states(table)
    counts = Counter(states.tolist())
    keep = np.ones(table.num_rows, dtype=bool)
    if state:
        keep &= states == state
    if query:
        keep &= _matches(table, query)
    idx = np.flatnonzero(keep)
    if sort == "score":
        scores = np.nan_to_num(table.column("score").to_numpy(zero_copy_only=False)[idx].astype(float), nan=-np.inf)
        idx = idx[np.argsort(-scores, kind="stable")]
    elif sort == "drift":
        sim = table.column("similarity").to_numpy(zero_copy_only=False)[idx].astype(float)
        idx = idx[np.argsort(np.nan_to_num(sim, nan=np.inf), kind="stable")]
    else:
        idx = idx[np.argsort(table.column("unit").to_numpy()[idx], kind="stable")]
    page = idx[offset : None if limit is None else offset + limit]
    units = []
    for i in page.tolist():
        row = _row(table, i, str(states[i]))
        row["crop"] = tables.crop(layer, row["unit"], ep)
        units.append(row)
    return {
        "layer": layer,
        "epoch": ep,
        "epochs": epochs,
        "total": table.num_rows,
        "matched": int(len(idx)),
        "counts": {s: int(counts.get(s, 0)) for s in STATES},
        "units": units,
    }


def _matches(table: pa.Table, query: str) -> np.ndarray:
    text = query.strip().lower()
    if not text:
        return np.ones(table.num_rows, dtype=bool)
    hit = pc.match_substring(pc.utf8_lower(_shown_column(table)), text)
    desc = pc.match_substring(pc.utf8_lower(pc.cast(table.column("description"), pa.string())), text)
    return np.asarray(pc.fill_null(pc.or_(hit, desc), False))


def search(tables: HistoryTables, query: str, epoch: int | None = None, limit: int = 200) -> dict[str, Any]:
    """Units of every layer whose shown text or description contains ``query`` at ``epoch`` (default: latest).

    Returns:
        ``{"query", "epoch", "matched", "units": [row with "layer", ...]}`` (at most ``limit`` rows), and per
        layer the number of matches (``"layers"``).
    """
    epochs = tables.epochs()
    ep = epochs[-1] if epoch is None and epochs else epoch
    out: dict[str, Any] = {"query": query, "epoch": ep, "matched": 0, "layers": {}, "units": []}
    if ep is None or ep not in epochs or not query.strip():
        return out
    table = tables.table(ep, _GRID_COLUMNS)
    if not table.num_rows:
        return out
    idx = np.flatnonzero(_matches(table, query))
    hits = table.take(pa.array(idx))
    states = _states(hits)
    out["matched"] = int(len(idx))
    out["layers"] = dict(Counter(hits.column("layer").to_pylist()))
    for i in range(min(limit, hits.num_rows)):
        row = _row(hits, i, str(states[i]))
        row["crop"] = tables.crop(row["layer"], row["unit"], ep)
        out["units"].append(row)
    return out


def unit_timeline(tables: HistoryTables, layer: str, unit: int) -> dict[str, Any]:
    """One unit at every explained epoch: shown text, description, score, significance, state, combination,
    alternatives, ablation classes and crop (the full records: ``RunHistory.timeline``).

    Returns:
        ``{"layer", "unit", "epochs": [entry, ...]}`` in epoch order.
    """  # noqa: D205
    entries = []
    for ep in tables.epochs():
        table = tables.table(ep, _TIMELINE_COLUMNS, layer=layer, unit=int(unit))
        if not table.num_rows:
            continue
        states = _states(table)
        row = _row(table, 0, str(states[0]))
        get = {name: table.column(name)[0].as_py() for name in table.column_names}
        row.update(
            layer=layer,
            epoch=ep,
            alternatives=[{"text": a["text"], "score": _num(a["score"])} for a in get.get("alternatives") or []],
            combination=[{"text": a["text"], "score": _num(a["score"])} for a in get.get("combination") or []],
            ablation=[{"class": a["class"], "drop": _num(a["drop"])} for a in get.get("ablation") or []],
            crop=tables.crop(layer, int(unit), ep),
        )
        entries.append(row)
    return {"layer": layer, "unit": int(unit), "epochs": entries}


def layer_charts(tables: HistoryTables, layer: str, top_concepts: int = 8) -> dict[str, Any]:
    """Per explained epoch of ``layer``: units, fractions changed / gained / lost / dead, mean score, and the concept
    distribution (how many units each of the ``top_concepts`` most held concepts holds; the rest as ``"other"``).

    ``fraction`` has one list per state (:data:`STATES`) and ``concepts_changed`` (the meaning or the concept set of
    a multi-concept combination changed).

    Returns:
        ``{"layer", "epochs": [...], "units": [...], "fraction": {state: [...]}, "mean_score": [...],
        "concepts": {concept: [count per epoch]}}``.
    """  # noqa: D205
    per_epoch: list[tuple[int, int, Counter[str], dict[str, float | None], float | None]] = []
    totals: Counter[str] = Counter()
    for ep in tables.epochs():
        table = tables.table(
            ep,
            (
                "layer",
                "unit",
                "description",
                "shown",
                "kind",
                "score",
                "changed",
                "concepts_changed",
                "gained",
                "lost",
                "previous_epoch",
            ),
            layer=layer,
        )
        n = table.num_rows
        if not n:
            continue
        states = Counter(_states(table).tolist())
        # The concept distribution counts units that hold a concept (kind concept, or legacy records).
        kinds = _column(table, "kind")
        texts = _shown_column(table).to_pylist()
        held = Counter(t for t, k in zip(texts, kinds) if t and k in (None, "concept"))
        totals.update(held)
        scores = table.column("score").to_numpy(zero_copy_only=False).astype(float)
        mean = float(np.nanmean(scores)) if np.isfinite(scores).any() else None
        fractions: dict[str, float | None] = {s: states.get(s, 0) / n for s in STATES}
        if "concepts_changed" in table.column_names:  # the meaning or a multi-concept combination's concept set
            fractions["concepts_changed"] = pc.sum(pc.fill_null(table.column("concepts_changed"), False)).as_py() / n
        if states.get("new", 0) + states.get("dead", 0) == n:  # nothing compared yet (a first round): no drift
            fractions.update(changed=None, gained=None, lost=None, concepts_changed=None)
        per_epoch.append((ep, n, held, fractions, mean))
    top = [c for c, _ in totals.most_common(top_concepts)]
    concepts: dict[str, list[int]] = {c: [] for c in top}
    other: list[int] = []
    for _, _, held, _, _ in per_epoch:
        for c in top:
            concepts[c].append(held.get(c, 0))
        other.append(sum(held.values()) - sum(held.get(c, 0) for c in top))
    if any(other):
        concepts["other"] = other
    return {
        "layer": layer,
        "epochs": [p[0] for p in per_epoch],
        "units": [p[1] for p in per_epoch],
        "fraction": {s: [p[3].get(s) for p in per_epoch] for s in (*STATES, "concepts_changed")},
        "mean_score": [p[4] for p in per_epoch],
        "concepts": concepts,
    }


__all__ = ["STATES", "HistoryTables", "layer_charts", "layer_view", "search", "unit_timeline"]
