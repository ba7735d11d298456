"""The history's store: a JSON Lines file per run, written one crash-safe round at a time and read back by rounds.

Crash safety: a round (or the records :meth:`RunHistory.attach` brings in line) is written with one ``write``,
flushed to disk with ``fsync``; a round counts only once all its ``round_size`` records with its ``round_id`` were
read, so an interrupted or failed write (a crash, a full disk) leaves no partial epoch behind: readers skip it, and
every line that is not valid UTF-8 JSON, with one warning that names the file and the lines. A writer first ends a
cut last line with a newline, and holds a lock (``history.jsonl.lock``, released when the process ends) so that a
second process writing the same file fails at once with :class:`HistoryLockedError`. Records of older files (no
``round_id``) count one by one, as they did.

The record format is :mod:`lightning_neurons.drift.records`; what the rounds mean (replay, drift) is
:class:`~lightning_neurons.drift.run_history.RunHistory`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import uuid
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

from lightning_neurons.drift.records import SCHEMA_VERSION, HistoryRecord, _epoch_runs

#: File name of the JSON Lines history inside a run's log directory (earlier runs; an export on request).
HISTORY_FILENAME = "history.jsonl"

#: Folder of the round store (one Parquet file per round) inside a run's output folder.
STORE_DIRNAME = "history"

#: Names of visible round files in the store: ``round-<seq>-e<epoch>-<round id>[-r].parquet``.
ROUND_FILE = re.compile(r"^round-(\d+)-e(-?\d+)-([0-9a-f]+)(-r)?\.parquet$")


class HistoryLockedError(RuntimeError):
    """Another process is writing the same history file (two runs must not share one history)."""


class HistoryWriteError(OSError):
    """A round could not be written (e.g. the disk is full); the file keeps every round before it."""


def acquire_lock(path: Path) -> FileLock | None:
    """Take the writer's lock of the history file ``path``; ``None`` where the file system has no locks.

    Raises:
        HistoryLockedError: If another process holds it.
    """
    # One writing process per file. The lock is an flock: the kernel drops it when the process dies, so a run
    # killed mid-write can be resumed at once. Within one process the lock is shared (a resumed history may
    # re-attach the file its predecessor object wrote).
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + ".lock")
    lock = FileLock(lock_path, timeout=0, is_singleton=True, thread_local=False, fallback_to_soft=False)
    try:
        lock.acquire()
    except Timeout:
        raise HistoryLockedError(
            f"{path} is being written by another process (it holds {lock_path}); give this run its own "
            "output folder, or wait for the other run to end"
        ) from None
    except (NotImplementedError, OSError) as err:  # a file system without locks: write unguarded
        warnings.warn(f"cannot lock {lock_path} ({err}); concurrent writers will not be detected", stacklevel=4)
        return None
    return lock


def release_lock(lock: FileLock | None) -> None:
    """Release the writer's lock of :func:`acquire_lock` and remove its file.

    No stray ``history.jsonl.lock`` stays in the run folder, nor in what W&B uploads from it.
    """
    if lock is None or not lock.is_locked:
        return
    lock.release()
    if not lock.is_locked:  # released by this process (the lock is shared within one)
        with contextlib.suppress(OSError):
            Path(lock.lock_file).unlink()


def append_rounds(path: Path, records: Iterable[HistoryRecord]) -> list[tuple[int, str]]:
    """Append the records, one round per run of one epoch, with one write and ``fsync``.

    Readers see each round complete (all its ``round_size`` records) or not at all.

    Returns:
        ``(epoch, round id)`` of every round written.

    Raises:
        HistoryWriteError: If the write failed; the partial round is taken back.
    """
    encoded = _encode_rounds_with_ids(records)
    if not encoded:
        return []
    data = b"".join(chunk for _, _, chunk in encoded)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
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
                str(path),
            ) from err
    finally:
        os.close(fd)
    return [(ep, rid) for ep, rid, _ in encoded]


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


def _is_round_folder(path: Path) -> bool:
    return path.is_dir() and any(ROUND_FILE.match(p.name) for p in path.iterdir())


def _history_in(folder: Path) -> Path | None:
    # A run's output folder holds the round store (history/) or, from earlier runs, history.jsonl.
    if _is_round_folder(folder / STORE_DIRNAME):
        return folder / STORE_DIRNAME
    if (folder / HISTORY_FILENAME).is_file():
        return folder / HISTORY_FILENAME
    return None


def find_history_file(path_or_run_dir: str | Path) -> Path | str:
    """The history of a run directory (searched recursively when not at its top), or the path itself.

    The history is the run's round store (the folder ``history/`` of Parquet rounds) or, for earlier runs, its
    ``history.jsonl``; a history file (``.jsonl``, ``.json``) or a store folder is returned as it is, and so is an
    fsspec URL (``s3://...``, ``memory://...``) of a store or of the folder that holds one.

    Raises:
        FileNotFoundError: If there is none.
        ValueError: If a directory holds several (e.g. several ``version_*`` runs): pass one of them.
    """
    text = str(path_or_run_dir)
    if "://" in text and not text.startswith("file://"):
        import fsspec

        for url in (text, f"{text.rstrip('/')}/{STORE_DIRNAME}"):
            fs, root = fsspec.core.url_to_fs(url)
            try:
                names = [p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
            except FileNotFoundError:
                continue
            if any(ROUND_FILE.match(n) for n in names):
                return url
        raise FileNotFoundError(f"{text} holds no history rounds")
    path = Path(text.removeprefix("file://"))
    if path.is_file() or _is_round_folder(path):
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither a history file nor a run directory")
    here = _history_in(path)
    if here is not None:
        return here
    folders = sorted({p.parent for p in [*path.rglob(HISTORY_FILENAME), *path.rglob(STORE_DIRNAME)]})
    found = [h for h in map(_history_in, folders) if h is not None]
    if not found:
        raise FileNotFoundError(
            f"no run history ({STORE_DIRNAME}/ or {HISTORY_FILENAME}) under {path}: was the run logged with "
            "NeuronExplainer?"
        )
    if len(found) > 1:
        listing = ", ".join(str(p.parent) for p in found)
        raise ValueError(f"{path} holds {len(found)} run histories; pass one of: {listing}")
    return found[0]


#: Alias of :func:`find_history_file` (used by the CLI).
resolve_history_path = find_history_file
