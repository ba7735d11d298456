"""A cheap real image-text encoder for Lightning tests: deterministic colour/texture statistics and hashed words.

It is a genuine :class:`~lightning_neurons.ImageTextEncoder` (images and texts in one normalised space), cheap enough
that a test runs the real callback, session, pipeline and writers in seconds. It knows nothing about concepts: the
descriptions it gives are arbitrary but deterministic, which is what schedule, DDP and resume tests compare.
"""

from __future__ import annotations

import hashlib
import threading
import time

import torch
from torch import nn

from lightning_neurons.backends.base import Backend

DIM = 32


def _word_rows(texts: list[str]) -> torch.Tensor:
    out = torch.zeros(len(texts), DIM)
    for i, text in enumerate(texts):
        for word in text.lower().split():
            digest = hashlib.md5(word.encode()).digest()
            out[i, digest[0] % DIM] += 1.0 + digest[1] / 255.0
            out[i, digest[2] % DIM] -= 0.5
    return out


class StatsEncoder:
    """Image: channel means, stds and a coarse 3x3 brightness grid, projected by a fixed random matrix."""

    name = "stats"

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.projection = torch.randn(3 + 3 + 9, DIM, generator=g)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        grid = nn.functional.adaptive_avg_pool2d(x.mean(dim=1, keepdim=True), 3).flatten(1)
        feats = torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3)), grid], dim=1)
        return nn.functional.normalize(feats @ self.projection, dim=1)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return nn.functional.normalize(_word_rows(list(texts)) + 1e-6, dim=1)


def cheap_backend() -> Backend:
    """A Backend around :class:`StatsEncoder` (descriptions compared with the same hashed words)."""
    return Backend(name="stats", encoder=StatsEncoder())


class SlowWorkerEncoder(StatsEncoder):
    """:class:`StatsEncoder` that takes ``delay`` seconds longer per call off the main thread (a background worker).

    Picklable (``ddp_spawn`` pickles the callbacks), so that a round explained in the background is still in flight
    when the next one is due, in every process.
    """

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        if threading.current_thread() is not threading.main_thread():
            time.sleep(self.delay)
        return super().encode_images(images)


class FailingWorkerEncoder(StatsEncoder):
    """:class:`StatsEncoder` that raises off the main thread (a background worker's failure); picklable."""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("encoder exploded in the worker")
        return super().encode_images(images)
