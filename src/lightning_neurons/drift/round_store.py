"""The history as a store of rounds: one Parquet file per round, made visible atomically, read by query.

A run's history is a folder (``history/`` in the run's output folder), on a local disk, a network file system or any
fsspec URL (``s3://...``, ``memory://...``). Each explanation round is one Parquet file (a row per unit, a column per
record field, :mod:`lightning_neurons.drift.columns`) named ``round-<seq>-e<epoch>-<round id>[-r].parquet``:

- ``seq`` orders the writes (the replay rules of :func:`effective_rounds` need the order), ``-r`` marks a revisit
  (an older checkpoint re-explained: it replaces its epoch only);
- the file is written under a hidden temporary name and renamed (``os.replace`` locally, ``mv`` on fsspec file
  systems, where a put is atomic per object): a reader lists either the whole round or nothing, never half of it,
  even when the writer crashes; readers may read while the run writes, and a file never changes once visible;
- the round's :class:`~lightning_neurons.results.RoundIdentity` and ``meta`` travel in the file's key-value metadata.

A lock (``history.lock`` beside the folder) keeps a second process from writing the same history; where the file
system has no working locks (a network file system, an object store) the store writes unguarded, and two writers
still never overwrite each other's rounds (each file name holds a fresh round id).

Example:
    >>> from lightning_neurons.drift.metrics import UnitDrift
    >>> from lightning_neurons.drift.records import HistoryRecord
    >>> from lightning_neurons.results import UnitExplanation
    >>> store = RoundStore("memory://doc/history")
    >>> unit = UnitExplanation("fc", 0, 2, "dots", 0.8)
    >>> _ = store.write_round([HistoryRecord(unit, UnitDrift("fc", 0, 2, "dots", 0.8))])
    >>> [(r.epoch, r.revisit) for r in store.effective()]
    [(2, False)]
    >>> store.read(store.effective()[0]).column("description").to_pylist()
    ['dots']
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from lightning_neurons.drift.columns import records_to_table, table_to_dicts
from lightning_neurons.drift.records import HistoryRecord
from lightning_neurons.drift.round_layout import META_LAYOUT, FileIndex, layout_metadata, write_options
from lightning_neurons.drift.store import ROUND_FILE, STORE_DIRNAME, HistoryWriteError, acquire_lock, release_lock

__all__ = ["STORE_DIRNAME", "RoundFile", "RoundStore", "effective_rounds", "is_round_store"]
_OPEN_READERS = 256
_META_IDENTITY = b"lightning_neurons.identity"
_META_ROUND = b"lightning_neurons.meta"


@dataclass(frozen=True, order=True)
class RoundFile:
    """One visible round file: write order, epoch, round id and whether it revisits an earlier epoch."""

    seq: int
    rid: str
    epoch: int
    revisit: bool
    name: str

    @classmethod
    def parse(cls, name: str) -> RoundFile | None:
        """The round a file name denotes (``None`` for other files, temporary ones included)."""
        m = ROUND_FILE.match(name)
        if m is None:
            return None
        return cls(int(m.group(1)), m.group(3), int(m.group(2)), bool(m.group(4)), name)


def effective_rounds(files: Sequence[RoundFile]) -> list[RoundFile]:
    """The rounds that make up the history, by epoch.

    Replayed in write order: a round replaces its epoch and drops the later ones (a run resumed from an earlier
    checkpoint), a revisit replaces its epoch only.

    Example:
        >>> f = [RoundFile(0, "a", 0, False, ""), RoundFile(1, "b", 1, False, ""), RoundFile(2, "c", 1, False, "")]
        >>> [r.rid for r in effective_rounds(f + [RoundFile(3, "d", 0, True, "")])]
        ['d', 'c']
        >>> [r.rid for r in effective_rounds(f + [RoundFile(3, "e", 0, False, "")])]
        ['e']
    """
    by_epoch: dict[int, RoundFile] = {}
    for f in sorted(files):
        if not f.revisit:
            for ep in [e for e in by_epoch if e > f.epoch]:
                del by_epoch[ep]
        by_epoch[f.epoch] = f
    return [by_epoch[ep] for ep in sorted(by_epoch)]


class RoundStore:
    """A run's history folder of round files (see the module docstring).

    Args:
        url: Local folder or fsspec URL of the store (created on the first write).
    """

    def __init__(self, url: str | Path) -> None:
        self.url = str(url)
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.local = isinstance(self.fs, LocalFileSystem)
        self._lock: Any = None
        self._next_seq: int | None = None
        # Open readers of visible round files (they never change), with where each file's layers and units are: a
        # query of one unit across 100 rounds then costs the decoding of 100 row groups, not 100 file opens, footer
        # parses and walks over row-group statistics.
        self._readers: OrderedDict[str, tuple[pq.ParquetFile, FileIndex]] = OrderedDict()
        self._guard = threading.Lock()
        #: Round files this object wrote, with their sizes (to notice files deleted or cut behind its back).
        self.written: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"RoundStore({self.url!r})"

    def __getstate__(self) -> dict[str, Any]:
        # A copy (pickled, deep-copied) opens its own readers and holds no writer's lock.
        return {**self.__dict__, "_readers": OrderedDict(), "_guard": None, "_lock": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._guard = threading.Lock()

    def _path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    # ------------------------------------------------------------------ reading
    def exists(self) -> bool:
        """Whether the folder holds at least one round."""
        return bool(self.files())

    def files(self) -> list[RoundFile]:
        """Every visible round file, in write order (temporary files of writes in progress are not listed)."""
        try:
            names = [p.rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)]
        except FileNotFoundError:
            return []
        return sorted(f for f in map(RoundFile.parse, names) if f is not None)

    def effective(self) -> list[RoundFile]:
        """The round files that make up the history, by epoch (:func:`effective_rounds`)."""
        return effective_rounds(self.files())

    def reader(self, f: RoundFile) -> pq.ParquetFile:
        """An open Parquet reader of the round file (kept for the :data:`_OPEN_READERS` latest files used)."""
        return self._open(f)[0]

    def index(self, f: RoundFile) -> FileIndex:
        """Where the file's layers and units are (:class:`~lightning_neurons.drift.round_layout.FileIndex`)."""
        return self._open(f)[1]

    def _open(self, f: RoundFile) -> tuple[pq.ParquetFile, FileIndex]:
        with self._guard:  # the Neurons tab queries one store from several request threads
            entry = self._readers.get(f.name)
            if entry is not None:
                self._readers.move_to_end(f.name)
                return entry
        path = self._path(f.name)
        reader = pq.ParquetFile(path if self.local else self.fs.open(path, "rb"))
        entry = (reader, FileIndex.of(reader))
        with self._guard:
            entry = self._readers.setdefault(f.name, entry)
            while len(self._readers) > _OPEN_READERS:  # a reader evicted while in use stays open until collected
                self._readers.popitem(last=False)
        return entry

    def metadata(self, f: RoundFile) -> pq.FileMetaData:
        """The file's Parquet footer (read once: a round file never changes once visible)."""
        return self.reader(f).metadata

    def read(
        self,
        f: RoundFile,
        columns: Sequence[str] | None = None,
        layer: str | None = None,
        unit: int | None = None,
    ) -> pa.Table:
        """The round's table: the rows of ``layer`` (and ``unit``) if given, with those of ``columns`` it has.

        Only the row groups that hold the layer's or unit's rows are decoded, found by the file's layer map (a
        unit's row is one row of one group), or in files written without one by the groups' statistics.
        """
        reader, index = self._open(f)
        unit = None if unit is None else int(unit)
        wanted = None if columns is None else [c for c in columns if c in index.names]
        selection = index.select(layer, unit)
        keys = [k for k, v in (("layer", layer), ("unit", unit)) if v is not None and k in index.names]
        read = wanted
        if selection.filter and wanted is not None:
            read = [*wanted, *(k for k in keys if k not in wanted)]
        if selection.groups == list(range(reader.metadata.num_row_groups)):
            table = reader.read(columns=read)
        else:
            # A group or two (a unit, a layer): decoded on this thread, handing each column to Arrow's pool costs more.
            table = reader.read_row_groups(selection.groups, columns=read, use_threads=len(selection.groups) > 2)
        if selection.slices is not None:
            parts = [table.slice(a, n) for a, n in selection.slices]
            table = parts[0] if len(parts) == 1 else pa.concat_tables(parts) if parts else table.slice(0, 0)
        if selection.filter:
            mask = None
            for key, value in (("layer", layer), ("unit", unit)):
                if key in keys:
                    same = pc.equal(table.column(key), value)
                    mask = same if mask is None else pc.and_(mask, same)
            table = table if mask is None else table.filter(mask)
        return table if wanted is None or read == wanted else table.select(wanted)

    def identity(self, f: RoundFile) -> dict[str, Any] | None:
        """The round's identity (``RoundIdentity.to_dict()``) as written, ``None`` where it had none."""
        raw = (self.metadata(f).metadata or {}).get(_META_IDENTITY)
        return None if raw is None else json.loads(raw)

    def meta(self, f: RoundFile) -> dict[str, Any]:
        """The round's ``meta`` as written (values that are not JSON are kept as text)."""
        raw = (self.metadata(f).metadata or {}).get(_META_ROUND)
        return {} if raw is None else json.loads(raw)

    def read_records(self, f: RoundFile) -> list[HistoryRecord]:
        """The round's records, in the order written."""
        return [HistoryRecord.from_dict(d) for d in table_to_dicts(self.read(f))]

    def size_bytes(self) -> int:
        """Bytes of every visible round file."""
        return sum(int(self.fs.size(self._path(f.name))) for f in self.files())

    # ------------------------------------------------------------------ writing
    def acquire(self) -> None:
        """Take the writer's lock (local folders only; elsewhere writes go unguarded, see the module docstring).

        Raises:
            HistoryLockedError: If another process writes this store.
        """
        if self._lock is None and self.local:
            self._lock = acquire_lock(Path(self.root))

    def close(self) -> None:
        """Release the writer's lock and close the open readers."""
        while self._readers:
            self._readers.popitem()[1][0].close()
        lock, self._lock = self._lock, None
        release_lock(lock)  # and remove its file: no stray history.lock in the run folder

    def write_round(
        self,
        records: Sequence[HistoryRecord],
        identity: Mapping[str, Any] | None = None,
        meta: Mapping[str, Any] | None = None,
        revisit: bool = False,
    ) -> tuple[int, str]:
        """Write one round (records of one epoch) as one file, visible all at once.

        Returns:
            ``(epoch, round id)``.

        Raises:
            ValueError: If the records are empty or of several epochs.
            HistoryWriteError: If the file could not be written (the disk is full, ...); nothing becomes visible.
        """
        if not records or len({r.key[2] for r in records}) != 1:
            raise ValueError("a round file holds the records of exactly one epoch")
        table = records_to_table(records)
        kv = {_META_ROUND: json.dumps(dict(meta or {}), default=str).encode()}
        if identity is not None:
            kv[_META_IDENTITY] = json.dumps(dict(identity), default=str).encode()
        return self.publish(table.replace_schema_metadata(kv), records[0].key[2], revisit)

    def publish(self, table: pa.Table, epoch: int, revisit: bool = False) -> tuple[int, str]:
        """Write a round's table (:func:`~lightning_neurons.drift.columns.records_to_table`) as the next round file.

        Returns:
            ``(epoch, round id)``.

        Raises:
            HistoryWriteError: If the file could not be written; nothing becomes visible.
        """
        self.acquire()
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), META_LAYOUT: layout_metadata(table)})
        rid = uuid.uuid4().hex[:16]
        if self._next_seq is None:
            self._next_seq = max((f.seq for f in self.files()), default=-1) + 1
        seq = self._next_seq
        final = self._path(f"round-{seq:06d}-e{epoch}-{rid}{'-r' if revisit else ''}.parquet")
        tmp = self._path(f".tmp-{rid}.parquet")
        try:
            self.fs.makedirs(self.root, exist_ok=True)
            if self.local:
                with open(tmp, "wb") as fh:
                    _write_parquet(table, fh)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, final)  # atomic: readers see the whole round or none of it
                _fsync_dir(self.root)
            else:
                with self.fs.open(tmp, "wb") as fh:
                    _write_parquet(table, fh)
                self.fs.mv(tmp, final)
        except OSError as err:
            try:
                self.fs.rm(tmp)
            except OSError:
                pass
            raise HistoryWriteError(
                err.errno or 5, f"{err.strerror or err} while writing a history round; nothing of it is visible", final
            ) from err
        self._next_seq = seq + 1
        self.written[final.rsplit("/", 1)[-1]] = int(self.fs.size(final))
        return epoch, rid

    def tampered(self) -> list[tuple[str, str]]:
        """Round files this object wrote that are gone or shorter now: ``(name, "deleted" | "truncated")``."""
        try:
            now = {p["name"].rsplit("/", 1)[-1]: int(p["size"]) for p in self.fs.ls(self.root, detail=True)}
        except FileNotFoundError:
            now = {}
        out = []
        for name, size in self.written.items():
            if name not in now:
                out.append((name, "deleted"))
            elif now[name] < size:
                out.append((name, "truncated"))
        return out

    def forget(self, names: list[str]) -> None:
        """Remove round files this object wrote (cut ones, before they are rewritten) and stop tracking them."""
        for name in names:
            self.written.pop(name, None)
            self._readers.pop(name, None)
            try:
                self.fs.rm(self._path(name))
            except FileNotFoundError:
                pass


def _write_parquet(table: pa.Table, fh: Any) -> None:
    # The layout that keeps both one-unit queries and whole-history reads cheap: drift.round_layout.
    pq.write_table(table, fh, **write_options(table.schema))


def _fsync_dir(path: str) -> None:
    # The rename is durable only once the directory entry is (ext4, xfs); some file systems cannot fsync a folder.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_round_store(url: str | Path) -> bool:
    """Whether ``url`` is a round store folder (it holds at least one round file).

    Example:
        >>> is_round_store("memory://nothing-here")
        False
    """
    return RoundStore(url).exists()
