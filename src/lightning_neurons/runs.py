"""Which run a callback's state belongs to, and which epoch trained the weights a validation pass sees.

A :class:`~lightning_neurons.NeuronExplainer` object can outlive its Trainer (a notebook sweep, a retry after a
crash). Its history, last recording and explained epochs belong to the run of the Trainer that made them; a second
Trainer starts a new run (a new run id, its own folder, its own epoch 0) unless it resumes a checkpoint, whose state
then brings the old run back.

Example:
    >>> binding = RunBinding()
    >>> class Trainer: ...
    >>> first, second = Trainer(), Trainer()
    >>> binding.is_new(first), binding.is_new(first), binding.is_new(second)
    (False, False, True)
"""

from __future__ import annotations

import weakref
from typing import Any

from lightning_neurons.identity import new_run_id


class RunBinding:
    """The run id of a callback's state and the Trainer that state was made in (held weakly)."""

    def __init__(self) -> None:
        self.run_id = new_run_id()
        self._trainer: weakref.ref[Any] | None = None

    def is_new(self, trainer: Any) -> bool:
        """Bind to ``trainer``; ``True`` when the state was made in another Trainer (a new run starts)."""
        previous = self._trainer() if self._trainer is not None else None
        bound_before = self._trainer is not None
        self._trainer = weakref.ref(trainer)
        return bound_before and previous is not trainer

    def __getstate__(self) -> dict[str, Any]:
        return {"run_id": self.run_id}  # a Trainer reference is neither picklable nor meaningful elsewhere

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.run_id = state["run_id"]
        self._trainer = None


def weights_epoch(trainer: Any) -> int:
    """The epoch that last trained the model's weights, for a ``trainer.validate`` without ``ckpt_path``.

    After ``fit`` Lightning's ``current_epoch`` already counts the last epoch as done (``max_epochs``), but the
    weights are those of the last started epoch (the one a checkpoint saved at its end is named after). Before any
    training step it is 0.
    """
    if int(getattr(trainer, "global_step", 0)) == 0:
        return 0
    try:
        started = int(trainer.fit_loop.epoch_progress.current.started)
    except AttributeError:
        return max(int(trainer.current_epoch) - 1, 0)
    return max(started - 1, 0)


__all__ = ["RunBinding", "weights_epoch"]
