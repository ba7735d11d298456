"""The views of a run's history, as queries over its round tables: one implementation each, for every reader.

The TensorBoard Neurons tab serves them as JSON (:mod:`lightning_neurons.dashboard.plugin`), and the HTML report is
a static export of the same views (:mod:`lightning_neurons.logging.report`). Each query reads only what it shows:
a layer's grid reads one round file, a unit's timeline the rows of one unit, the layer charts a few columns.

- :func:`layer_view`: the units of one layer at one epoch, with shown text, score, significance and drift state,
  filtered by state or text, sorted by unit, score or drift, one page at a time;
- :func:`unit_timeline`: one unit across epochs (shown text, score, significance, state, drift against the previous
  epoch, combination, alternatives, ablation classes, crop); :func:`layer_timelines` is the same view of many units
  of a layer, reading each epoch's layer rows once (the HTML report's unit rows);
- :func:`search`: units whose shown text or description contains a text, across all layers of an epoch;
- :func:`layer_charts`: per epoch the fractions changed / gained / lost / dead, the units stable for the last N
  comparisons, and the concept distribution.

Every view shows a unit's text as every other sink does (:func:`~lightning_neurons.logging.rows.unit_row`): the
shown text (``"no clear concept"``, ``"low-level: ..."``, ``"dead unit"``; records made before kinds: the
description, or ``"no clear concept"`` at or below their round's confidence threshold), the text shown at the
previous epoch as ``previous_description``, and a combination and alternatives only for units shown with a concept.

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
    >>> [(e["shown"], e["state"], e["previous_description"]) for e in unit_timeline(tables, "fc", 0)["epochs"]]
    [('dots', 'new', None), ('stripes', 'changed', 'dots')]
    >>> [(m["layer"], m["unit"]) for m in search(tables, "STRIPES")["units"]]
    [('fc', 0)]
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lightning_neurons.dashboard.tables import HistoryTables
from lightning_neurons.drift.columns import concat_rounds
from lightning_neurons.drift.metrics import DEFAULT_STABLE_ROUNDS, has_concept
from lightning_neurons.results import NO_CLEAR_CONCEPT

#: Unit states, in the order the legend shows them.
STATES = ("changed", "gained", "lost", "stable", "new", "dead")
SortKey = Literal["unit", "score", "drift"]

# What a unit's shown text is made of (records made before kinds: the confidence rule of their round).
_TEXT_COLUMNS = ("description", "shown", "kind", "confidence", "confidence_threshold")
# What a grid row shows.
_ROW_COLUMNS = (
    "layer",
    "unit",
    *_TEXT_COLUMNS,
    "score",
    "p_value",
    "q_value",
    "changed",
    "gained",
    "lost",
    "previous_epoch",
    "previous_description",
    "previous_shown",
    "similarity",
    "score_delta",
)
# What a timeline entry shows besides. A timeline decodes one row group of each column per round: a number costs
# ~0.03 ms, a text ~0.14 ms, the alternatives ~0.4 ms (4,096-row groups), so nothing is read that is known (the layer,
# the epoch) or not shown.
_TIMELINE_EXTRA = ("baseline", "concepts_changed", "concept_jaccard", "alternatives", "combination", "ablation")
_TIMELINE_COLUMNS = (*(c for c in _ROW_COLUMNS if c != "layer"), *_TIMELINE_EXTRA)


# ---------------------------------------------------------------------------------------------------- helpers
def _num(x: Any) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def _flag(table: pa.Table, name: str) -> np.ndarray:
    if name not in table.column_names:
        return np.zeros(table.num_rows, dtype=bool)
    return np.asarray(table.column(name).fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)


def _state_codes(table: pa.Table) -> np.ndarray:
    # Vectorised state per row as an index into STATES, in priority order dead > gained > lost > changed > new > stable.
    n = table.num_rows
    code = np.full(n, STATES.index("stable"), dtype=np.int8)
    if "previous_epoch" in table.column_names:
        code[np.asarray(table.column("previous_epoch").is_null())] = STATES.index("new")
    else:
        code[:] = STATES.index("new")
    for name in ("changed", "lost", "gained"):
        code[_flag(table, name)] = STATES.index(name)
    if "kind" in table.column_names:
        code[np.asarray(pc.fill_null(pc.equal(table.column("kind"), "dead"), False))] = STATES.index("dead")
    return code


def _states(table: pa.Table) -> np.ndarray:
    # The state names of _state_codes.
    return np.asarray(STATES, dtype=object)[_state_codes(table)]


def _text(table: pa.Table, name: str) -> pa.ChunkedArray:
    if name in table.column_names:
        return pc.cast(table.column(name), pa.string())
    return pa.chunked_array([pa.nulls(table.num_rows, pa.string())])


def _shown_column(table: pa.Table) -> pa.ChunkedArray:
    # The text shown for each row: the stored shown text, else (records made before kinds) the description, or
    # "no clear concept" at or below the round's confidence threshold (as explanation.scoring.shown_description).
    description = pc.fill_null(_text(table, "description"), "")
    stored = _text(table, "shown")
    if "confidence" not in table.column_names or "confidence_threshold" not in table.column_names:
        return pc.coalesce(stored, description)
    unsure = pc.less_equal(table.column("confidence"), table.column("confidence_threshold"))
    unsure = pc.fill_null(pc.and_(unsure, pc.not_equal(description, "")), False)
    legacy = pc.if_else(unsure, pa.scalar(NO_CLEAR_CONCEPT), description)
    return pc.coalesce(stored, legacy)


def _previous_column(table: pa.Table) -> pa.ChunkedArray:
    # The text shown at the previous epoch: stored apart only where it was not the previous description.
    return pc.coalesce(_text(table, "previous_shown"), _text(table, "previous_description"))


def _rows(table: pa.Table, states: np.ndarray | None = None) -> list[dict[str, Any]]:
    """One dict per row: layer, unit, shown text, description, kind, score, significance, state, drift."""
    states = _states(table) if states is None else states
    shown = _shown_column(table).to_pylist()
    previous = _previous_column(table).to_pylist()
    plain = table.select([c for c in _ROW_COLUMNS if c in table.column_names]).to_pylist()
    out = []
    for i, get in enumerate(plain):
        out.append(
            {
                "layer": get.get("layer"),
                "unit": int(get["unit"]),
                "shown": shown[i],
                "description": get.get("description") or "",
                "kind": get.get("kind"),
                "score": _num(get.get("score")),
                "p_value": _num(get.get("p_value")),
                "q_value": _num(get.get("q_value")),
                "confidence": _num(get.get("confidence")),
                "state": str(states[i]),
                "previous_epoch": get.get("previous_epoch"),
                "previous_description": previous[i],
                "similarity": _num(get.get("similarity")),
                "score_delta": _num(get.get("score_delta")),
            }
        )
    return out


def _pairs(items: Iterable[dict[str, Any]] | None, text: str, value: str) -> list[dict[str, Any]]:
    return [{text: a[text], value: _num(a[value])} for a in items or []]


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
    crops: bool = True,
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
        crops: Give each row its crop file (one file lookup per row).

    Returns:
        ``{"layer", "epoch", "epochs", "total", "matched", "counts": {state: n}, "units": [row, ...]}``; a row has
        ``layer, unit, shown, description, kind, score, p_value, q_value, confidence, state, previous_epoch,
        previous_description`` (the text shown at the previous epoch)``, similarity, score_delta, crop``.
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
    table = tables.table(ep, _ROW_COLUMNS, layer=layer)
    if not table.num_rows:
        return empty
    states = _states(table)
    counts = Counter(dict(zip(STATES, np.bincount(_state_codes(table), minlength=len(STATES)).tolist())))
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
    units = _rows(table.take(pa.array(page, pa.int64())), states[page])
    for row in units:
        row["crop"] = tables.crop(layer, row["unit"], ep) if crops else None
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
    return np.asarray(pc.fill_null(pc.or_kleene(hit, desc), False))


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
    table = tables.table(ep, _ROW_COLUMNS)
    if not table.num_rows:
        return out
    idx = np.flatnonzero(_matches(table, query))
    hits = table.take(pa.array(idx, pa.int64()))
    out["matched"] = int(len(idx))
    out["layers"] = dict(Counter(hits.column("layer").to_pylist()))
    for row in _rows(hits.slice(0, limit)):
        row["crop"] = tables.crop(row["layer"], row["unit"], ep)
        out["units"].append(row)
    return out


def unit_timeline(tables: HistoryTables, layer: str, unit: int) -> dict[str, Any]:
    """One unit at every explained epoch: :func:`layer_timelines` of one unit, reading only its row of each round.

    Returns:
        ``{"layer", "unit", "stable_since", "epochs": [entry, ...]}`` in epoch order (see :func:`layer_timelines`).
    """
    return layer_timelines(tables, layer, [unit])[int(unit)]


def layer_timelines(
    tables: HistoryTables, layer: str, units: Sequence[int], *, crops: bool = True
) -> dict[int, dict[str, Any]]:
    """The timelines of ``units`` of ``layer``: each epoch's rows of the layer are read once, for all of them.

    Args:
        tables: The run's history tables.
        layer: Layer name.
        units: The units (one unit: only its row of each round is read).
        crops: Give each entry its crop file (one file lookup per entry).

    Returns:
        Per unit ``{"layer", "unit", "stable_since", "epochs": [entry, ...]}``, entries in epoch order. An entry is
        a grid row (:func:`layer_view`) plus ``epoch``, ``baseline`` (the settings changed: not compared),
        ``concepts_changed`` and ``concept_jaccard`` (a multi-concept combination's concept set against the previous
        epoch), ``combination`` and ``alternatives`` (``[{"text", "score"}]``, units shown with a concept only),
        ``ablation`` (``[{"class", "drop"}]``) and ``crop``. ``stable_since``: the epoch of the unit's last change of
        meaning, else its first explained epoch.

    Example:
        >>> from lightning_neurons.drift.history import RunHistory
        >>> layer_timelines(HistoryTables.of(RunHistory()), "fc", [0, 3])[3]
        {'layer': 'fc', 'unit': 3, 'stable_since': None, 'epochs': []}
    """
    wanted = sorted({int(u) for u in units})
    one = wanted[0] if len(wanted) == 1 else None
    parts, epochs = [], []
    for ep in tables.epochs():
        table = tables.table(ep, _TIMELINE_COLUMNS, layer=layer, unit=one)
        if one is None and table.num_rows:
            table = table.filter(pc.is_in(table.column("unit"), pa.array(wanted, table.column("unit").type)))
        if table.num_rows:
            epochs.append(np.full(table.num_rows, ep, dtype=np.int64))
            parts.append(table)
    entries: dict[int, list[dict[str, Any]]] = {u: [] for u in wanted}
    since: dict[int, int | None] = dict.fromkeys(wanted)
    if parts:
        _timeline_entries(tables, layer, parts, epochs, crops, entries, since)
    return {u: {"layer": layer, "unit": u, "stable_since": since[u], "epochs": entries[u]} for u in wanted}


def _timeline_entries(
    tables: HistoryTables,
    layer: str,
    parts: list[pa.Table],
    epochs: list[np.ndarray],
    crops: bool,
    entries: dict[int, list[dict[str, Any]]],
    since: dict[int, int | None],
) -> None:
    # The rows of every epoch read, as timeline entries per unit (in epoch order), and each unit's stable_since.
    table = concat_rounds(parts)
    extra = table.select([c for c in _TIMELINE_EXTRA if c in table.column_names]).to_pylist()
    changed = _flag(table, "changed")
    at = np.concatenate(epochs).tolist()
    for i, row in enumerate(_rows(table)):
        get, ep = extra[i], at[i]
        concept = bool(row["shown"]) and has_concept(row["kind"]) and row["shown"] != NO_CLEAR_CONCEPT
        row.update(
            layer=layer,
            epoch=ep,
            baseline=bool(get.get("baseline")),
            concepts_changed=bool(get.get("concepts_changed")),
            concept_jaccard=_num(get.get("concept_jaccard")),
            combination=_pairs(get.get("combination"), "text", "score") if concept else [],
            alternatives=_pairs(get.get("alternatives"), "text", "score") if concept else [],
            ablation=_pairs(get.get("ablation"), "class", "drop"),
            crop=tables.crop(layer, row["unit"], ep) if crops else None,
        )
        entries[row["unit"]].append(row)
        if changed[i] or since[row["unit"]] is None:
            since[row["unit"]] = ep


def layer_charts(
    tables: HistoryTables, layer: str, top_concepts: int = 8, stable_rounds: int = DEFAULT_STABLE_ROUNDS
) -> dict[str, Any]:
    """Per explained epoch of ``layer``: units, fractions changed / gained / lost / dead, mean score, units stable for
    the last ``stable_rounds`` comparisons, and the concept distribution (how many units each of the
    ``top_concepts`` most held concepts holds; the rest as ``"other"``).

    ``fraction`` has one list per state (:data:`STATES`) and ``concepts_changed`` (the meaning or the concept set of
    a multi-concept combination changed). ``stable`` equals the drift summaries' ``n_stable``
    (:func:`~lightning_neurons.drift.metrics.summarize_layer_epochs`); ``combinations`` counts the units with a
    multi-concept combination.

    Returns:
        ``{"layer", "epochs": [...], "units": [...], "fraction": {state: [...]}, "mean_score": [...],
        "stable": [...], "stable_rounds", "combinations": [...], "concepts": {concept: [count per epoch]}}``.
    """  # noqa: D205
    per_epoch: list[tuple[int, int, Counter[str], dict[str, float | None], float | None, int, int]] = []
    totals: Counter[str] = Counter()
    run = np.zeros(0, dtype=np.int64)  # per unit: compared rounds since its last change (UnitStability.run)
    columns = (
        "layer",
        "unit",
        *_TEXT_COLUMNS,
        "score",
        "changed",
        "concepts_changed",
        "gained",
        "lost",
        "previous_epoch",
        "combination",
    )
    for ep in tables.epochs():
        table = tables.table(ep, columns, layer=layer)
        n = table.num_rows
        if not n:
            continue
        counts = np.bincount(_state_codes(table), minlength=len(STATES))
        states = dict(zip(STATES, counts.tolist()))
        # The concept distribution counts units that hold a concept (kind concept, or legacy records).
        texts = _shown_column(table)
        if "kind" in table.column_names:
            kind = table.column("kind")
            holds = pc.fill_null(pc.or_kleene(pc.is_null(kind), pc.equal(kind, "concept")), False)
            texts = pc.filter(texts, holds)
        texts = pc.filter(texts, pc.fill_null(pc.not_equal(texts, ""), False))
        held = Counter({v["values"]: v["counts"] for v in pc.value_counts(texts).to_pylist()})
        totals.update(held)
        scores = table.column("score").to_numpy(zero_copy_only=False).astype(float)
        mean = float(np.nanmean(scores)) if np.isfinite(scores).any() else None
        fractions: dict[str, float | None] = {s: states.get(s, 0) / n for s in STATES}
        if "concepts_changed" in table.column_names:  # the meaning or a multi-concept combination's concept set
            fractions["concepts_changed"] = pc.sum(pc.fill_null(table.column("concepts_changed"), False)).as_py() / n
        if states.get("new", 0) + states.get("dead", 0) == n:  # nothing compared yet (a first round): no drift
            fractions.update(changed=None, gained=None, lost=None, concepts_changed=None)
        units = np.asarray(table.column("unit").to_numpy(zero_copy_only=False), dtype=np.int64)
        if len(units) and units.max() >= len(run):
            run = np.concatenate([run, np.zeros(int(units.max()) + 1 - len(run), dtype=np.int64)])
        compared = (
            ~np.asarray(table.column("previous_epoch").is_null()) if "previous_epoch" in table.column_names else 0
        )
        now = run[units]
        run[units] = np.where(compared, np.where(_flag(table, "changed"), 0, now + 1), now)
        combos = 0
        if "combination" in table.column_names:
            combos = int(pc.sum(pc.is_valid(table.column("combination"))).as_py() or 0)
        per_epoch.append((ep, n, held, fractions, mean, int((run[units] >= stable_rounds).sum()), combos))
    top = [c for c, _ in totals.most_common(top_concepts)]
    concepts: dict[str, list[int]] = {c: [] for c in top}
    other: list[int] = []
    for p in per_epoch:
        held = p[2]
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
        "stable": [p[5] for p in per_epoch],
        "stable_rounds": stable_rounds,
        "combinations": [p[6] for p in per_epoch],
        "concepts": concepts,
    }


__all__ = ["STATES", "HistoryTables", "layer_charts", "layer_timelines", "layer_view", "search", "unit_timeline"]
