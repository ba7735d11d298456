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
from lightning_neurons.results import NO_CLEAR_CONCEPT


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
        confidence: ``[U]`` the best concept's confidence (:func:`confidence_scores`), or ``None`` when not computed.
    """

    scores: Tensor
    top_indices: Tensor
    top_values: Tensor
    auc: Tensor
    margin: Tensor
    confidence: Tensor | None = None


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


def shared_units(crop_sample: Tensor, valid: Tensor, overlap: float, chunk: int = 1024) -> Tensor:
    """Which units of a layer share their top samples: bool ``[U, U]``.

    True where two units' top-sample sets overlap by at least ``overlap`` of the smaller set (every unit shares
    with itself).

    Args:
        crop_sample: int64 ``[U, k]`` the probe sample (image) of each top slot.
        valid: bool ``[U, k]``.
        overlap: Fraction of the smaller top set the two sets must have in common.
        chunk: Rows per step (the ``[U, U]`` product is built in row blocks).

    Example:
        >>> shared_units(torch.tensor([[0, 1], [1, 0], [2, 3]]), torch.ones(3, 2, dtype=torch.bool), 0.5).tolist()
        [[True, True, False], [True, True, False], [False, False, True]]
    """
    ids = torch.where(valid, crop_sample, torch.full_like(crop_sample, -1))
    _, inverse = torch.unique(ids, return_inverse=True)
    num = int(inverse.max()) + 1 if inverse.numel() else 0
    incidence = torch.zeros(ids.shape[0], num + 1, device=ids.device)
    incidence.scatter_(1, torch.where(valid, inverse + 1, torch.zeros_like(inverse)), 1.0)
    incidence[:, 0] = 0.0  # column 0 collects the empty slots
    sizes = incidence.sum(dim=1)
    out = torch.empty(ids.shape[0], ids.shape[0], dtype=torch.bool, device=ids.device)
    for start in range(0, ids.shape[0], chunk):
        common = incidence[start : start + chunk] @ incidence.T
        smaller = torch.minimum(sizes[start : start + chunk, None], sizes[None]).clamp_min(1)
        out[start : start + chunk] = common >= overlap * smaller
    out.fill_diagonal_(True)
    return out


def shared_pairs(crop_sample: Tensor, valid: Tensor, overlap: float, max_pairs: int = 1 << 25) -> Tensor | None:
    """:func:`shared_units` as a sparse float ``[U, U]`` matrix (1 where two units share), for layers of any size.

    Built from the sparse sample incidence, so its cost is the number of unit pairs with a top sample in common,
    not ``U**2``; ``None`` when that number exceeds ``max_pairs`` (a few samples in every unit's top set).

    Example:
        >>> pairs = shared_pairs(torch.tensor([[0, 1], [1, 0], [2, 3]]), torch.ones(3, 2, dtype=torch.bool), 0.5)
        >>> pairs.to_dense().tolist()
        [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    """
    n_units, device = crop_sample.shape[0], crop_sample.device
    units = torch.arange(n_units, device=device)[:, None].expand_as(crop_sample)[valid]
    _, samples = torch.unique(crop_sample[valid], return_inverse=True)
    slots = torch.unique(torch.stack([samples, units]), dim=1)  # (sample, unit), a sample once per unit, by sample
    samples, units = slots[0], slots[1]
    holders = torch.bincount(samples) if samples.numel() else torch.zeros(0, dtype=torch.long, device=device)
    if int((holders.double() ** 2).sum()) > max_pairs:
        return None
    # Every (unit, unit) pair with a sample in common, once per common sample: each slot meets every slot of its
    # sample's group (groups are contiguous because the slots are sorted by sample).
    size = holders[samples]
    starts = (torch.cumsum(holders, 0) - holders)[samples]
    total = int(size.sum())
    first = torch.repeat_interleave(torch.arange(units.numel(), device=device), size)
    offset = torch.arange(total, device=device) - torch.repeat_interleave(torch.cumsum(size, 0) - size, size)
    left, right = units[first], units[torch.repeat_interleave(starts, size) + offset]
    keys, common = torch.unique(left * n_units + right, return_counts=True)
    rows, cols = keys // n_units, keys % n_units
    sizes = torch.bincount(units, minlength=n_units).float()
    keep = (common >= overlap * torch.minimum(sizes[rows], sizes[cols]).clamp_min(1)) | (rows == cols)
    diag = torch.arange(n_units, device=device)
    index = torch.unique(torch.cat([torch.stack([rows[keep], cols[keep]]), torch.stack([diag, diag])], dim=1), dim=1)
    ones = torch.ones(index.shape[1], device=device)
    return torch.sparse_coo_tensor(index, ones, (n_units, n_units), check_invariants=False).coalesce()


def frequency_penalty(scores: Tensor, shared: Tensor | None, weight: float) -> Tensor:
    """Penalise concepts that win across a layer: subtract ``weight`` x the concept's mean score over the other units.

    A concept that scores high for most units of a layer (a generic look of the probe: dark corners, a common
    background) then loses against the concept specific to each unit. Units that really share a concept, because
    they fire on the same samples (``shared``), are left out of each other's mean, so a concept that many units
    share on the same evidence keeps winning.

    Args:
        scores: ``[U, C]`` corrected concept scores.
        shared: ``[U, U]`` which units share (bool from :func:`shared_units`, or the sparse :func:`shared_pairs`;
            each unit shares with itself); ``None``: every unit shares only with itself.
        weight: The penalty weight (``0``: no penalty).

    Returns:
        ``[U, C]`` penalised scores.

    Example:
        >>> scores = torch.tensor([[1.0, 0.8], [1.0, 0.0], [1.0, 0.0]])  # concept 0 wins everywhere
        >>> frequency_penalty(scores, None, 1.0).argmax(dim=1).tolist()
        [1, 0, 0]
    """
    if weight == 0 or scores.shape[0] < 2:
        return scores
    values = scores.float()
    total = values.sum(dim=0, keepdim=True)
    if shared is None:
        own, counts = values, torch.ones(values.shape[0], 1, device=values.device)
    elif shared.is_sparse:
        own = torch.sparse.mm(shared.float(), values)
        counts = torch.sparse.sum(shared.float(), dim=1).to_dense()[:, None]
    else:
        own, counts = shared.float() @ values, shared.float().sum(dim=1, keepdim=True)
    others = values.shape[0] - counts  # units not sharing with this one
    mean_others = (total - own) / others.clamp_min(1)
    return scores - weight * torch.where(others > 0, mean_others, torch.zeros_like(mean_others))


def confidence_scores(
    statistic: Tensor,
    pool_sims: Tensor,
    reference: Tensor,
    k: int,
    *,
    pool_index: Tensor | None = None,
    scale: Tensor | None = None,
    samples: int = 256,
    seed: int = 0,
    chunk: int = 64,
) -> Tensor:
    """How often a unit's explanation beats the best explanation of a random set of the layer's crops.

    The best concept of a vocabulary always matches a unit's top crops better than random controls (a maximum over
    many concepts is biased upward, and even a random-weight unit has consistent low-level top crops). The null
    here is the same maximum for ``samples`` random ``k``-subsets of the layer's own top crops (and the control
    crops, whatever ``pool_sims`` holds): a unit whose best concept beats those subsets' best concepts is specific
    to its own crops. The result is an AUC in ``[0, 1]`` of the unit's statistic against that null (ties count
    one half): about 0.5 for a unit no more coherent than a random unit of its layer.

    Args:
        statistic: ``[U]`` each unit's corrected score of its chosen concept.
        pool_sims: ``[P, C]`` similarities of the crops random subsets are drawn from.
        reference: ``[C]`` what the correction subtracts from a subset's rank-weighted mean (e.g. the control mean).
        k: Crops per random subset (the layer's top-k).
        pool_index: The rows of ``pool_sims`` that form the pool (``None``: every row), so that a large layer's pool
            is never copied out of the similarity table.
        scale: ``[C]`` divides the gathered similarities (a z-scaled correction), or ``None``.
        samples: Random subsets.
        seed: Seed of the subsets.
        chunk: Subsets per step.

    Returns:
        float32 ``[U]``; NaN where the statistic is NaN or the pool is empty.

    Example:
        >>> pool = torch.tensor([[0.1, 0.2], [0.2, 0.1], [0.15, 0.15]])
        >>> confidence_scores(torch.tensor([0.9, -1.0]), pool, torch.zeros(2), 2, samples=16).tolist()
        [1.0, 0.0]
    """
    size = pool_sims.shape[0] if pool_index is None else pool_index.numel()
    if size == 0 or k < 1:
        return torch.full_like(statistic.float(), float("nan"))
    k = min(k, size)
    gen = torch.Generator().manual_seed(seed)
    weights = rank_weights(torch.ones(1, k, dtype=torch.bool))[0].to(pool_sims.device)
    chunk = max(1, min(chunk, (1 << 24) // max(1, k * pool_sims.shape[1])))  # at most 64 MiB of gathered rows
    nulls = []
    for start in range(0, samples, chunk):
        n = min(chunk, samples - start)
        if size <= 4096:  # distinct crops per subset; in a large pool repeats are rare and drawing is cheaper
            pick = torch.rand(n, size, generator=gen).argsort(dim=1)[:, :k]
        else:
            pick = torch.randint(size, (n, k), generator=gen)
        pick = pick.to(pool_sims.device)
        rows = pick if pool_index is None else pool_index.to(pool_sims.device)[pick]
        gathered = pool_sims[rows].float()
        if scale is not None:
            gathered = gathered / scale.to(gathered.device)
        agg = torch.einsum("k,bkc->bc", weights, gathered)
        nulls.append((agg - reference.float()[None]).max(dim=1).values)
    null = torch.sort(torch.cat(nulls)).values
    stat = statistic.float().to(null.device)
    below = torch.searchsorted(null, stat, right=False).float()
    upto = torch.searchsorted(null, stat, right=True).float()
    conf = (below + 0.5 * (upto - below)) / null.numel()
    return torch.where(stat == stat, conf, torch.full_like(conf, float("nan")))


def score_layer(
    crop_sims: Tensor,
    crop_index: Tensor,
    control_sims: Tensor,
    correction: Correction | CorrectionName = "control",
    num_alternatives: int = 4,
    *,
    crop_sample: Tensor | None = None,
    frequency_weight: float = 0.0,
    shared_overlap: float = 0.5,
    confidence: bool = False,
    confidence_samples: int = 256,
    confidence_pool: str = "layer",
    seed: int = 0,
    ranking: Tensor | None = None,
    **correction_options: Any,
) -> LayerScores:
    """Pick each unit's description and alternatives and score them.

    Args:
        crop_sims: ``[K, C]`` similarity of every unique crop with every concept.
        crop_index: int64 ``[U, k]`` the unique crop of each unit's top slot, best first; ``-1`` where empty.
        control_sims: ``[M, C]`` similarity of the control crops with every concept.
        correction: A correction value or its name (see :func:`concept_scores`).
        num_alternatives: Runner-up concepts to keep.
        crop_sample: int64 ``[K]`` the probe sample of each unique crop, for telling which units share their top
            samples (``None``: the unique crops themselves).
        frequency_weight: Weight of the :func:`frequency_penalty` (``0``: off).
        shared_overlap: Top-sample overlap at which two units count as sharing their concept (see
            :func:`shared_units`); only with a frequency penalty.
        confidence: Also compute each unit's :func:`confidence_scores`.
        confidence_samples: Random subsets of the confidence null.
        confidence_pool: Where the null's subsets come from: ``"layer"`` (the layer's top crops), ``"control"``
            (the control crops) or ``"both"``.
        seed: Seed of the confidence null.
        ranking: ``[U, C]`` values that rank the concepts instead of the corrected scores (e.g. the correlations of
            :mod:`~lightning_neurons.explanation.metrics`); ``top_values`` are then these values.
        **correction_options: With a name, the correction's options (see :func:`concept_scores`).

    Returns:
        A :class:`LayerScores`.
    """
    valid = crop_index >= 0
    top_sims = crop_sims[crop_index.clamp_min(0)]  # [U, k, C]
    corr = as_correction(correction, **correction_options)
    scores = corr.scores(top_sims, valid, control_sims)
    if frequency_weight:
        samples_of = crop_index if crop_sample is None else crop_sample.to(crop_index.device)[crop_index.clamp_min(0)]
        # Sparse: a layer of 100k units never builds a [U, U] matrix. Past max_pairs the sharing rule is dropped.
        scores = frequency_penalty(scores, shared_pairs(samples_of, valid, shared_overlap), frequency_weight)
    n = min(scores.shape[1], 1 + num_alternatives)
    top_values, top_indices = torch.topk(scores if ranking is None else ranking.to(scores.device), n, dim=1)
    auc, margin = separation(top_sims, valid, control_sims, top_indices[:, 0])
    conf = None
    if confidence:
        options = {"frequency_weight": frequency_weight, "pool": confidence_pool, "samples": confidence_samples}
        conf = _confidence(top_sims, valid, crop_sims, crop_index, control_sims, corr, top_indices, options, seed)
    return LayerScores(scores, top_indices, top_values, auc, margin, conf)


def _confidence(
    top_sims: Tensor,
    valid: Tensor,
    crop_sims: Tensor,
    crop_index: Tensor,
    control_sims: Tensor,
    corr: Correction,
    top_indices: Tensor,
    options: dict[str, Any],
    seed: int,
) -> Tensor:
    """The confidence of each unit's chosen concept under the control statistic (any correction picks the concept)."""
    # The statistic is the control-corrected score, whatever correction chose the concept: soft-WPMI values are
    # layer-relative log-probabilities, not comparable with a random subset's.
    control = corr if isinstance(corr, ControlCorrection) else ControlCorrection()
    base = control.scores(top_sims, valid, control_sims)
    reference = control_sims.float().mean(dim=0) if control_sims.shape[0] else torch.zeros(crop_sims.shape[1])
    weight = options["frequency_weight"]
    # Each unit pays the layer-wide penalty, like the null subsets (which share their crops with no unit).
    stat_scores = base - weight * base.mean(dim=0, keepdim=True) if weight and base.shape[0] > 1 else base
    pool_sims, pool_index = _pool(crop_sims, crop_index, valid, control_sims, options["pool"])
    std = None
    if isinstance(corr, ControlCorrection) and corr.scale == "std" and control_sims.shape[0] > 1:
        # The same z-scaling for the null subsets: divide their difference by the control deviation.
        std = control_sims.float().std(dim=0).clamp_min(1e-4)
        reference = reference / std
    if weight and base.shape[0] > 1:
        reference = reference + weight * base.float().mean(dim=0)
    statistic = stat_scores.gather(1, top_indices[:, :1]).squeeze(1)
    statistic = torch.where(valid.any(dim=1), statistic, torch.full_like(statistic, float("nan")))
    return confidence_scores(
        statistic,
        pool_sims,
        reference,
        crop_index.shape[1],
        pool_index=pool_index,
        scale=std,
        samples=options["samples"],
        seed=seed,
    )


def _pool(
    crop_sims: Tensor, crop_index: Tensor, valid: Tensor, control_sims: Tensor, pool: str
) -> tuple[Tensor, Tensor | None]:
    """The table and rows the confidence null draws from: every valid top slot of the layer and/or the controls."""
    if pool not in ("layer", "control", "both"):
        raise ValueError(f"confidence_pool must be 'layer', 'control' or 'both', got {pool!r}")
    slots = crop_index[valid]
    if pool == "layer":
        return crop_sims, slots
    if pool == "control":
        return control_sims, None
    controls = torch.arange(control_sims.shape[0], device=slots.device) + crop_sims.shape[0]
    return torch.cat([crop_sims, control_sims]), torch.cat([slots, controls])




def confident(confidence: float | None, threshold: float | None) -> bool:
    """Whether an explanation's confidence clears a threshold (``None`` confidence or threshold: no check).

    The threshold is calibrated with the model-randomisation check: the same network with random weights is
    explained like the trained one (``lightning_neurons.benchmark.randomisation_check``); a unit at or below it is
    explained no better than a random network's typical unit and is shown as :data:`NO_CLEAR_CONCEPT`.

    Example:
        >>> confident(0.97, 0.85), confident(0.62, 0.85), confident(None, 0.85)
        (True, False, True)
    """
    if threshold is None or confidence is None:
        return True
    return bool(confidence == confidence and confidence > threshold)  # NaN is never confident


def shown_description(description: str, confidence: float | None, threshold: float | None) -> str:
    """The description to display: itself, or :data:`NO_CLEAR_CONCEPT` at or below ``threshold``.

    An empty description (a unit without crops) stays empty; ``None`` confidence or threshold shows it as it is.

    Example:
        >>> shown_description("stripes", 0.55, 0.85), shown_description("stripes", 0.99, 0.85)
        ('no clear concept', 'stripes')
    """
    if not description or confident(confidence, threshold):
        return description
    return NO_CLEAR_CONCEPT


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
    "confidence_scores",
    "frequency_penalty",
    "shared_pairs",
    "shared_units",
    "mann_whitney_auc",
    "rank_weights",
    "score_layer",
    "separation",
    "similarity",
]
