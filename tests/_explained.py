"""Rounds built with the real pipeline for the logger tests: explain() on a colour model, drift via RunHistory.

A 1x1 conv whose unit ``c`` is colour channel ``c`` is explained with a tiny deterministic image-text encoder (an
image is its mean colour, a colour word its axis). Between epoch 0 and epoch 1 the conv's channels are permuted, so
units 0 and 1 change meaning (red <-> green) and unit 2 keeps it (blue): drift with a known answer. Unit 3 is dead.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import lru_cache

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_neurons import explain
from lightning_neurons.backends.base import Backend
from lightning_neurons.drift.history import RunHistory
from lightning_neurons.logging.base import RoundOutput

COLOURS = ["red", "green", "blue"]
LAYER = "feat"


class ColourEncoder:
    """Mean colour of an image vs. one axis per colour word (a fourth axis for anything else)."""

    name = "colour"

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        mean = images.float().mean(dim=(2, 3))
        return nn.functional.normalize(torch.cat([mean, torch.zeros(len(mean), 1)], dim=1), dim=1)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        rows = [
            [float(c in t.split()) for c in COLOURS] + [0.0 if any(c in t.split() for c in COLOURS) else 1.0]
            for t in texts
        ]
        return nn.functional.normalize(torch.tensor(rows), dim=1)


class ColourImages(Dataset):
    classes = COLOURS

    def __init__(self, n: int = 36, size: int = 16) -> None:
        g = torch.Generator().manual_seed(0)
        self.labels = torch.arange(n) % 3
        images = 0.15 * torch.rand(n, 3, size, size, generator=g)
        images[torch.arange(n), self.labels] += (0.4 + 0.6 * torch.rand(n, generator=g))[:, None, None]
        self.images = images.clamp(0, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]


def colour_model(permutation: list[int]) -> nn.Sequential:
    """Units 0-2 pass colour channels ``permutation``; unit 3 is dead (zero weights: never positive)."""
    model = nn.Sequential(OrderedDict(feat=nn.Conv2d(3, 4, 1, bias=False), pool=nn.AdaptiveAvgPool2d(1)))
    with torch.no_grad():
        model.feat.weight.copy_(torch.cat([torch.eye(3)[permutation], torch.zeros(1, 3)])[:, :, None, None])
    return model.eval()


@lru_cache(maxsize=2)
def explained_outputs(epochs: int = 2, prefix: str = "neurons") -> tuple[RoundOutput, ...]:
    """RoundOutputs of ``epochs`` real explanation rounds (epoch 1 on: channels red/green swapped).

    Cached: the logger and projector test modules share one pair of rounds (treat them as read-only).
    """
    backend = Backend("colour", ColourEncoder())
    loader = DataLoader(ColourImages(), batch_size=12)
    history = RunHistory()
    outputs = []
    for epoch in range(epochs):
        model = colour_model([0, 1, 2] if epoch == 0 else [1, 0, 2])
        rnd = explain(
            model,
            loader,
            [LAYER],
            top_k=4,
            epoch=epoch,
            backend=backend,
            vocabulary=["classes"],
            class_names=COLOURS,
            log_units=None,
            show_progress=False,
        )
        # Colour is one of the image statistics the significance stage tests against, so the pipeline rightly calls
        # these units low-level; the logger tests need units with a concept (drift counts concepts only): units
        # 0-2 are given kind "concept" here, the dead unit 3 keeps the pipeline's kind.
        for u in rnd.units:
            if u.kind != "dead" and u.description:
                u.kind = "concept"
        drift = history.add_round(rnd, backend.encode_descriptions, epoch=epoch)
        outputs.append(
            RoundOutput(
                rnd, drift, history.summary(epoch), step=epoch, epoch=epoch, prefix=prefix, global_step=10 * (epoch + 1)
            )
        )
    return tuple(outputs)
