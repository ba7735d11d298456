"""Corrections for concepts that match everything, as values: :class:`ControlCorrection` and :class:`SoftWPMI`.

A correction turns the similarities of a layer's top crops with every concept into one corrected score per
(unit, concept) (DESIGN.md, step 4). Each correction is a frozen value that carries its own options, so the
explanation stage hands one object down instead of a name plus keywords; the names ``"control"`` and
``"soft_wpmi"`` still work everywhere a correction is accepted (:func:`as_correction` converts them).

- :class:`ControlCorrection`: rank-weighted mean similarity over the unit's top crops minus the concept's mean
  similarity over the control crops (random probe crops); ``scale="std"`` also divides by the concept's standard
  deviation over the control crops.
- :class:`SoftWPMI`: CLIP-Dissect's soft weighted pointwise mutual information. Per crop a softmax over the
  concepts gives ``p(c | crop)``; the unit's top crops are soft members of its top set (membership falling
  linearly with rank from ``p_start`` to ``p_end``), so ``log p(c | unit) = sum_r log(1 - p_r (1 - p(c | crop_r)))``;
  the score is ``log p(c | unit) - lam * log p(c)`` with ``p(c)`` the mean of ``p(c | unit)`` over the layer's
  units. It needs several units per layer to mean anything.

Example:
    >>> as_correction("soft_wpmi", temperature=5.0)
    SoftWPMI(temperature=5.0, lam=1.0, p_start=0.998, p_end=0.97, tie_break=0.001)
    >>> as_correction(ControlCorrection(scale="std")).name
    'control'
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

CorrectionName = Literal["control", "soft_wpmi"]
ControlScale = Literal["none", "std"]


def rank_weights(valid: Tensor) -> Tensor:
    """Activation-rank weights: linearly falling with rank (best first), zero where empty, rows sum to 1.

    Args:
        valid: bool ``[U, k]``, which top slots hold a crop.

    Example:
        >>> rank_weights(torch.tensor([[True, True, False]])).tolist()
        [[0.6000000238418579, 0.4000000059604645, 0.0]]
    """
    k = valid.shape[1]
    w = (k - torch.arange(k, device=valid.device, dtype=torch.float32))[None].expand(valid.shape[0], k)
    w = torch.where(valid, w, torch.zeros_like(w))
    return w / w.sum(dim=1, keepdim=True).clamp_min(1e-12)


@dataclass(frozen=True)
class ControlCorrection:
    """Rank-weighted mean top-crop similarity minus the concept's mean similarity on the control crops.

    Args:
        scale: ``"none"`` (plain mean subtraction, the default) or ``"std"``: also divide by the concept's standard
            deviation over the control crops (a z-score). Measured on the offline benchmark, the z-score lowered
            the class-name similarity and simulation of the embedded backend, so it is opt-in.

    Raises:
        ValueError: For an unknown ``scale``.

    Example:
        >>> sims = torch.tensor([[[1.0, 0.5]]])  # 1 unit, its one top crop, 2 concepts
        >>> ControlCorrection().scores(sims, torch.tensor([[True]]), torch.tensor([[0.5, 0.0]])).tolist()
        [[0.5, 0.5]]
    """

    scale: ControlScale = "none"

    #: The correction's name, as in ``ExplainConfig(correction=...)`` and ``round.meta["correction"]``.
    name: ClassVar[str] = "control"
    #: Whether a unit's scores depend on the other units of its layer (they do not: rows are independent).
    layer_wide: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.scale not in ("none", "std"):
            raise ValueError(f"control_scale must be 'none' or 'std', got {self.scale!r}")

    def scores(self, top_sims: Tensor, valid: Tensor, control_sims: Tensor) -> Tensor:
        """Corrected scores ``[U, C]`` from top-crop similarities ``[U, k, C]`` and control similarities ``[M, C]``."""
        agg = torch.einsum("uk,ukc->uc", rank_weights(valid), top_sims.float())
        if control_sims.numel() == 0:
            return agg
        ctrl = control_sims.float()
        out = agg - ctrl.mean(dim=0)[None]
        if self.scale == "std" and ctrl.shape[0] > 1:
            out = out / ctrl.std(dim=0)[None].clamp_min(1e-4)
        return out


@dataclass(frozen=True)
class SoftWPMI:
    """CLIP-Dissect's soft weighted pointwise mutual information (see the module docstring).

    Args:
        temperature: Softmax scale of the similarities (CLIP-Dissect uses 10).
        lam: Weight of the ``log p(c)`` term.
        p_start: Soft membership of the best crop in the top set.
        p_end: Soft membership of the ``k``-th crop.
        tie_break: Weight of the mean per-crop ``log p(c | unit)`` added to break ties of saturated scores
            (WPMI is at most ``log U``).

    Raises:
        ValueError: For a non-positive temperature.

    Example:
        >>> SoftWPMI(temperature=5.0).name
        'soft_wpmi'
    """

    temperature: float = 10.0
    lam: float = 1.0
    p_start: float = 0.998
    p_end: float = 0.97
    tie_break: float = 1e-3

    name: ClassVar[str] = "soft_wpmi"
    #: ``p(c)`` is a mean over the layer's units: a unit's scores depend on the other units of its layer.
    layer_wide: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"the soft-WPMI temperature must be positive, got {self.temperature}")

    def scores(self, top_sims: Tensor, valid: Tensor, control_sims: Tensor) -> Tensor:
        """Corrected scores ``[U, C]``; the control crops are not used (``p(c)`` comes from the layer's units)."""
        k = top_sims.shape[1]
        probs = torch.softmax(self.temperature * top_sims.float(), dim=2)
        ranks = torch.arange(k, device=top_sims.device, dtype=torch.float32)
        member = self.p_start - ranks / k * (self.p_start - self.p_end)
        member = torch.where(valid, member[None].expand_as(valid), torch.zeros_like(valid, dtype=torch.float32))
        log_given_unit = torch.log1p(-member[:, :, None] * (1 - probs) + 1e-7).sum(dim=1)
        log_prior = torch.logsumexp(log_given_unit, dim=0, keepdim=True) - math.log(log_given_unit.shape[0])
        # WPMI saturates at log U for every concept that only this unit's crops match (few units per layer):
        # break those ties towards the concept with the larger p(c | unit).
        per_crop = log_given_unit / valid.sum(dim=1, keepdim=True).clamp_min(1)
        return log_given_unit - self.lam * log_prior + self.tie_break * per_crop


#: A correction value (what :class:`~lightning_neurons.ExplainConfig` and the scoring functions take).
Correction = ControlCorrection | SoftWPMI

_SOFT_WPMI_OPTIONS = ("temperature", "lam", "p_start", "p_end", "tie_break")


def as_correction(correction: Correction | str, **options: Any) -> Correction:
    """The correction value of a name (with its options) or of a value (returned as it is).

    Args:
        correction: ``"control"``, ``"soft_wpmi"``, or a :class:`ControlCorrection` / :class:`SoftWPMI`.
        **options: With a name, the options of the named correction (``control_scale`` for ``"control"``;
            ``temperature``, ``lam``, ``p_start``, ``p_end``, ``tie_break`` for ``"soft_wpmi"``); options of the
            other correction are ignored, as they always were.

    Raises:
        ValueError: For an unknown name or option value.
        TypeError: For options given with a value (they belong in the value) or a value of another type.

    Example:
        >>> as_correction("control", control_scale="std", temperature=3.0)
        ControlCorrection(scale='std')
    """
    if isinstance(correction, (ControlCorrection, SoftWPMI)):
        if options:
            raise TypeError(f"options {sorted(options)} go into the correction value itself, e.g. SoftWPMI(...)")
        return correction
    unknown = sorted(set(options) - {"control_scale", *_SOFT_WPMI_OPTIONS})
    if unknown:
        raise TypeError(f"unknown correction options {unknown}; known: control_scale, {', '.join(_SOFT_WPMI_OPTIONS)}")
    if correction == "control":
        return ControlCorrection(scale=options.get("control_scale", "none"))
    if correction == "soft_wpmi":
        return SoftWPMI(**{key: options[key] for key in _SOFT_WPMI_OPTIONS if key in options})
    if isinstance(correction, str):
        raise ValueError(f"correction must be 'control' or 'soft_wpmi', got {correction!r}")
    raise TypeError(
        f"correction must be 'control', 'soft_wpmi', ControlCorrection() or SoftWPMI(...), got {correction!r}"
    )


__all__ = ["ControlCorrection", "Correction", "CorrectionName", "SoftWPMI", "as_correction", "rank_weights"]
