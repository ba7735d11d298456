"""The explanation history of a run: per (layer, unit, epoch) what the unit meant and how that drifted.

This module gathers the public names of the three modules the history is made of:

- :mod:`lightning_neurons.drift.records`: the record model (:class:`HistoryRecord`, its flat form and schema);
- :mod:`lightning_neurons.drift.columns`: the records as Arrow columns;
- :mod:`lightning_neurons.drift.round_store`: the store of a run (one Parquet file per round, atomic, fsspec);
- :mod:`lightning_neurons.drift.store`: JSON Lines histories of earlier runs (files, locking, crash-safe rounds);
- :mod:`lightning_neurons.drift.run_history`: drift over the records (:class:`RunHistory`, :func:`load_history`).

Example:
    >>> from lightning_neurons.drift.history import RunHistory, load_history
    >>> len(RunHistory())
    0
"""

from lightning_neurons.drift.records import SCHEMA_VERSION, HistoryRecord, Key
from lightning_neurons.drift.round_store import RoundStore
from lightning_neurons.drift.run_history import RunHistory, _read_jsonl, load_history
from lightning_neurons.drift.store import (
    HISTORY_FILENAME,
    STORE_DIRNAME,
    HistoryLockedError,
    HistoryWriteError,
    _encode_rounds,
    _read_rounds,
    _write_all,
    find_history_file,
    resolve_history_path,
)

__all__ = [
    "HISTORY_FILENAME",
    "SCHEMA_VERSION",
    "HistoryLockedError",
    "HistoryRecord",
    "HistoryWriteError",
    "RoundStore",
    "STORE_DIRNAME",
    "Key",
    "RunHistory",
    "_encode_rounds",
    "_read_jsonl",
    "_read_rounds",
    "_write_all",
    "find_history_file",
    "load_history",
    "resolve_history_path",
]
