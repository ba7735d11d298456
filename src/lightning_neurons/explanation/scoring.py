"""Concept scoring: which concept best explains a unit, and how well it separates the unit's crops.

Everything is batched over the units of a layer: the similarities of every unique crop with every concept
come from one matrix product (:func:`similarity`), and the per-unit aggregation is a gather plus a weighted
sum, never a loop over units.

Two corrections for concepts that match everything (DESIGN.md, step 4) are values of
:mod:`lightning_neurons.explanation.correction`: :class:`ControlCorrection` (``"control"``) and :class:`SoftWPMI`
(``"soft_wpmi"``); every function here takes either the value or its name.

The explanation's ``score`` is the AUC (Mann-Whitney, ties count one half) of the chosen text's similarity
over the unit's top crops against the control crops; its ``margin`` is the difference of the two means.

Example:
    >>> import torch
    >>> crop_sims = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.1, 0.5]])  # 3 unique crops x 2 concepts
    >>> res = score_layer(crop_sims, torch.tensor([[0, 1]]), control_sims=crop_sims[2:], num_alternatives=1)
    >>> res.top_indices.tolist(), res.auc.tolist()
    ([[0, 1]], [1.0])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_neurons.explanation.correction import (
    ControlCorrection,
    Correction,
    CorrectionName,
    SoftWPMI,
    as_correction,
    rank_weights,
)


def similarity(image_embeddings: Tensor, text_embeddings: Tensor) -> Tensor:
    """Cosine similarities ``[N, C]`` of L2-normalised embeddings (one matrix product).

    Example:
        >>> similarity(torch.eye(2), torch.eye(2)).tolist()
        [[1.0, 0.0], [0.0, 1.0]]
    """
    return image_embeddings.float() @ text_embeddings.float().to(image_embeddings.device).T


def concept_scores(
    top_sims: Tensor,
    valid: Tensor,
    control_sims: Tensor,
    correction: Correction | CorrectionName = "control",
    **options: Any,
) -> Tensor:
    """Corrected concept scores of every unit of a layer.

    Args:
        top_sims: ``[U, k, C]`` similarity of each unit's top crops (best first) with each concept.
        valid: bool ``[U, k]``, which top slots hold a crop.
        control_sims: ``[M, C]`` similarity of the control crops with each concept.
        correction: A :class:`ControlCorrection` / :class:`SoftWPMI` value, or its name ``"control"`` /
            ``"soft_wpmi"``.
        **options: With a name, the options of :func:`~lightning_neurons.explanation.correction.as_correction`
            (``control_scale``; ``temperature``, ``lam``, ``p_start``, ``p_end``, ``tie_break``).

    Returns:
        float32 ``[U, C]``.

    Raises:
        ValueError: For an unknown correction.

    Example:
        >>> sims = torch.tensor([[[0.9, 0.1]]])
        >>> concept_scores(sims, torch.tensor([[True]]), sims[0], SoftWPMI(temperature=1.0)).argmax().item()
        0
    """
    return as_correction(correction, **options).scores(top_sims, valid, control_sims)


def mann_whitney_auc(positives: Tensor, negatives: Tensor) -> float:
    """AUC of separating ``positives`` from ``negatives`` by value (ties count one half); NaN when one is empty.

    Example:
        >>> mann_whitney_auc(torch.tensor([3.0, 1.0]), torch.tensor([1.0, 0.0]))
        0.875
    """
    res = batched_auc(positives.reshape(1, -1), torch.ones(1, positives.numel(), dtype=torch.bool), negatives[None])
    return float(res[0])


def batched_auc(positives: Tensor, valid: Tensor, negatives: Tensor) -> Tensor:
    """Per-row Mann-Whitney AUC of the valid ``positives`` against ``negatives``.

    Args:
        positives: ``[U, k]``.
        valid: bool ``[U, k]``.
        negatives: ``[U, M]`` (or ``[1, M]`` shared by every row).

    Returns:
        float32 ``[U]``; NaN for a row without positives or without negatives.
    """
    neg = torch.sort(negatives.float(), dim=1).values.expand(positives.shape[0], -1).contiguous()
    pos = positives.float().contiguous()
    below = torch.searchsorted(neg, pos, right=False).float()
    upto = torch.searchsorted(neg, pos, right=True).float()
    wins = torch.where(valid, below + 0.5 * (upto - below), torch.zeros_like(below)).sum(dim=1)
    total = valid.sum(dim=1).float() * neg.shape[1]
    return torch.where(total > 0, wins / total.clamp_min(1), torch.full_like(total, float("nan")))


@dataclass
class LayerScores:
    """Scores of the units of one layer.

    Args:
        scores: ``[U, C]`` corrected concept scores.
        top_indices: ``[U, 1 + num_alternatives]`` concept indices, best first (column 0 is the description).
        top_values: The matching corrected scores.
        auc: ``[U]`` AUC of the best concept's similarity over the top crops against the control crops.
        margin: ``[U]`` mean top-crop similarity minus mean control similarity of the best concept.
    """

    scores: Tensor
    top_indices: Tensor
    top_values: Tensor
    auc: Tensor
    margin: Tensor


def separation(top_sims: Tensor, valid: Tensor, control_sims: Tensor, concept: Tensor) -> tuple[Tensor, Tensor]:
    """AUC and margin of one chosen concept per unit.

    Args:
        top_sims: ``[U, k, C]``.
        valid: bool ``[U, k]``.
        control_sims: ``[M, C]``.
        concept: int64 ``[U]``, the concept of each unit.

    Returns:
        ``(auc [U], margin [U])``.
    """
    idx = concept.to(top_sims.device)
    pos = top_sims.gather(2, idx[:, None, None].expand(-1, top_sims.shape[1], 1)).squeeze(2)
    neg = control_sims.float().T[idx]  # [U, M]
    auc = batched_auc(pos, valid, neg)
    n_pos = valid.sum(dim=1).clamp_min(1)
    mean_pos = torch.where(valid, pos, torch.zeros_like(pos)).sum(dim=1) / n_pos
    mean_neg = neg.mean(dim=1) if neg.shape[1] else torch.zeros_like(mean_pos)
    return auc, mean_pos - mean_neg


def score_layer(
    crop_sims: Tensor,
    crop_index: Tensor,
    control_sims: Tensor,
    correction: Correction | CorrectionName = "control",
    num_alternatives: int = 4,
    **correction_options: Any,
) -> LayerScores:
    """Pick each unit's description and alternatives and score them.

    Args:
        crop_sims: ``[K, C]`` similarity of every unique crop with every concept.
        crop_index: int64 ``[U, k]`` the unique crop of each unit's top slot, best first; ``-1`` where empty.
        control_sims: ``[M, C]`` similarity of the control crops with every concept.
        correction: A correction value or its name (see :func:`concept_scores`).
        num_alternatives: Runner-up concepts to keep.
        **correction_options: With a name, the correction's options (see :func:`concept_scores`).

    Returns:
        A :class:`LayerScores`.
    """
    valid = crop_index >= 0
    top_sims = crop_sims[crop_index.clamp_min(0)]  # [U, k, C]
    scores = concept_scores(top_sims, valid, control_sims, correction, **correction_options)
    n = min(scores.shape[1], 1 + num_alternatives)
    top_values, top_indices = torch.topk(scores, n, dim=1)
    auc, margin = separation(top_sims, valid, control_sims, top_indices[:, 0])
    return LayerScores(scores, top_indices, top_values, auc, margin)


#: Description shown for a unit whose explanation score does not clear the confidence threshold.
NO_CLEAR_CONCEPT = "no clear concept"


def confident(score: float, threshold: float) -> bool:
    """Whether an explanation's score (its AUC) clears a confidence threshold.

    Calibrate the threshold with a model-randomisation check: explain the same network with random weights and
    take a high quantile of its units' scores (``lightning_neurons.benchmark.randomisation_check``); a trained
    unit below it is explained no better than a random one and should be shown as :data:`NO_CLEAR_CONCEPT`.

    Example:
        >>> confident(0.91, 0.8), confident(0.62, 0.8)
        (True, False)
    """
    return bool(score == score and score > threshold)  # NaN scores are never confident


def shown_description(description: str, score: float, threshold: float | None) -> str:
    """The description to display: itself, or :data:`NO_CLEAR_CONCEPT` below ``threshold`` (``None``: no check).

    Example:
        >>> shown_description("stripes", 0.55, 0.8)
        'no clear concept'
    """
    return description if threshold is None or confident(score, threshold) else NO_CLEAR_CONCEPT


__all__ = [
    "NO_CLEAR_CONCEPT",
    "confident",
    "shown_description",
    "ControlCorrection",
    "Correction",
    "CorrectionName",
    "LayerScores",
    "SoftWPMI",
    "batched_auc",
    "concept_scores",
    "mann_whitney_auc",
    "rank_weights",
    "score_layer",
    "separation",
    "similarity",
]
