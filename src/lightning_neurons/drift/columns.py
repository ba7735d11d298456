"""The columnar form of history records: one Arrow table per round, a column per record field.

The columns are the flat record of :meth:`~lightning_neurons.drift.records.HistoryRecord.to_dict` (its schema is in
:mod:`lightning_neurons.drift.records`): strings that repeat (layer, description, kind, ...) are dictionary-encoded,
lists (alternatives, combination, ablation, top sample ids) are Arrow lists. Fields a newer record adds that this
table does not know yet (e.g. drift flags) become columns of their inferred type, so nothing a record holds is lost.

Example:
    >>> from lightning_neurons.drift.metrics import UnitDrift
    >>> from lightning_neurons.drift.records import HistoryRecord
    >>> from lightning_neurons.results import UnitExplanation
    >>> r = HistoryRecord(UnitExplanation("fc", 3, 0, "dots", 0.8), UnitDrift("fc", 3, 0, "dots", 0.8))
    >>> table = records_to_table([r])
    >>> table.num_rows, table.column("description").to_pylist()
    (1, ['dots'])
    >>> [HistoryRecord.from_dict(d) for d in table_to_dicts(table)] == [r]
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from operator import attrgetter
from typing import Any

import numpy as np
import pyarrow as pa

from lightning_neurons.drift.records import SCHEMA_VERSION, HistoryRecord, _gc_paused, _normalised

_TEXT_SCORE = pa.list_(pa.struct([("text", pa.string()), ("score", pa.float64())]))
_DICT = pa.dictionary(pa.int32(), pa.string())

#: Arrow type of every known record field (others are inferred).
COLUMN_TYPES: dict[str, pa.DataType] = {
    "schema": pa.int8(),
    "layer": _DICT,
    "unit": pa.int32(),
    "epoch": pa.int32(),
    "description": _DICT,
    "shown": _DICT,
    "score": pa.float64(),
    "margin": pa.float64(),
    "concept_score": pa.float64(),
    "confidence": pa.float64(),
    "kind": _DICT,
    "p_value": pa.float64(),
    "q_value": pa.float64(),
    "low_level": _DICT,
    "concept_gain": pa.float64(),
    "auc": pa.float64(),
    "source": _DICT,
    "alternatives": _TEXT_SCORE,
    "top_sample_ids": pa.list_(pa.int64()),
    "ablation": pa.list_(pa.struct([("class", pa.string()), ("drop", pa.float64())])),
    "combination": _TEXT_SCORE,
    "previous_epoch": pa.int32(),
    "previous_description": _DICT,
    "previous_shown": _DICT,
    "gained": pa.bool_(),
    "lost": pa.bool_(),
    "baseline": pa.bool_(),
    "settings": _DICT,
    "similarity": pa.float64(),
    "changed": pa.bool_(),
    "concepts_changed": pa.bool_(),
    "jaccard": pa.float64(),
    "score_delta": pa.float64(),
    "threshold": pa.float64(),
    "concept_jaccard": pa.float64(),
    "confidence_threshold": pa.float64(),
    "revisit": pa.bool_(),
}


def _floats(values: list[Any]) -> pa.Array:
    # NaN and infinities are stored as null, as to_dict writes them (JSON has neither).
    arr = np.array(values, dtype=np.float64)  # None -> NaN
    return pa.array(arr, mask=~np.isfinite(arr))


def _strings(values: list[Any]) -> pa.Array:
    return pa.array(values, pa.string()).dictionary_encode()


def _offsets(lists: list[Any]) -> pa.Array:
    lengths = np.fromiter((0 if x is None else len(x) for x in lists), dtype=np.int32, count=len(lists))
    offsets = np.zeros(len(lists) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.array(offsets)


def _list_column(lists: list[Any], first: str, second: str, get: Any) -> pa.Array:
    # list<struct<first: string, second: float64>>; an empty or missing list is null, as to_dict writes it.
    flat = list(chain.from_iterable(x for x in lists if x))
    pairs = list(map(get, flat))
    values = pa.StructArray.from_arrays(
        [pa.array([f for f, _ in pairs], pa.string()), _floats([s for _, s in pairs])], names=[first, second]
    )
    mask = pa.array([not items for items in lists])
    return pa.ListArray.from_arrays(_offsets([x or [] for x in lists]), values, mask=mask)


def _known_columns(records: Sequence[HistoryRecord]) -> dict[str, pa.Array]:
    # Column by column from the record objects: ~10x faster than building the to_dict() rows (a 98k-unit round).
    es = [r.explanation for r in records]
    ds = [r.drift for r in records]
    n = len(records)
    ids = [e.top_sample_ids for e in es]
    cols: dict[str, pa.Array] = {
        "schema": pa.array(np.full(n, SCHEMA_VERSION, dtype=np.int8)),
        "layer": _strings([d.layer for d in ds]),
        "unit": pa.array([d.unit for d in ds], pa.int32()),
        "epoch": pa.array([d.epoch for d in ds], pa.int32()),
        "description": _strings([e.description for e in es]),
        "shown": _strings([None if e.kind is None else e.shown for e in es]),
    }
    for name in ("score", "margin", "concept_score", "confidence", "p_value", "q_value", "concept_gain", "auc"):
        cols[name] = _floats(list(map(attrgetter(name), es)))
    for name in ("kind", "low_level", "source"):
        cols[name] = _strings(list(map(attrgetter(name), es)))
    text_score = attrgetter("text", "score")
    cols["alternatives"] = _list_column([e.alternatives for e in es], "text", "score", text_score)
    cols["top_sample_ids"] = pa.ListArray.from_arrays(
        _offsets(ids), pa.array(np.fromiter(chain.from_iterable(ids), dtype=np.int64))
    )
    cols["ablation"] = _list_column([e.ablation for e in es], "class", "drop", tuple)
    # Combination weights normalised to sum to 1, as to_dict writes them (and every view shows them).
    combos = [None if not e.combination else [(a.text, w) for a, w in _normalised(e.combination)] for e in es]
    cols["combination"] = _list_column(combos, "text", "score", tuple)
    cols["previous_epoch"] = pa.array([d.previous_epoch for d in ds], pa.int32())
    cols["previous_description"] = _strings([d.previous_description for d in ds])
    # What was shown at the previous epoch, where it was not the description (as to_dict writes it).
    cols["previous_shown"] = _strings(
        [None if d.previous_shown == d.previous_description else d.previous_shown for d in ds]
    )
    for name in ("gained", "lost", "baseline"):
        cols[name] = pa.array([bool(getattr(d, name)) for d in ds], pa.bool_())
    cols["settings"] = _strings([r.settings or None for r in records])
    cols["changed"] = pa.array([bool(d.changed) for d in ds], pa.bool_())
    cols["concepts_changed"] = pa.array([d.concepts_changed for d in ds], pa.bool_())
    for name in ("similarity", "jaccard", "score_delta", "threshold", "concept_jaccard"):
        cols[name] = _floats(list(map(attrgetter(name), ds)))
    cols["confidence_threshold"] = _floats([r.confidence_threshold for r in records])
    cols["revisit"] = pa.array([bool(r.revisit) for r in records], pa.bool_())
    return cols


def records_to_table(records: Sequence[HistoryRecord]) -> pa.Table:
    """One row per record, a column per field of :meth:`HistoryRecord.to_dict` (absent fields are null).

    Fields that :data:`COLUMN_TYPES` does not know (added to the record format later, e.g. drift flags) are read
    from the record's drift or explanation by name and get the inferred type.
    """
    with _gc_paused():  # millions of small objects in flight, none in a cycle: rescanning them cost ~half the time
        cols = _known_columns(records)
    if records:
        for name in records[0].to_dict().keys() - cols.keys():
            values = [getattr(r.drift, name, getattr(r.explanation, name, None)) for r in records]
            cols[name] = pa.array(values)
    return pa.table(cols)


def concat_rounds(tables: Sequence[pa.Table]) -> pa.Table:
    """The tables of several rounds as one: columns missing from a round are null, and a column whose type differs
    between rounds (a field's inferred type, a record format that changed) takes the type of the latest round.

    Example:
        >>> old = pa.table({"unit": pa.array([0], pa.int32()), "description": ["dots"]})
        >>> new = pa.table({"unit": pa.array([1], pa.int32()), "description": _strings(["stripes"]), "kind": ["x"]})
        >>> both = concat_rounds([old, new])
        >>> both.schema.field("description").type == _DICT, both.column("kind").to_pylist()
        (True, [None, 'x'])
    """  # noqa: D205
    if len(tables) == 1:
        return tables[0]
    if all(t.schema.equals(tables[0].schema) for t in tables[1:]):  # the usual case: nothing to reconcile
        return pa.concat_tables(tables)
    newest: dict[str, pa.DataType] = {}
    for table in tables:
        newest.update((f.name, f.type) for f in table.schema)
    same = []
    for table in tables:
        for i, f in enumerate(table.schema):
            if f.type != newest[f.name] and not pa.types.is_null(f.type):
                table = table.set_column(i, f.name, table.column(i).cast(newest[f.name]))
        same.append(table)
    return pa.concat_tables(same, promote_options="permissive")


def table_to_dicts(table: pa.Table) -> list[dict[str, Any]]:
    """The flat records of a table, as :meth:`HistoryRecord.from_dict` reads them (null fields left out)."""
    return [{k: v for k, v in row.items() if v is not None} for row in table.to_pylist()]
