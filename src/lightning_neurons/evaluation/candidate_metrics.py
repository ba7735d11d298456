"""NeuronEval's candidate explanation metrics: how well a concept's values over the samples match a unit's.

Every metric takes a unit-by-sample activation matrix ``[N, U]`` and a concept matrix ``[N, C]`` (binary labels,
probabilities or image-text similarities of the same ``N`` samples) and returns the score of every (unit, concept)
pair, ``[U, C]``, higher meaning a better match. They are the candidates that NeuronEval (Oikarinen, Yan, Weng,
ICML 2025) puts through its missing-labels and extra-labels tests (``benchmarks/neuron_eval.py`` runs the tests on
this project's units with known meaning):

- continuous, no threshold: :func:`correlation` (Pearson), :func:`cosine`;
- the unit binarised at its top ``alpha`` fraction of samples ("active"): :func:`auprc` (the concept's values rank
  the active samples), :func:`auc` (the same with the ROC area, which is what the old ``score`` was: top crops
  against control crops), :func:`soft_wpmi` (CLIP-Dissect);
- the unit and the concept binarised: :func:`f1`, :func:`iou`;
- the concept binarised: :func:`mad` (CoSy's mean activation difference);
- :func:`correlation_top_random`: Pearson correlation on the unit's top samples plus a uniform sample of the
  probe (the reservoir), what a streaming recorder can afford (NeuronEval's "top-and-random" variant).

These are the benchmark's reference implementations, samples first as in NeuronEval. Where a metric is one the
pipeline computes too, it is the pipeline's own (:mod:`lightning_neurons.explanation.metrics`, units first) called
with the axes this module uses: :func:`correlation`, :func:`cosine`, :func:`correlation_top_random` and :func:`auc`
(the pipeline's AUC with the roles swapped: the concept's values rank the unit's active samples). What is only here
is what the pipeline does not compute: :func:`auprc` with scikit-learn's tie handling, the thresholded :func:`f1`
and :func:`iou`, :func:`mad`, :func:`soft_wpmi` and the binarisation helpers.

Binary concepts are ``concepts >= concept_threshold`` (0.5 for labels and probabilities); for similarities, pass
``concept_threshold=None`` to binarise each concept at its own top ``concept_alpha`` fraction instead.

Example:
    >>> import torch
    >>> acts = torch.tensor([[3.0], [2.0], [0.0], [0.0]])    # 4 samples, 1 unit
    >>> labels = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])  # 2 concepts
    >>> [round(v, 2) for v in correlation(acts, labels)[0].tolist()]
    [0.96, -0.19]
    >>> [round(v, 4) for v in iou(acts, labels, alpha=0.5)[0].tolist()]
    [1.0, 0.3333]
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from lightning_neurons.explanation import metrics as pipeline

#: Standard deviations below this (relative to the values' scale) count as constant: correlation 0, not NaN.
_EPS = 1e-6

MetricFn = Callable[[Tensor, Tensor], Tensor]


def _check(activations: Tensor, concepts: Tensor) -> tuple[Tensor, Tensor]:
    if activations.dim() != 2 or concepts.dim() != 2 or activations.shape[0] != concepts.shape[0]:
        raise ValueError(
            f"need activations [N, U] and concepts [N, C] with the same N, got {tuple(activations.shape)} "
            f"and {tuple(concepts.shape)}"
        )
    if activations.shape[0] < 2:
        raise ValueError("a metric needs at least two samples")
    return activations.double(), concepts.double()


def binarize_top(values: Tensor, alpha: float) -> Tensor:
    """Each column's top ``alpha`` fraction of samples (at least one; ties at the cut-off included), as bool ``[N, K]``.

    Args:
        values: ``[N, K]`` values (a unit's activations, or a concept's similarities).
        alpha: Fraction in ``(0, 1]``.

    Raises:
        ValueError: If ``alpha`` is outside ``(0, 1]``.

    Example:
        >>> binarize_top(torch.tensor([[1.0], [3.0], [2.0], [0.0]]), 0.5).squeeze(1).tolist()
        [False, True, True, False]
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    k = max(1, math.ceil(round(alpha * values.shape[0], 6)))  # round: 1/3 of 9 in float32 is not 4
    cutoff = values.topk(k, dim=0).values[-1:]
    return values >= cutoff


def binarize_concepts(concepts: Tensor, threshold: float | None = 0.5, alpha: float = 0.1) -> Tensor:
    """Binary concept membership: ``concepts >= threshold``, or each column's top ``alpha`` when ``threshold`` is None.

    Example:
        >>> binarize_concepts(torch.tensor([[0.9, 0.2], [0.1, 0.3]])).tolist()
        [[True, False], [False, False]]
        >>> binarize_concepts(torch.tensor([[0.9, 0.2], [0.1, 0.3]]), None, alpha=0.5).tolist()
        [[True, False], [False, True]]
    """
    return binarize_top(concepts, alpha) if threshold is None else concepts >= threshold


def correlation(activations: Tensor, concepts: Tensor) -> Tensor:
    """Pearson correlation of every unit with every concept over the samples, ``[U, C]``.

    A constant column (a dead unit, a concept with the same value everywhere) correlates 0 with everything.

    Example:
        >>> acts = torch.tensor([[1.0], [2.0], [3.0]])
        >>> correlation(acts, torch.tensor([[2.0, 1.0], [4.0, 1.0], [6.0, 1.0]])).tolist()
        [[1.0, 0.0]]
    """
    a, c = _check(activations, concepts)
    return pipeline.correlation(a.T, c).float()


def cosine(activations: Tensor, concepts: Tensor) -> Tensor:
    """Cosine similarity of every unit's activation vector with every concept's value vector, ``[U, C]``.

    Example:
        >>> sims = cosine(torch.tensor([[1.0], [0.0]]), torch.tensor([[1.0, 1.0], [0.0, 1.0]]))
        >>> [round(v, 4) for v in sims[0].tolist()]
        [1.0, 0.7071]
    """
    a, c = _check(activations, concepts)
    return pipeline.cosine(a.T, c).float()


def auc(activations: Tensor, concepts: Tensor, *, alpha: float = 0.1) -> Tensor:
    """ROC AUC of each concept's values separating each unit's active samples (top ``alpha``) from the rest.

    Ties count one half (Mann-Whitney). A unit whose samples are all active, or none, gets 0.5.

    Example:
        >>> auc(torch.tensor([[3.0], [2.0], [1.0], [0.0]]), torch.tensor([[0.9], [0.2], [0.5], [0.1]]), alpha=0.5)
        tensor([[0.7500]])
    """
    a, c = _check(activations, concepts)
    # The pipeline's AUC ranks its first argument to find the second's positives: here the concepts rank the active.
    return pipeline.auc(c.T, binarize_top(a, alpha)).T.nan_to_num(0.5).float()


def auprc(activations: Tensor, concepts: Tensor, *, alpha: float = 0.1) -> Tensor:
    """Average precision of each concept's values as a detector of each unit's active samples (top ``alpha``).

    Tied concept values form one threshold (a step of the precision-recall curve), as scikit-learn's
    ``average_precision_score`` treats them.

    Example:
        >>> auprc(torch.tensor([[3.0], [2.0], [1.0], [0.0]]), torch.tensor([[0.9], [0.2], [0.5], [0.1]]), alpha=0.5)
        tensor([[0.8333]])
    """
    a, c = _check(activations, concepts)
    active = binarize_top(a, alpha).double()  # [N, U]
    n_act = active.sum(dim=0)  # [U]
    out = torch.empty(a.shape[1], c.shape[1], dtype=torch.float64)
    for j in range(c.shape[1]):  # one sort per concept; units vectorised
        values, order = c[:, j].sort(descending=True)
        hits = active[order]  # [N, U] in descending concept order
        tp = hits.cumsum(dim=0)
        seen = torch.arange(1, c.shape[0] + 1, dtype=torch.float64)[:, None]
        last = torch.ones(c.shape[0], dtype=torch.bool)
        last[:-1] = values[:-1] != values[1:]  # the last sample of each tie group is a threshold
        tp, seen = tp[last], seen[last]
        precision = tp / seen
        recall_step = torch.diff(tp, dim=0, prepend=torch.zeros(1, tp.shape[1], dtype=tp.dtype))
        out[:, j] = (precision * recall_step).sum(dim=0) / n_act.clamp_min(1)
    return out.float()


def _overlap(
    activations: Tensor, concepts: Tensor, alpha: float, concept_threshold: float | None, concept_alpha: float
) -> tuple[Tensor, Tensor]:
    """``[U, C]`` counts of samples both active and positive, and of active plus positive samples."""
    a, c = _check(activations, concepts)
    act = binarize_top(a, alpha).double()
    pos = binarize_concepts(c, concept_threshold, concept_alpha).double()
    return act.T @ pos, act.sum(dim=0)[:, None] + pos.sum(dim=0)[None]


def f1(
    activations: Tensor,
    concepts: Tensor,
    *,
    alpha: float = 0.1,
    concept_threshold: float | None = 0.5,
    concept_alpha: float = 0.1,
) -> Tensor:
    """F1 score between each unit's active samples (top ``alpha``) and each concept's positives, ``[U, C]``.

    Example:
        >>> f1(torch.tensor([[3.0], [2.0], [1.0], [0.0]]), torch.tensor([[1.0], [0.0], [1.0], [0.0]]), alpha=0.5)
        tensor([[0.5000]])
    """
    tp, sizes = _overlap(activations, concepts, alpha, concept_threshold, concept_alpha)
    return (2 * tp / sizes.clamp_min(1)).float()


def iou(
    activations: Tensor,
    concepts: Tensor,
    *,
    alpha: float = 0.1,
    concept_threshold: float | None = 0.5,
    concept_alpha: float = 0.1,
) -> Tensor:
    """Intersection over union of each unit's active samples (top ``alpha``) and each concept's positives.

    Example:
        >>> iou(torch.tensor([[3.0], [2.0], [1.0], [0.0]]), torch.tensor([[1.0], [0.0], [1.0], [0.0]]), alpha=0.5)
        tensor([[0.3333]])
    """
    inter, sizes = _overlap(activations, concepts, alpha, concept_threshold, concept_alpha)
    return (inter / (sizes - inter).clamp_min(1)).float()


def mad(
    activations: Tensor,
    concepts: Tensor,
    *,
    concept_threshold: float | None = 0.5,
    concept_alpha: float = 0.1,
    min_std_fraction: float = 0.1,
) -> Tensor:
    """CoSy's mean activation difference: (mean on the concept's positives - mean elsewhere) / std elsewhere.

    The denominator is floored at ``min_std_fraction`` of the unit's overall standard deviation (as
    :func:`lightning_neurons.evaluation.stats.mad`), so a unit silent outside the concept does not divide by ~0.
    A concept with no positives, or no negatives, gets 0.

    Example:
        >>> mad(torch.tensor([[3.0], [3.0], [0.0], [2.0]]), torch.tensor([[1.0], [1.0], [0.0], [0.0]])).tolist()
        [[2.0]]
    """
    a, c = _check(activations, concepts)
    pos = binarize_concepts(c, concept_threshold, concept_alpha).double()
    neg = 1.0 - pos
    n_pos, n_neg = pos.sum(dim=0), neg.sum(dim=0)  # [C]
    mean_pos = (a.T @ pos) / n_pos.clamp_min(1)[None]
    mean_neg = (a.T @ neg) / n_neg.clamp_min(1)[None]
    var_neg = ((a * a).T @ neg) / n_neg.clamp_min(1)[None] - mean_neg**2
    floor = min_std_fraction * a.std(dim=0, unbiased=False)[:, None]
    scale = activations.abs().amax(dim=0).double().clamp_min(1.0)[:, None]
    std = torch.maximum(var_neg.clamp_min(0).sqrt(), torch.maximum(floor, _EPS * scale))
    out = (mean_pos - mean_neg) / std
    empty = ((n_pos == 0) | (n_neg == 0))[None]
    return torch.where(empty, torch.zeros_like(out), out).float()


def soft_wpmi(
    activations: Tensor,
    concepts: Tensor,
    *,
    top_k: int = 20,
    temperature: float = 10.0,
    lam: float = 1.0,
    p_start: float = 0.998,
    p_end: float = 0.97,
) -> Tensor:
    """CLIP-Dissect's soft-WPMI of every unit with every concept (layer-wide: each unit's score depends on the rest).

    Per sample a softmax over the concepts (``temperature`` times the values) gives ``p(c | x)``; a unit's top
    ``top_k`` samples are soft members of its top set (membership falling linearly from ``p_start`` to ``p_end``
    with rank), so ``log p(c | unit) = sum_r log(1 - m_r (1 - p(c | x_r)))``, and the score is
    ``log p(c | unit) - lam * log mean_units p(c | unit)``.

    Example:
        >>> acts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> sims = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> s = soft_wpmi(acts, sims, top_k=1)
        >>> bool(s[0, 0] > s[0, 1]) and bool(s[1, 1] > s[1, 0])
        True
    """
    a, c = _check(activations, concepts)
    k = min(top_k, a.shape[0])
    prob = torch.softmax(temperature * c, dim=1)  # [N, C]
    top = a.topk(k, dim=0).indices.T  # [U, k]
    membership = p_start - torch.arange(k, dtype=torch.float64) / k * (p_start - p_end)  # [k]
    p_top = prob[top]  # [U, k, C]
    log_given_unit = torch.log1p(-membership[None, :, None] * (1.0 - p_top) + 1e-7).sum(dim=1)  # [U, C]
    log_prior = torch.logsumexp(log_given_unit, dim=0, keepdim=True) - math.log(a.shape[1])
    return (log_given_unit - lam * log_prior).float()


def correlation_top_random(
    activations: Tensor, concepts: Tensor, *, top_k: int = 20, n_random: int = 50, seed: int = 0
) -> Tensor:
    """Pearson correlation on each unit's ``top_k`` samples plus ``n_random`` uniformly drawn samples (shared).

    This is what a streaming recorder can afford: the top samples it keeps and its reservoir of random samples.
    A sample that is both among the top and drawn counts twice, as it would in a recorded round.

    Example:
        >>> acts = torch.arange(10.0)[:, None]
        >>> correlation_top_random(acts, 2 * acts, top_k=3, n_random=4).tolist()
        [[1.0]]
    """
    a, c = _check(activations, concepts)
    n = a.shape[0]
    k = min(top_k, n)
    generator = torch.Generator().manual_seed(seed)
    rand = torch.randperm(n, generator=generator)[: min(n_random, n)]
    idx = torch.cat([a.topk(k, dim=0).indices.T, rand[None].expand(a.shape[1], -1)], dim=1)  # [U, m]
    a_sub = a.gather(0, idx.T).T  # [U, m]
    c_sub = c[idx]  # [U, m, C]
    return pipeline.correlation(a_sub, c_sub).float()  # each unit its own samples


__all__ = [
    "MetricFn",
    "auc",
    "auprc",
    "binarize_concepts",
    "binarize_top",
    "correlation",
    "correlation_top_random",
    "cosine",
    "f1",
    "iou",
    "mad",
    "soft_wpmi",
]
