"""A run's history as one Arrow table per explained epoch: what every view of :mod:`.queries` reads.

The tables come from the run's round store (a query reads only the rows and columns it shows, see
:meth:`~lightning_neurons.drift.round_store.RoundStore.read`) or, for a history in memory (a JSON Lines history of an
earlier run), from its records, converted once per epoch.

Example:
    >>> import torch
    >>> from lightning_neurons.drift.history import RunHistory
    >>> from lightning_neurons.results import ExplanationRound, UnitExplanation
    >>> history = RunHistory()
    >>> _ = history.add_round(ExplanationRound(0, [UnitExplanation("fc", 0, 0, "dots", 0.8)]), lambda t: torch.eye(2))
    >>> tables = HistoryTables.of(history)
    >>> tables.epochs(), tables.layers(), tables.table(0, ["unit", "description"]).to_pylist()
    ([0], ['fc'], [{'unit': 0, 'description': 'dots'}])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from lightning_neurons.drift.columns import records_to_table
from lightning_neurons.drift.round_store import RoundFile, RoundStore
from lightning_neurons.drift.run_history import RunHistory, load_history
from lightning_neurons.drift.store import find_history_file

__all__ = ["HistoryTables"]


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
        ep = epochs[-1] if epoch is None else epoch
        f = self._files(refresh=False).get(ep) if self.store is not None else None
        if f is not None and self.store is not None:
            runs = self.store.index(f).runs  # the file's layer map: no column decoded
            if runs is not None:
                return list(dict.fromkeys(str(run[0]) for run in runs))
        table = self.table(ep, ["layer"])
        if not table.num_rows:
            return []
        return [str(x) for x in dict.fromkeys(table.column("layer").to_pylist())]

    def all_layers(self) -> list[str]:
        """Layers explained at any epoch, in the order first seen (epoch by epoch, each in round order)."""
        return list(dict.fromkeys(layer for ep in self.epochs() for layer in self.layers(ep)))

    def crop(self, layer: str, unit: int, epoch: int) -> str | None:
        """The unit's crop file at ``epoch``, relative to the run's output folder (``None`` where there is none)."""
        if self.previews_dir is None:
            return None
        from lightning_neurons.logging.previews import preview_path

        path = preview_path(self.previews_dir, layer, unit, epoch)
        return path.relative_to(self.previews_dir.parent).as_posix() if path.is_file() else None
