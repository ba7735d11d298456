"""The tiny LightningModule of the Lightning-behaviour tests: a conv block ``features`` and a linear ``head``.

``features.0`` has 6 channels, ``features.2`` 8 (stride 2) and ``head`` 3 units: 17 units on 3-channel images of
any size, 3 classes.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn


class Tiny(pl.LightningModule):
    """Args: ``lr`` of SGD (0 keeps the weights put), ``sync_dist`` of the logged ``val_loss`` (DDP runs)."""

    def __init__(self, lr: float = 0.05, sync_dist: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2))
        self.head = nn.Linear(8, 3)
        self.lr = lr
        self.sync_dist = sync_dist
        self.train_steps = 0

    def forward(self, x):
        return self.head(self.features(x).amax(dim=(2, 3)))

    def training_step(self, batch, batch_idx):
        self.train_steps += 1
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]), sync_dist=self.sync_dist)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def quiet_trainer(
    callbacks: Any, *, root: Any = None, logger: Any = False, max_epochs: int = 1, **kwargs: Any
) -> pl.Trainer:
    """A CPU-test Trainer that prints nothing: no progress bar or model summary, and checkpoints only when a
    ``ModelCheckpoint`` is among ``callbacks`` (one callback or a list)."""
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    return pl.Trainer(
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=logger,
        default_root_dir=root,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )
