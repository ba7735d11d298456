"""Explaining a round in a background thread while training goes on (``NeuronExplainer(async_explain=True)``).

At the end of a scheduled validation pass the callback hands a :class:`RoundJob` to a :class:`BackgroundExplainer`:
the synced recording, a frozen copy of the model (:func:`frozen_copy`: same weights, eval mode, no gradients, no
recording hooks, no trainer) and the probe source, with the round's key, step and global step captured at hand-off
(never read from the trainer later). One worker thread explains it with
:meth:`~lightning_neurons.session.ExplanationSession.explain_round`, which touches neither the history nor the
writers; the finished round waits in :meth:`BackgroundExplainer.collect` until the main thread files it at its next
hook, so loggers, the history and ``trainer.callback_metrics`` are only ever touched on the main thread. At most
one round is in flight. On CUDA the worker runs on its own stream, ordered after the hand-off's copy. The worker
never runs a collective (the callback keeps DDP runs synchronous).

Example:
    >>> import torch
    >>> from torch import nn
    >>> worker = BackgroundExplainer(lambda job: job.key * 10)
    >>> job = RoundJob(key=3, step=3, global_step=120, keep_later=False, recording=None, model=nn.Linear(2, 2),
    ...                source=None)
    >>> worker.submit(job)
    >>> worker.wait()
    True
    >>> [(f.job.key, f.result, f.error) for f in worker.collect()]
    [(3, 30, None)]
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_neurons.recording.hooks import TAP_MARK, model_device

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


@dataclass
class RoundJob:
    """What the worker needs to explain one round, captured at hand-off.

    Args:
        key: The key the round is filed under (epoch, or global step under step-based validation).
        step: The step the loggers file it under.
        global_step: The trainer's global step at hand-off (W&B, CSV).
        keep_later: Replace an earlier epoch and keep the later ones (``trainer.validate(ckpt_path=...)``).
        recording: The synced recording.
        model: The frozen copy of the model (dropped once the round is explained).
        source: Gives the probe samples back by id (safe to call from the worker).
        previous_key: The last explained key before this round (what a checkpoint taken meanwhile stores).
        previous_step: The global step of that round's weights.
        stream: The CUDA stream the worker runs on (``None`` off CUDA).
    """

    key: int
    step: int
    global_step: int | None
    keep_later: bool
    recording: Any
    model: nn.Module | None
    source: Any
    previous_key: int | None = None
    previous_step: int | None = None
    stream: Any = None
    submitted: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class FinishedRound:
    """A job's outcome: its result (an ``ExplanationRound``) or the exception that stopped it."""

    job: RoundJob
    result: Any = None
    error: BaseException | None = None


class BackgroundExplainer:
    """One worker thread at a time that explains :class:`RoundJob` s; results wait for :meth:`collect`.

    Args:
        explain: ``explain(job) -> round``; runs in the worker thread under ``torch.no_grad()`` (and on
            ``job.stream`` on CUDA).
    """

    def __init__(self, explain: Callable[[RoundJob], Any]) -> None:
        self._explain = explain
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._done: list[FinishedRound] = []
        self._abandoned = False
        #: The job handed off and not yet collected (in flight, or finished and waiting for the main thread).
        self.outstanding: RoundJob | None = None

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn and deepcopy pickle the callbacks before training: a thread or a lock cannot travel, and a round in
        # flight belongs to this process only.
        state = self.__dict__.copy()
        state.update(_thread=None, _lock=None, _done=[], _abandoned=False, outstanding=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def busy(self) -> bool:
        """Whether a round is being explained now."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: RoundJob) -> None:
        """Start explaining ``job`` in a new worker thread.

        Raises:
            RuntimeError: If a round is still in flight (wait for it or skip the new one first).
        """
        if self.busy:
            raise RuntimeError("a round is still being explained in the background")
        self._abandoned = False
        self.outstanding = job
        self._thread = threading.Thread(
            target=self._run, args=(job,), name=f"lightning-neurons-round-{job.key}", daemon=True
        )
        self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the round in flight is explained; ``False`` if ``timeout`` seconds passed first.

        After :meth:`abandon` this does not wait (the dropped round's result is never needed).
        """
        thread = self._thread
        if self._abandoned:
            return not self.busy
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

    def collect(self) -> list[FinishedRound]:
        """The finished rounds not collected yet, oldest first (call on the main thread)."""
        with self._lock:
            done, self._done = self._done, []
        if any(finished.job is self.outstanding for finished in done):
            self.outstanding = None
        return done

    def abandon(self) -> None:
        """Drop the round in flight (after a crash): it finishes in its thread, its result is discarded."""
        self._abandoned = True
        self.outstanding = None
        with self._lock:
            self._done = []

    def _run(self, job: RoundJob) -> None:
        started = time.perf_counter()
        outcome: FinishedRound
        try:
            with torch.no_grad(), _on_stream(job.stream):
                result = self._explain(job)
                if job.stream is not None:
                    job.stream.synchronize()
            meta = getattr(result, "meta", None)
            if isinstance(meta, dict):
                meta["background"] = {
                    "queued_s": round(started - job.submitted, 3),
                    "worker_s": round(time.perf_counter() - started, 3),
                }
            outcome = FinishedRound(job, result=result)
        except BaseException as err:  # noqa: BLE001 - handed to the main thread, which applies on_error
            outcome = FinishedRound(job, error=err)
        finally:
            job.model = None  # the frozen copy is not needed any more
        with self._lock:
            if not self._abandoned:
                self._done.append(outcome)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for the worker: same weights, eval mode, no gradients, no trainer, no recording hooks.

    The hooks of :mod:`lightning_neurons.recording.hooks` (this or another explainer's recording) are left out;
    other hooks are kept (they may be part of what the model computes, e.g. weight normalisation) and shared with
    the original rather than copied. A ``LightningModule`` is copied without its trainer.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2)).train()
        >>> twin = frozen_copy(model)
        >>> twin.training, twin[0].weight.requires_grad, torch.equal(twin[0].weight, model[0].weight)
        (False, False, True)
    """
    memo: dict[int, Any] = {}
    for module in model.modules():
        for attribute in _HOOK_DICTS:
            for hook in getattr(module, attribute, {}).values():
                memo[id(hook)] = hook  # share the hook, do not deep-copy what it closes over
    twin = copy.deepcopy(model, memo)
    for module in twin.modules():
        for attribute in ("_forward_hooks", "_forward_pre_hooks"):
            hooks = getattr(module, attribute, None)
            if hooks:
                for handle_id in [k for k, fn in hooks.items() if getattr(fn, TAP_MARK, False)]:
                    del hooks[handle_id]
    twin.eval()
    twin.requires_grad_(False)
    return twin


#: Why ``async_explain="auto"`` keeps a CPU run's rounds in the validation hook: the figures behind the choice.
CPU_REFUSAL = (
    "the model trains on the CPU, where a background round competes with training for the same cores "
    "(async_explain='auto'; on 2 cores a MobileNetV2 fine-tune was slower with background rounds in 5 of 6 "
    "side-by-side runs, README 'Speed'; async_explain=True runs them in the background anyway)"
)


#: Why ``async_explain="auto"`` keeps a DDP run's rounds in the validation hook, shared between the ranks.
DDP_REFUSAL = (
    "DDP shares the round's work between ranks, and every rank holds the round's metrics (async_explain='auto'; on "
    "2 CPU processes a MobileNetV2 fine-tune took as long with rank 0 explaining alone in the background, within 3%, "
    "README 'DDP'; async_explain=True does that)"
)


def async_refusal(trainer: Any, pl_module: nn.Module, monitored_prefix: str, mode: bool | str = True) -> str | None:
    """Why a round of this fit must run in the validation hook rather than in the background (``None``: it may not).

    Background rounds need: ``trainer.fit`` (``validate`` has no training to overlap, and returns the round), one
    process or ``async_explain=True`` (under DDP the ranks share a round's work through collectives, which a worker
    must never run; with ``True`` rank 0 explains the whole round alone in its worker instead, and the other ranks
    go on training), an uncompiled model (``torch.compile``'s eager stance is process-wide), a map-style probe
    dataset (the worker indexes it; an iterable one would be re-iterated beside training), and no callback monitoring
    this explainer's metrics (EarlyStopping or ModelCheckpoint on ``<prefix>/...`` must see the round in the epoch it
    belongs to).

    Args:
        trainer: The Trainer.
        pl_module: The LightningModule.
        monitored_prefix: The explainer's tag prefix (``neurons`` or ``neurons-<name>``).
        mode: ``async_explain``: ``False`` always refuses; ``"auto"`` also refuses a model on the CPU
            (:data:`CPU_REFUSAL`) and DDP (:data:`DDP_REFUSAL`).
    """
    from lightning.pytorch.trainer.states import TrainerFn
    from torch.utils.data import DataLoader, IterableDataset

    from lightning_neurons.recording.hooks import compiled_parts

    if mode is False:
        return "async_explain=False"
    if trainer.state.fn != TrainerFn.FITTING:
        return "not fitting"
    if trainer.world_size > 1 and mode is not True:
        return DDP_REFUSAL
    if compiled_parts(pl_module):
        return "the model is compiled"
    loaders = trainer.val_dataloaders
    loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
    if isinstance(loader, DataLoader) and isinstance(loader.dataset, IterableDataset):
        return "the probe dataset is iterable"
    if mode == "auto" and model_device(pl_module).type == "cpu":
        return CPU_REFUSAL
    for callback in trainer.callbacks:
        monitor = getattr(callback, "monitor", None)
        if isinstance(monitor, str) and monitor.startswith(monitored_prefix + "/"):
            return f"{type(callback).__name__} monitors {monitor!r}"
    return None


def worker_stream(device: torch.device) -> Any:
    """A new CUDA stream on ``device`` that starts after the work queued so far (``None`` off CUDA)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    stream = torch.cuda.Stream(device=device)
    stream.wait_stream(torch.cuda.current_stream(device))  # the frozen copy is made on the current stream
    return stream


class _on_stream:
    """``torch.cuda.stream(stream)`` when a stream is given, else nothing."""

    def __init__(self, stream: Any) -> None:
        self._ctx = torch.cuda.stream(stream) if stream is not None else None

    def __enter__(self) -> None:
        if self._ctx is not None:
            self._ctx.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


__all__ = [
    "CPU_REFUSAL",
    "DDP_REFUSAL",
    "BackgroundExplainer",
    "FinishedRound",
    "RoundJob",
    "async_refusal",
    "frozen_copy",
    "worker_stream",
]
