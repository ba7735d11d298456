"""How a round file is laid out: its columns' encodings, its row groups, and a map of where each layer's rows are.

Two readers pull a round file in opposite directions: the Neurons tab reads one unit (or one layer) from each of
many rounds, ``history.to_pandas()`` reads every row of every round. Small row groups make the first cheap (one
group decoded per round) and the second dear (every column chunk of every group carries a fixed decoding cost), so
the layout keeps the fixed costs down instead:

- row groups of :data:`ROW_GROUP` rows;
- dictionaries only for the strings and the numbers with few distinct values in a round (a dictionary of random
  floats or sample ids is rebuilt per row group and costs more than it saves); units and top sample ids
  delta-encoded; zstd only on the columns it shrinks (texts, sample ids, similarities), none on random floats and
  flags, whose zstd frames cost more time than they save bytes;
- a **layer map** in the file's key-value metadata (:data:`META_LAYOUT`): per run of one layer's rows its first row,
  row count and first unit, and whether its units are consecutive. A reader finds a layer's rows, or one unit's
  row, by arithmetic on that map instead of walking the row groups' statistics (:class:`FileIndex`). Files written
  without the map (earlier versions) are searched by the statistics, once per file.

Measured on a synthetic 24,576-unit round on one core (full read / one group of the timeline's columns /
bytes per unit): zstd everywhere with 1,024-row groups 34.5 ms / 0.76 ms / 174 B; this layout 15.9 ms / 0.70 ms /
150 B at 2,048 rows (12.1 ms / 1.0 ms / 145 B at 4,096).

Example:
    >>> import pyarrow as pa
    >>> table = pa.table({"layer": ["a", "a", "b"], "unit": pa.array([0, 1, 5], pa.int32())})
    >>> layer_runs(table)
    [['a', 0, 2, 0, True], ['b', 2, 1, 5, True]]
    >>> index = FileIndex(num_rows=3, group_starts=[0, 2], runs=layer_runs(table), names={"layer", "unit"})
    >>> index.select("b", 5)
    Selection(groups=[1], slices=[(0, 1)], filter=False)
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

__all__ = ["META_LAYOUT", "ROW_GROUP", "FileIndex", "Selection", "layer_runs", "write_options"]

#: Rows per row group (see the module docstring for the trade-off).
ROW_GROUP = 2048

#: Key of the layer map in a round file's key-value metadata.
META_LAYOUT = b"lightning_neurons.layout"

# Numbers with few distinct values in a round: one dictionary page and run-length indexes.
_FEW_VALUES = frozenset(
    {"schema", "epoch", "previous_epoch", "threshold", "confidence_threshold", "jaccard", "concept_jaccard"}
)
# Integers that are ascending (units) or spread over a small range (sample ids): delta encoding, no dictionary.
_DELTA = frozenset({"unit", "top_sample_ids"})
# Plain numbers that zstd still shrinks (a similarity is 1.0 for every unit that kept its meaning; ids are small).
_COMPRESS_NUMBERS = frozenset({"similarity", "top_sample_ids"})
# The columns a query filters by: the only ones with statistics (a footer with many groups stays small).
_STATISTICS = ("layer", "unit", "epoch")


def _leaves(name: str, kind: pa.DataType) -> Iterator[tuple[str, pa.DataType]]:
    # The Parquet leaf columns of an Arrow field, by their dotted paths ("alternatives.list.element.text").
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        yield from _leaves(f"{name}.list.element", kind.value_type)
    elif pa.types.is_struct(kind):
        for child in kind:
            yield from _leaves(f"{name}.{child.name}", child.type)
    else:
        yield name, kind


def write_options(schema: pa.Schema) -> dict[str, Any]:
    """The keyword arguments of ``pyarrow.parquet.write_table`` for a round table of ``schema``.

    Example:
        >>> options = write_options(pa.schema([("unit", pa.int32()), ("description", pa.string())]))
        >>> options["column_encoding"], options["use_dictionary"], options["compression"]["description"]
        ({'unit': 'DELTA_BINARY_PACKED'}, ['description'], 'zstd')
    """
    dictionary: list[str] = []
    encoding: dict[str, str] = {}
    compression: dict[str, str] = {}
    for field in schema:
        for path, kind in _leaves(field.name, field.type):
            text = pa.types.is_string(kind) or pa.types.is_large_string(kind)
            if text or field.name in _FEW_VALUES:
                dictionary.append(path)
            elif field.name in _DELTA and pa.types.is_integer(kind):
                encoding[path] = "DELTA_BINARY_PACKED"
            known = pa.types.is_floating(kind) or pa.types.is_integer(kind) or pa.types.is_boolean(kind)
            squeeze = text or field.name in _COMPRESS_NUMBERS or not known
            compression[path] = "zstd" if squeeze else "none"
    return {
        "row_group_size": ROW_GROUP,
        "use_dictionary": dictionary,
        "column_encoding": encoding or None,
        "compression": compression,
        "write_statistics": [c for c in _STATISTICS if c in schema.names],
    }


def layer_runs(table: pa.Table) -> list[list[Any]]:
    """Runs of consecutive rows of one layer: ``[layer, first row, rows, first unit, units consecutive]``.

    A round is written layer by layer, units ascending, so a layer is usually one run whose units are consecutive
    (its unit ``u`` is row ``first row + u - first unit``); any other order still gives exact runs.
    """
    n = table.num_rows
    if not n or "layer" not in table.column_names or "unit" not in table.column_names:
        return []
    layers = pc.cast(table.column("layer"), pa.string()).combine_chunks()
    codes = np.asarray(pc.fill_null(layers.dictionary_encode().indices, -1))
    units = np.asarray(table.column("unit").fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    stops = np.r_[starts[1:], n]
    names = layers.to_pylist()
    runs = []
    for a, b in zip(starts.tolist(), stops.tolist()):
        dense = bool(np.array_equal(units[a:b], np.arange(units[a], units[a] + b - a)))
        runs.append([names[a], a, b - a, int(units[a]), dense])
    return runs


def layout_metadata(table: pa.Table) -> bytes:
    """The layer map of a round table as written into its file (:data:`META_LAYOUT`), with its row-group size."""
    return json.dumps({"group": ROW_GROUP, "runs": layer_runs(table)}, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Selection:
    """What to read of a file: its row groups, then these ``(offset, length)`` slices of them, or a filter."""

    groups: list[int]
    slices: list[tuple[int, int]] | None
    filter: bool


@dataclass
class FileIndex:
    """Where a round file's layers and units are (from its layer map, else its row-group statistics).

    Args:
        num_rows: Rows of the file.
        group_starts: First row of each row group.
        runs: The layer map (:func:`layer_runs`), ``None`` for a file written without one.
        names: The file's top-level columns.
        stats: Per row group ``(layer min, layer max, unit min, unit max)`` where it has statistics (files without a
            layer map only).
    """

    num_rows: int
    group_starts: Sequence[int]
    runs: list[list[Any]] | None
    names: set[str]
    stats: list[tuple[Any, Any, Any, Any]] | None = None

    @classmethod
    def of(cls, reader: pq.ParquetFile) -> FileIndex:
        """The index of an open file: its layer map, or (older files) its row-group statistics read once."""
        footer = reader.metadata
        names = set(reader.schema_arrow.names)
        raw = (footer.metadata or {}).get(META_LAYOUT)
        layout = None if raw is None else json.loads(raw)
        size = 0 if layout is None else int(layout.get("group", 0))
        if size and footer.num_row_groups == -(-footer.num_rows // size):  # groups of the size written: no walk
            starts: list[int] = list(range(0, footer.num_rows, size))
        else:
            sizes = [footer.row_group(g).num_rows for g in range(footer.num_row_groups)]
            starts = np.r_[0, np.cumsum(sizes)[:-1]].astype(int).tolist() if sizes else []
        if layout is not None:
            return cls(footer.num_rows, starts, layout["runs"], names)
        return cls(footer.num_rows, starts, None, names, _statistics(footer))

    def select(self, layer: str | None, unit: int | None) -> Selection:
        """The row groups and rows of ``layer`` (and ``unit``); every group when neither is given."""
        every = list(range(len(self.group_starts)))
        if layer is None and unit is None:
            return Selection(every, None, False)
        if self.runs is None:
            return Selection(self._by_statistics(layer, unit), None, True)
        ranges: list[tuple[int, int]] = []
        exact = True
        for name, start, count, first, dense in self.runs:
            if layer is not None and name != layer:
                continue
            if unit is None:
                ranges.append((start, start + count))
            elif dense:
                if 0 <= unit - first < count:
                    ranges.append((start + unit - first, start + unit - first + 1))
            else:  # units out of order: the run's rows, then a filter by unit
                ranges.append((start, start + count))
                exact = False
        return self._slices(ranges, exact)

    def _slices(self, ranges: list[tuple[int, int]], exact: bool) -> Selection:
        # Row ranges -> the groups holding them, and each range's position in the table those groups are read into.
        starts = np.asarray(self.group_starts)

        def group(row: int) -> int:
            return int(np.searchsorted(starts, row, side="right")) - 1

        groups = sorted({g for a, b in ranges for g in range(group(a), group(b - 1) + 1)})
        at, offset = {}, 0
        for g in groups:
            at[g] = offset
            offset += self._size(g)
        slices = [(at[group(a)] + a - int(starts[group(a)]), b - a) for a, b in ranges]
        return Selection(groups, slices, not exact)

    def _size(self, g: int) -> int:
        end = self.group_starts[g + 1] if g + 1 < len(self.group_starts) else self.num_rows
        return int(end - self.group_starts[g])

    def _by_statistics(self, layer: str | None, unit: int | None) -> list[int]:
        assert self.stats is not None
        keep = []
        for g, (lo, hi, ulo, uhi) in enumerate(self.stats):
            if layer is not None and lo is not None and not lo <= layer <= hi:
                continue
            if unit is not None and ulo is not None and not ulo <= unit <= uhi:
                continue
            keep.append(g)
        return keep


def _statistics(footer: pq.FileMetaData) -> list[tuple[Any, Any, Any, Any]]:
    # Per row group the min/max of layer and unit (None where a file has no statistics for them).
    leaves = {footer.schema.column(i).path: i for i in range(footer.num_columns)}
    out = []
    for g in range(footer.num_row_groups):
        rg = footer.row_group(g)
        bounds: list[Any] = []
        for name in ("layer", "unit"):
            stats = rg.column(leaves[name]).statistics if name in leaves else None
            ok = stats is not None and stats.has_min_max
            bounds += [stats.min, stats.max] if ok else [None, None]  # type: ignore[union-attr]
        out.append((bounds[0], bounds[1], bounds[2], bounds[3]))
    return out
