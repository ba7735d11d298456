"""Checks on the first validation batch before step 0.

A setup that would fail (or silently mislead) at the end of the first validation pass says so before training.

- :func:`dry_run_recording`: the whole recording path (hooks, reduction, top-k merge, read-back) on one batch, under
  the Trainer's precision (``64-true`` makes float64 the default dtype inside the validation step).
- :func:`warn_if_unnormalised`: inputs that are visibly normalised while ``image_mean`` / ``image_std`` are unset.
- :func:`with_dataset_normalisation`: take ``image_mean`` / ``image_std`` from a torchvision ``Normalize`` in the
  validation dataset's transform when the settings give none.

Example:
    >>> from lightning_neurons.config import RunConfig
    >>> config = RunConfig.from_arguments(layers=["fc"])
    >>> with_dataset_normalisation(config, None) is config
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_neurons.config import RecordingConfig, RunConfig
from lightning_neurons.recording.probe_data import looks_normalised, normalisation_of
from lightning_neurons.recording.types import Recording


def dry_run_recording(trainer: Any, model: nn.Module, config: RecordingConfig, inputs: Tensor) -> Recording:
    """Record one batch with the callback's settings, as the validation loop would, and read the result back.

    Returns:
        The one-batch recording (its layers' unit counts serve further checks, e.g. :func:`check_log_units`).

    Raises:
        ValueError: Saying that recording fails under this Trainer's precision, with the cause.
    """
    from lightning_neurons.recording.recorder import collect_top_k

    plugin = getattr(getattr(trainer, "strategy", None), "precision_plugin", None)
    context = plugin.forward_context() if plugin is not None else contextlib.nullcontext()
    extra: dict[str, Any] = {"forward_fn": config.forward_fn} if config.forward_fn is not None else {}
    try:
        with context:
            return collect_top_k(
                model, [inputs], config.layers, show_progress=False, **config.recorder_kwargs(), **extra
            )
    except Exception as err:  # noqa: BLE001 - any failure here would end the first validation pass's round
        precision = getattr(trainer, "precision", "?")
        raise ValueError(
            f"recording one validation batch of the chosen layers failed under precision={precision!r} "
            f"({type(err).__name__}: {err}); every explanation round would fail the same way"
        ) from err


def check_log_units(log_units: int | Sequence[int] | None, recording: Recording) -> None:
    """Fail with the valid range when ``log_units`` names a unit that no chosen layer has.

    Raises:
        ValueError: Naming the missing units and each layer's unit count.

    Example:
        >>> import torch
        >>> from lightning_neurons.recording.types import LayerTopK
        >>> layer = LayerTopK("fc", "linear", 8, None, torch.zeros(8, 1), torch.zeros(8, 1, dtype=torch.long),
        ...                   torch.zeros(8, 1, dtype=torch.long))
        >>> check_log_units([100], Recording(layers={"fc": layer}, reservoir_ids=torch.zeros(0), num_samples=1,
        ...                                  top_k=1, reduction="max"))
        Traceback (most recent call last):
        ...
        ValueError: log_units=[100] names units that no chosen layer has: 100 (layer 'fc' has 8 units, 0-7)
    """
    if log_units is None or isinstance(log_units, int) or not recording.layers:
        return
    sizes = {name: layer.num_units for name, layer in recording.layers.items()}
    missing = [u for u in log_units if not any(0 <= u < n for n in sizes.values())]
    if missing:
        shown = ", ".join(f"layer {name!r} has {n} units, 0-{n - 1}" for name, n in sizes.items())
        raise ValueError(
            f"log_units={list(log_units)} names units that no chosen layer has: "
            f"{', '.join(map(str, missing))} ({shown})"
        )


def warn_if_unnormalised(config: RunConfig, inputs: Tensor, name: str) -> None:
    """Warn (rank 0) when inputs are visibly normalised but ``image_mean`` / ``image_std`` are not given."""
    if config.explain.image_mean is not None or not looks_normalised(inputs):
        return
    rank_zero_warn(
        f"NeuronExplainer[{name}]: the validation inputs look normalised (min {float(inputs.min()):.2f} < 0) but "
        "image_mean/image_std are not set, so crops are min-max scaled per image and the image-text model sees "
        "other colours (descriptions change). Pass the normalisation the loader applies, e.g. "
        "NeuronExplainer(..., image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]) for ImageNet's"
    )


def with_dataset_normalisation(config: RunConfig, loader: Any) -> RunConfig:
    """``config`` with the validation dataset's torchvision ``Normalize`` as ``image_mean`` / ``image_std``.

    Only when the settings give none; unchanged when the dataset has no such transform.
    """
    if config.explain.image_mean is not None or loader is None:
        return config
    found = normalisation_of(getattr(loader, "dataset", None))
    if found is None:
        return config
    mean, std = found
    rank_zero_info(f"NeuronExplainer: image_mean={mean}, image_std={std} read from the validation dataset's Normalize")
    explain = dataclasses.replace(config.explain, image_mean=tuple(mean), image_std=tuple(std))
    evaluation = config.evaluation
    if evaluation is not None and hasattr(evaluation, "image_mean"):
        evaluation = dataclasses.replace(evaluation, image_mean=tuple(mean), image_std=tuple(std))
    return dataclasses.replace(config, explain=explain, evaluation=evaluation)


__all__ = ["check_log_units", "dry_run_recording", "warn_if_unnormalised", "with_dataset_normalisation"]
