"""What the benchmark scripts share: the scene probe, the two MobileNets, a fit clock and how they save a result.

``benchmarks/kinds_seeds.py`` and ``benchmarks/quality_diversity.py`` explain a pretrained and a randomly
initialised MobileNetV2 on both splits of the broad benchmark (:mod:`~lightning_neurons.benchmark.scenes`) with
the embedded backend; every script writes its result as one JSON object.

Example:
    >>> import json, tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "out" / "result.json"
    >>> text = save_json({"a": 1}, path)
    >>> json.loads(path.read_text()) == json.loads(text) == {"a": 1}
    True
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader

from lightning_neurons.backends.base import Backend
from lightning_neurons.concepts.vocabulary import Vocabulary
from lightning_neurons.demo.data import IMAGE_MEAN, IMAGE_STD
from lightning_neurons.explanation.settings import ExplainConfig


@dataclass(frozen=True)
class SceneProbe:
    """Both splits of the broad benchmark as one probe, with the backend and vocabulary that explain it.

    Attributes:
        data: The crops of every development and held-out class.
        loader: ``data`` in batches of 32.
        backend: The embedded backend, its encoder wrapped in a :class:`~lightning_neurons.benchmark.MemoEncoder`
            (each crop embedded once).
        vocabulary: The general vocabulary without the backend's basis concepts.
    """

    data: ConcatDataset
    loader: DataLoader
    backend: Backend
    vocabulary: Vocabulary

    def config(self, **overrides: Any) -> ExplainConfig:
        """The scripts' :class:`ExplainConfig`: the demo's image normalisation, quiet, no previews."""
        return ExplainConfig(
            image_mean=IMAGE_MEAN, image_std=IMAGE_STD, show_progress=False, preview_units={}, **overrides
        )


def scene_probe(per_class: int, image_size: int = 128, seed: int = 7) -> SceneProbe:
    """Load the embedded backend and build the probe of ``per_class`` crops of every class of both splits."""
    from lightning_neurons.backends import load_backend
    from lightning_neurons.benchmark.quality import MemoEncoder
    from lightning_neurons.benchmark.scenes import SceneCrops, split_classes

    data: ConcatDataset = ConcatDataset(
        [SceneCrops(split_classes(s), per_class, image_size, seed=seed) for s in ("development", "held_out")]
    )
    loaded = load_backend("embedded", device="cpu", generator=False)
    backend = dataclasses.replace(loaded, encoder=MemoEncoder(loaded.encoder))
    vocabulary = Vocabulary(["general"], exclude_general=loaded.basis_concepts, show_progress=False)
    return SceneProbe(data, DataLoader(data, batch_size=32), backend, vocabulary)


def mobilenets() -> dict[str, nn.Module]:
    """The pretrained MobileNetV2 and one with random weights (seed 0), by name ``"pretrained"`` / ``"random"``."""
    from torchvision.models import mobilenet_v2

    from lightning_neurons.backends.embedded import load_mobilenet

    torch.manual_seed(0)
    return {"pretrained": load_mobilenet("cpu"), "random": mobilenet_v2().eval()}


class FitClock(pl.Callback):
    """Rank 0 writes the seconds from ``on_fit_start`` to its ``teardown`` to ``path`` (JSON, one number).

    Under ``ddp_spawn`` the parent's wall time of ``trainer.fit`` includes starting the processes and loading the
    models in each; this clock starts after ``setup`` and stops after every callback's ``on_fit_end`` (a callback
    listed before it tears down first), so it times the fit itself.

    Args:
        path: Where rank 0 writes the seconds.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.started: float | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started = time.perf_counter()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.is_global_zero and self.started is not None:
            Path(self.path).write_text(json.dumps(time.perf_counter() - self.started))


class ProcessGroupCloser(pl.Callback):
    """Destroy the process group at the end of a ``ddp_spawn`` process's fit (list it last among the callbacks).

    A spawned process exits right after its fit; left to interpreter shutdown, gloo's threads now and then abort it
    after the fit ended well ("terminate called without an active exception", as
    :func:`lightning_neurons.cli.close_process_group` explains), and ``trainer.fit`` in the parent then fails.
    Nothing after the callbacks' ``teardown`` runs a collective in a spawned process, so closing the group there is
    safe; with any other launcher, or after a failure, it does nothing.
    """

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
        from lightning.pytorch.trainer.states import TrainerStatus

        from lightning_neurons.cli import close_process_group

        launcher = getattr(trainer.strategy, "launcher", None)
        # Still RUNNING in the teardown hooks of a fit that ended well (INTERRUPTED after a failure).
        if isinstance(launcher, _MultiProcessingLauncher) and trainer.state.status == TrainerStatus.RUNNING:
            close_process_group()


def machine(threads: int) -> str:
    """The line a result states its machine with."""
    return f"{os.cpu_count()} CPU cores (shared), torch threads {threads}"


def save_json(result: dict[str, Any], path: str | Path | None) -> str:
    """``result`` as indented JSON, also written to ``path`` (its folder created) unless ``path`` is None."""
    text = json.dumps(result, indent=1)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
    return text


__all__ = ["FitClock", "ProcessGroupCloser", "SceneProbe", "machine", "mobilenets", "save_json", "scene_probe"]
