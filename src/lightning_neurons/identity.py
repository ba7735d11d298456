"""What a round describes: run, weights, epoch and step, settings (:class:`~lightning_neurons.results.RoundIdentity`).

Three small pure functions build the parts of a round's identity, and :func:`round_identity` puts them together:

- :func:`settings_fingerprint`: the settings that change what a round means (vocabulary and its concepts, class
  names, backend and its model, ``top_k``, reduction, and the explanation's own: how a description is chosen and
  judged, the control set, the input normalisation, captioning, how regions are cut) as a short hash and a readable
  summary. Rounds with different fingerprints are never compared for drift (a new baseline starts).
- :func:`weights_fingerprint`: a hash of the model's floating-point state (parameters and buffers), so that two
  rounds of the same weights are recognised as such and a round of other weights never passes for one.
- :func:`new_run_id`: a fresh run identifier (a training run, or a post-hoc output folder).

Example:
    >>> from lightning_neurons.config import RunConfig
    >>> fingerprint, summary = settings_fingerprint(RunConfig.from_arguments(layers=["fc"], top_k=4))
    >>> summary["top_k"], len(fingerprint)
    (4, 16)
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_neurons.config import RunConfig
from lightning_neurons.explanation.settings import ExplainConfig
from lightning_neurons.results import RoundIdentity, json_safe


def settings_fingerprint(
    config: RunConfig,
    *,
    class_names: Sequence[str] | None = None,
    concepts: Sequence[str] | None = None,
    model: str | None = None,
    crop_side: int | None = None,
) -> tuple[str, dict[str, Any]]:
    """The fingerprint and the readable summary of the settings that change what a round means.

    The one place that says which settings count; :mod:`lightning_neurons.drift.baseline` decides from these
    fingerprints where a change of settings starts a new drift baseline.

    Args:
        config: The run's settings.
        class_names: The class names in use (read from the data when the config gives none).
        concepts: The embedded vocabulary (its texts): a changed concept file changes the fingerprint even when its
            path does not.
        model: The image-text model actually loaded (``backend="auto"`` may load CLIP on one machine and the offline
            pack on another: that changes what a round means).
        crop_side: The side crops are cut at for the loaded encoder (``ExplainConfig.for_encoder``; ``None``: the
            config's ``crop_size``, or "the encoder's side" where that is ``None`` too).

    Returns:
        ``(fingerprint, summary)``: 16 hex digits, and the dictionary they hash.

    Example:
        >>> a, _ = settings_fingerprint(RunConfig.from_arguments(layers=["fc"]))
        >>> b, s = settings_fingerprint(RunConfig.from_arguments(layers=["fc"], reduction="mean"))
        >>> a != b, s["reduction"]
        (True, 'mean')
    """
    backend = config.backend
    names = backend.class_names or (tuple(class_names) if class_names else None)
    summary: dict[str, Any] = {
        "vocabulary": [str(v) for v in backend.vocabulary] + (["llm"] if backend.llm_vocabulary else []),
        "concepts": _names(concepts),
        "class_names": _names(names),
        "backend": backend.backend_label,
        "model": model or json_safe(dict(backend.backend_kwargs)) or None,
        "top_k": int(config.recording.top_k),
        "reduction": str(config.recording.reduction),
        **_explanation_summary(config.explain, config.recording.reservoir_size, crop_side),
    }
    return _digest(summary), summary


def _explanation_summary(explain: ExplainConfig, reservoir_size: int, crop_side: int | None) -> dict[str, Any]:
    # What decides a unit's shown text and kind (selection and its correction, the significance test and its
    # thresholds, the control set they compare with), what the crops look like (normalisation undone, how regions are
    # cut and merged) and whether captions replace the concept: a change of any of them changes the description or the
    # kind of units whose network did not change.
    side = crop_side or explain.crop_size
    regions = (
        f"crops {side if side else 'at the encoder side'}"
        f", quantile {explain.quantile:g}, relative {explain.relative_threshold:g}, padding {explain.padding:g}"
        f", min box {explain.min_box:g}, mask {explain.mask_size}, {explain.component} component"
        f", merge IoU {explain.dedupe_iou:g}, grid {explain.box_grid}"
        f", {explain.control_crops_per_image} control crops per image"
    )
    normalisation = (
        {"mean": list(explain.image_mean), "std": list(explain.image_std or ())}
        if explain.image_mean is not None
        else "min-max per image"
    )
    return {
        "selection": str(explain.selection),
        "correction": repr(explain.correction_value),
        "frequency_penalty": float(explain.frequency_penalty),
        "permutations": int(explain.permutations),
        "q_threshold": float(explain.q_threshold),
        "gain_margin": float(explain.gain_margin),
        "reservoir_size": int(reservoir_size),
        "normalisation": normalisation,
        "describe": bool(explain.describe),
        "regions": regions,
    }


def _digest(value: Any) -> str:
    text = json.dumps(json_safe(value), sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _names(names: Sequence[str] | None) -> str | None:
    # Long lists (1,000 ImageNet classes, 10,000 concepts) are summarised by their count and a digest.
    return None if not names else f"{len(names)} names #{_digest(list(names))[:8]}"


def weights_fingerprint(model: nn.Module) -> str:
    """A hash of the model's floating-point parameters and buffers (names, shapes and two moments of the values).

    Cheap (one pass over the weights, one host sync), and equal for equal weights on any device.

    Example:
        >>> a, b = nn.Linear(2, 2), nn.Linear(2, 2)
        >>> _ = b.load_state_dict(a.state_dict())
        >>> weights_fingerprint(a) == weights_fingerprint(b)
        True
    """
    names: list[str] = []
    moments: list[torch.Tensor] = []
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.numel() == 0:
                continue
            t = tensor.detach().to(torch.float64).flatten()
            # A position-dependent moment too: permuted weights are other weights.
            ramp = torch.linspace(1.0, 2.0, t.numel(), dtype=torch.float64, device=t.device)
            moments.append(torch.stack([t.sum(), (t * t).sum(), (t * ramp).sum()]).cpu())
            names.append(f"{name}:{tuple(tensor.shape)}")
    digest = hashlib.sha1("|".join(names).encode("utf-8"))
    if moments:
        # Rounded so that the same weights on another device (another summation order) hash the same.
        values = torch.stack(moments).flatten().tolist()
        digest.update(";".join(f"{v:.9g}" for v in values).encode("utf-8"))
    return digest.hexdigest()[:16]


def new_run_id() -> str:
    """A fresh run identifier.

    Example:
        >>> len(new_run_id()), new_run_id() != new_run_id()
        (12, True)
    """
    return uuid.uuid4().hex[:12]


def round_identity(
    run: str,
    model: nn.Module | None,
    *,
    epoch: int | None,
    step: int | None,
    settings: tuple[str, dict[str, Any]],
) -> RoundIdentity:
    """The identity of a round explained from ``model``'s current weights.

    Example:
        >>> from lightning_neurons.config import RunConfig
        >>> ident = round_identity("r1", nn.Linear(2, 2), epoch=0, step=5,
        ...                        settings=settings_fingerprint(RunConfig.from_arguments(layers=["fc"])))
        >>> ident.run, ident.epoch, ident.step, ident.weights is not None
        ('r1', 0, 5, True)
    """
    fingerprint, summary = settings
    return RoundIdentity(
        run=run,
        weights=weights_fingerprint(model) if model is not None else None,
        epoch=epoch,
        step=step,
        settings=fingerprint,
        settings_summary=dict(summary),
    )


__all__ = ["new_run_id", "round_identity", "settings_fingerprint", "weights_fingerprint"]
