"""When training waits for an explanation round longer than it trained, say so once, with what makes rounds cheaper.

A round explained in the validation hook (the CPU default, DDP, ``async_explain=False``) stops training until it is
done. On a CPU its cost is mostly the image encoder, one pass per crop, and can be several times the epoch it follows
(``benchmarks/train_overhead.py``). Nothing is wrong then, but the user should hear it once, from the run itself, with
the settings that make a round cheaper and what each one costs, rather than find out from a slow training job.

Example:
    >>> clock = TrainingClock()
    >>> clock.epoch_started(now=10.0)
    >>> clock.validation_started(now=14.0)
    >>> clock.trained_s
    4.0
    >>> slow_round_message("fc", key=0, round_s=2.0, trained_s=clock.trained_s) is None  # shorter than training
    True
    >>> print(slow_round_message("fc", key=0, round_s=10.0, trained_s=4.0).split(". ")[0])
    NeuronExplainer[fc]: training waited 10.0 s for round 0, 2.5x the 4.0 s it trained in that epoch
"""

from __future__ import annotations

import time
from dataclasses import dataclass

#: A round in the validation hook that takes longer than this many times the training before it is worth a word.
SLOW_ROUND_RATIO = 1.0

#: The settings that make a round cheaper, with what each costs (README, "Making rounds cheaper").
CHEAPER_ROUNDS = (
    "every_n_epochs=2 or epochs=[...] (fewer rounds); fewer layers or a smaller top_k (fewer crops to embed); "
    "a smaller backend_kwargs image_size for the embedded encoder (128 px is about 2.5x cheaper per crop than 224, and "
    "less faithful); "
    "on a GPU rounds run beside training by default (async_explain='auto')"
)


@dataclass
class TrainingClock:
    """Seconds of training in the current epoch, read when its validation pass starts.

    Attributes:
        started: When the epoch started (``time.perf_counter``), ``None`` outside a fit.
        trained_s: Seconds from the epoch's start to its latest validation pass, ``None`` until one started.
    """

    started: float | None = None
    trained_s: float | None = None

    def epoch_started(self, now: float | None = None) -> None:
        """A training epoch starts (``now`` defaults to ``time.perf_counter()``)."""
        self.started = time.perf_counter() if now is None else now
        self.trained_s = None

    def validation_started(self, now: float | None = None) -> None:
        """A validation pass starts inside the epoch: what came before it was training (and earlier passes)."""
        if self.started is not None:
            self.trained_s = (time.perf_counter() if now is None else now) - self.started


def slow_round_message(identity: str, key: int | None, round_s: float, trained_s: float | None) -> str | None:
    """What to tell the user when a round held training up for longer than training ran, else ``None``.

    Args:
        identity: The explainer's name in messages (its layers).
        key: The round's epoch (or validation pass).
        round_s: Seconds the round kept training waiting.
        trained_s: Seconds the epoch trained before its validation pass (``None``: not known, nothing is said).
    """
    if trained_s is None or trained_s <= 0 or round_s <= SLOW_ROUND_RATIO * trained_s:
        return None
    return (
        f"NeuronExplainer[{identity}]: training waited {_seconds(round_s)} for round {key}, "
        f"{round_s / trained_s:.1f}x the {_seconds(trained_s)} it trained in that epoch. Rounds cost about the same "
        f"every time (later ones less, from the embedding cache). To make them cheaper: {CHEAPER_ROUNDS}. "
        "This is said once per run."
    )


def _seconds(value: float) -> str:
    """``12.3 s``, or ``0.04 s`` below one second (a short test epoch must not read as ``0.0 s``)."""
    return f"{value:.1f} s" if value >= 1 else f"{value:.2g} s"


__all__ = ["CHEAPER_ROUNDS", "SLOW_ROUND_RATIO", "TrainingClock", "slow_round_message"]
