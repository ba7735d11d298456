"""Finding the model input in a batch, and fetching probe samples back by id.

Example:
    >>> import torch
    >>> batch_inputs((torch.zeros(2, 3, 8, 8), torch.tensor([0, 1]))).shape
    torch.Size([2, 3, 8, 8])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, RandomSampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

InputKey = int | str | None

_INPUT_KEYS = ("image", "images", "pixel_values", "input", "inputs", "x", "img")
_TARGET_KEYS = ("label", "labels", "target", "targets", "y", "class")


def batch_inputs(batch: Any, input_key: InputKey = None) -> Tensor:
    """The image tensor of a batch.

    Args:
        batch: A tensor, a tuple/list (inputs first by default) or a dict.
        input_key: Index or key of the inputs; ``None`` guesses (first item, or a usual dict key).

    Raises:
        TypeError: If no tensor input can be found; the message says to set ``input_key``.
    """
    found = _pick(batch, input_key, 0, _INPUT_KEYS)
    if not isinstance(found, Tensor):
        raise TypeError(
            f"cannot find the image tensor in a batch of type {type(batch).__name__}; "
            "set input_key to its index or dict key"
        )
    return found


def batch_targets(batch: Any, target_key: InputKey = None) -> Tensor | None:
    """The class-label tensor of a batch, or ``None`` when there is none."""
    if isinstance(batch, Tensor):
        return None
    found = _pick(batch, target_key, 1, _TARGET_KEYS)
    return found if isinstance(found, Tensor) else None


def _pick(batch: Any, key: InputKey, default_index: int, names: Sequence[str]) -> Any:
    if isinstance(batch, Tensor):
        return batch if default_index == 0 and key is None else None
    if isinstance(batch, dict):
        if key is not None:
            return batch.get(key)  # type: ignore[call-overload]
        return next((batch[k] for k in names if k in batch), None)
    if isinstance(batch, (tuple, list)):
        index = default_index if key is None else key
        if isinstance(index, int) and -len(batch) <= index < len(batch):
            return batch[index]
    return None


def stream_order(dataloader: DataLoader) -> list[int] | None:
    """The dataset index of each streamed position of a map-style loader (``None``: position = dataset index).

    A plain sequential loader (or a non-shuffling ``DistributedSampler``, whose global ids are dataset indices)
    needs no table. A custom ``sampler=`` or ``batch_sampler=`` is read the way the loader reads it: position ``i``
    is the ``i``-th index its batches yield (``drop_last`` included).

    Raises:
        ValueError: If the loader shuffles, or its (batch) sampler gives another order on a second pass.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> data = TensorDataset(torch.arange(6.0))
        >>> stream_order(DataLoader(data, batch_sampler=[[5, 4], [1, 0]]))
        [5, 4, 1, 0]
        >>> stream_order(DataLoader(data, batch_size=4)) is None
        True
    """
    batch_sampler = getattr(dataloader, "batch_sampler", None)
    sampler = batch_sampler.sampler if isinstance(batch_sampler, BatchSampler) else dataloader.sampler
    if isinstance(sampler, RandomSampler) or (isinstance(sampler, DistributedSampler) and sampler.shuffle):
        raise ValueError(
            "the probe dataloader shuffles its samples, so recorded sample ids cannot be mapped back to "
            "the data; use shuffle=False for the validation dataloader"
        )
    custom_batches = batch_sampler is not None and not isinstance(batch_sampler, BatchSampler)
    if not custom_batches and isinstance(sampler, (SequentialSampler, DistributedSampler)):
        return None
    if batch_sampler is not None:
        def read() -> list[int]:
            return [int(i) for batch in batch_sampler for i in batch]
    else:  # batch_size=None: the sampler yields one index per item
        def read() -> list[int]:
            return [int(i) for i in sampler]
    order = read()
    if read() != order:
        raise ValueError(
            f"the probe dataloader's {'batch_sampler' if custom_batches else 'sampler'} "
            f"({type(batch_sampler if custom_batches else sampler).__name__}) gives another order on each pass, so "
            "recorded sample ids cannot be mapped back to the data; use a deterministic order for validation"
        )
    return order


@runtime_checkable
class SampleSource(Protocol):
    """Gives back probe samples by their ids (see docs/ARCHITECTURE.md, "Sample ids")."""

    def fetch(self, ids: Sequence[int]) -> tuple[Tensor, Tensor | None]:
        """Return ``inputs [n, ...]`` in the order of ``ids`` and their labels (or ``None``)."""
        ...


class DataLoaderSampleSource:
    """Fetches probe samples back from the validation dataloader they were recorded from.

    A sample id is the sample's position in the (non-shuffled) validation stream. Map-style datasets with a
    sequential sampler (or a ``DistributedSampler`` with ``shuffle=False``, whose global ids equal dataset indices)
    are indexed directly; another deterministic ``sampler=`` or ``batch_sampler=`` maps id ``i`` to the dataset
    index it streamed ``i``-th (:func:`stream_order`). Items are collated
    with the loader's ``collate_fn``. Iterable datasets are re-iterated through the loader and only the wanted
    positions are kept (memory bounded by the wanted set; iteration stops once all are found).

    Args:
        dataloader: The probe dataloader (batch-wise, as used for recording).
        input_key: Index/key of the inputs in a batch (``None``: guess).
        target_key: Index/key of integer labels in a batch (``None``: guess).

    Raises:
        ValueError: If the loader shuffles (a ``RandomSampler``, a shuffling ``DistributedSampler``, or a sampler or
            batch sampler whose order differs between two passes): the ids would not point at the recorded samples.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> data = TensorDataset(torch.arange(10.0)[:, None], torch.arange(10))
        >>> inputs, labels = DataLoaderSampleSource(DataLoader(data, batch_size=4)).fetch([7, 2])
        >>> inputs[:, 0].tolist(), labels.tolist()
        ([7.0, 2.0], [7, 2])
    """

    def __init__(self, dataloader: DataLoader, input_key: InputKey = None, target_key: InputKey = None) -> None:
        self.dataloader = dataloader
        self.input_key = input_key
        self.target_key = target_key
        self._iterable = isinstance(dataloader.dataset, IterableDataset)
        self._order: list[int] | None = None
        if not self._iterable:
            self._order = stream_order(dataloader)

    @property
    def size(self) -> int | None:
        """Number of probe samples (ids are ``0 .. size - 1``); ``None`` for an iterable dataset (unknown)."""
        if self._iterable:
            return None
        return len(self._order) if self._order is not None else len(self.dataloader.dataset)  # type: ignore[arg-type]

    def fetch(self, ids: Sequence[int]) -> tuple[Tensor, Tensor | None]:
        """Return ``inputs [n, ...]`` in the order of ``ids`` and their labels (``None`` if the batches have none).

        Raises:
            IndexError: If an id is beyond the probe set.
        """
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("fetch() needs at least one sample id")
        size = self.size
        if size is None:
            return self._fetch_iterable(ids)
        bad = [i for i in ids if not 0 <= i < size]
        if bad:
            raise IndexError(f"sample ids {bad[:5]} are outside the probe set of {size} samples")
        indices = [self._order[i] for i in ids] if self._order is not None else ids
        dataset = self.dataloader.dataset
        # The loader's own collate_fn whenever it collates batches (batch_size or batch_sampler).
        collate = self.dataloader.collate_fn if getattr(self.dataloader, "batch_sampler", None) is not None else None
        batch = (collate or torch.utils.data.default_collate)([dataset[i] for i in indices])
        return batch_inputs(batch, self.input_key), batch_targets(batch, self.target_key)

    def _fetch_iterable(self, ids: list[int]) -> tuple[Tensor, Tensor | None]:
        wanted = set(ids)
        found_inputs: dict[int, Tensor] = {}
        found_labels: dict[int, Tensor] = {}
        position = 0
        for batch in self.dataloader:
            inputs = batch_inputs(batch, self.input_key)
            labels = batch_targets(batch, self.target_key)
            n = inputs.shape[0]
            for row in range(n):
                if position + row in wanted:
                    found_inputs[position + row] = inputs[row].clone()
                    if labels is not None:
                        found_labels[position + row] = labels[row].clone()
            position += n
            if len(found_inputs) == len(wanted):
                break
        missing = sorted(wanted - found_inputs.keys())
        if missing:
            raise IndexError(f"sample ids {missing[:5]} are beyond the {position} samples of the iterable dataset")
        inputs = torch.stack([found_inputs[i] for i in ids])
        labels = torch.stack([found_labels[i] for i in ids]) if len(found_labels) == len(wanted) else None
        return inputs, labels
