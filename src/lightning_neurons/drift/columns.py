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
from typing import Any

import pyarrow as pa

from lightning_neurons.drift.records import HistoryRecord

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

# Columns that are written even when every value is null, so that every round file has them (queries select them).
_ALWAYS = ("layer", "unit", "epoch", "description", "shown", "score", "kind", "p_value", "q_value", "changed")


def records_to_table(records: Sequence[HistoryRecord]) -> pa.Table:
    """One row per record, a column per field of :meth:`HistoryRecord.to_dict` (absent fields are null)."""
    dicts = [r.to_dict() for r in records]
    names: dict[str, None] = dict.fromkeys(_ALWAYS)
    for d in dicts[:1]:
        names.update(dict.fromkeys(d))
    for d in dicts:  # optional fields appear on some records only
        if len(d) != len(names) or not names.keys() >= d.keys():
            names.update(dict.fromkeys(d))
    arrays, fields = [], []
    for name in names:
        values = [d.get(name) for d in dicts]
        kind = COLUMN_TYPES.get(name)
        if kind is not None and pa.types.is_dictionary(kind):
            array: pa.Array = pa.array(values, pa.string()).dictionary_encode()
        else:
            array = pa.array(values, kind)
        arrays.append(array)
        fields.append(pa.field(name, array.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def table_to_dicts(table: pa.Table) -> list[dict[str, Any]]:
    """The flat records of a table, as :meth:`HistoryRecord.from_dict` reads them (null fields left out)."""
    return [{k: v for k, v in row.items() if v is not None} for row in table.to_pylist()]
