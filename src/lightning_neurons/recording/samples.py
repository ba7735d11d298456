"""Finding the model input in a batch, and fetching probe samples back by id.

Example:
    >>> import torch
    >>> batch_inputs((torch.zeros(2, 3, 8, 8), torch.tensor([0, 1]))).shape
    torch.Size([2, 3, 8, 8])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

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


@runtime_checkable
class SampleSource(Protocol):
    """Gives back probe samples by their ids (see docs/ARCHITECTURE.md, "Sample ids")."""

    def fetch(self, ids: Sequence[int]) -> tuple[Tensor, Tensor | None]:
        """Return ``inputs [n, ...]`` in the order of ``ids`` and their labels (or ``None``)."""
        ...
