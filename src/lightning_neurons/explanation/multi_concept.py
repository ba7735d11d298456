"""Multi-concept explanations: a unit as a sparse non-negative combination of up to three concepts.

Linear Explanations' idea (Oikarinen & Weng), our own code: a unit's activation over samples is predicted by a
weighted sum of the samples' image-text similarities to a few concepts, ``a ~ b + sum_j w_j * sim(x, c_j)``
with ``w_j >= 0``. Concepts are added greedily (each step adds the concept that most reduces the residual of a
non-negative least-squares fit) and the combination is kept only when, on samples it was not fitted on, its
prediction correlates with the activations better than the unit's single description does by ``margin``.

Because the prediction is linear in the text embedding, a combination acts like one text embedding,
``sum_j w_j * e_j`` (:func:`combination_embedding`), so every embedding-based metric (simulation) reads it.

Example:
    >>> import torch
    >>> sims = torch.tensor([[1.0, 0.0, 0.2], [0.0, 1.0, 0.1], [1.0, 1.0, 0.0], [0.0, 0.0, 0.3]])
    >>> acts = 2 * sims[:, 0] + 1 * sims[:, 1]
    >>> [(i, round(w, 2)) for i, w in fit_combination(acts, sims, max_concepts=2)]
    [(0, 2.0), (1, 1.0)]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_neurons.evaluation.stats import pearson
from lightning_neurons.results import Alternative, ExplanationRound


def _nnls(design: Tensor, target: Tensor, iterations: int = 200) -> Tensor:
    """Non-negative least squares for a few columns (projected gradient; columns are centred, no intercept)."""
    gram = design.T @ design
    step = 1.0 / float(torch.linalg.matrix_norm(gram, ord=2).clamp_min(1e-12))
    rhs = design.T @ target
    weights = torch.linalg.lstsq(gram + 1e-6 * torch.eye(len(gram)), rhs[:, None]).solution[:, 0].clamp_min(0)
    for _ in range(iterations):
        weights = (weights - step * (gram @ weights - rhs)).clamp_min(0)
    return weights


def fit_combination(activations: Tensor, similarities: Tensor, *, max_concepts: int = 3) -> list[tuple[int, float]]:
    """Greedy sparse non-negative fit of a unit's activations by concept similarities.

    Args:
        activations: ``[N]`` values of the unit on ``N`` samples.
        similarities: ``[N, C]`` image-text similarity of each sample with each candidate concept.
        max_concepts: Largest number of concepts in the combination.

    Returns:
        ``[(concept index, weight), ...]``, heaviest first; empty for a constant unit.

    Example:
        >>> fit_combination(torch.tensor([0.0, 1.0]), torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
        [(0, 1.0)]
    """
    target = activations.float() - activations.float().mean()
    if float(target.norm()) == 0.0:
        return []
    centred = similarities.float() - similarities.float().mean(0, keepdim=True)
    norms = centred.norm(dim=0).clamp_min(1e-12)
    chosen: list[int] = []
    weights = torch.empty(0)
    residual = target
    for _ in range(max_concepts):
        gain = (centred.T @ residual) / norms  # only concepts whose positive weight would reduce the residual
        if chosen:
            gain[chosen] = -float("inf")
        best = int(gain.argmax())
        if float(gain[best]) <= 0:
            break
        chosen.append(best)
        weights = _nnls(centred[:, chosen], target)
        residual = target - centred[:, chosen] @ weights
    pairs = [(i, float(w)) for i, w in zip(chosen, weights.tolist()) if w > 0]
    return sorted(pairs, key=lambda p: -p[1])


def combination_embedding(pairs: Sequence[tuple[int, float]], concept_embeddings: Tensor) -> Tensor:
    """The text embedding ``sum_j w_j * e_j`` that predicts like the combination (``[D]``).

    Example:
        >>> combination_embedding([(1, 2.0)], torch.eye(2)).tolist()
        [0.0, 2.0]
    """
    out = torch.zeros(concept_embeddings.shape[1])
    for index, weight in pairs:
        out += weight * concept_embeddings[index].float()
    return out


def format_combination(combination: Sequence[Alternative]) -> str:
    """``"stripes (0.62) + zebra (0.38)"``: the concepts with their weights, normalised to sum to 1.

    Example:
        >>> format_combination([Alternative("stripes", 3.0), Alternative("zebra", 1.0)])
        'stripes (0.75) + zebra (0.25)'
    """
    total = sum(max(a.score, 0.0) for a in combination) or 1.0
    return " + ".join(f"{a.text} ({a.score / total:.2f})" for a in combination)


def explain_combinations(
    round: ExplanationRound,
    layer: str,
    activations: Tensor,
    image_embeddings: Tensor,
    concepts: Sequence[str],
    concept_embeddings: Tensor,
    *,
    max_concepts: int = 3,
    margin: float = 0.05,
    seed: int = 0,
) -> dict[int, list[Alternative]]:
    """Fit a combination per unit of ``layer`` and keep the ones that simulate held-out samples better.

    The samples are split in two at random: the combination is fitted on one half and both it and the unit's
    description are scored (Pearson correlation of prediction and activation) on the other. A combination is
    kept when it beats the description there by more than ``margin``; it is then refitted on all samples.

    Args:
        round: The explained round (its descriptions are the single-concept reference).
        layer: The layer whose units to fit.
        activations: ``[N, U]`` unit values on ``N`` samples (unit ``u`` in column ``u``).
        image_embeddings: ``[N, D]`` L2-normalised embeddings of those samples.
        concepts: Candidate concept texts.
        concept_embeddings: ``[C, D]`` their L2-normalised embeddings.
        max_concepts: Largest combination.
        margin: Held-out correlation the combination must gain over the description.
        seed: Seed of the split.

    Returns:
        ``{unit: [Alternative(concept, weight), ...]}`` for the units whose combination was kept.

    Raises:
        ValueError: If the shapes do not agree or there are fewer than 8 samples.

    Example:
        >>> kept = explain_combinations(rnd, "layer3", acts, images, texts, text_embs)  # doctest: +SKIP
        >>> format_combination(kept[5])  # doctest: +SKIP
        'stripes (0.62) + zebra (0.38)'
    """
    n = activations.shape[0]
    if image_embeddings.shape[0] != n or concept_embeddings.shape[0] != len(concepts) or n < 8:
        raise ValueError(
            f"need >= 8 samples with one embedding each and one embedding per concept, got activations "
            f"{tuple(activations.shape)}, images {tuple(image_embeddings.shape)}, {len(concepts)} concepts and "
            f"embeddings {tuple(concept_embeddings.shape)}"
        )
    index = {text: i for i, text in enumerate(concepts)}
    sims = image_embeddings.float() @ concept_embeddings.float().T  # [N, C]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    fit, check = order[: n // 2], order[n // 2 :]
    kept: dict[int, list[Alternative]] = {}
    for unit in round.layer(layer):
        acts = activations[:, unit.unit].float()
        pairs = fit_combination(acts[fit], sims[fit], max_concepts=max_concepts)
        if not pairs:
            continue
        predicted = sims[check] @ combination_embedding(pairs, torch.eye(len(concepts)))
        combined = float(pearson(acts[check], predicted))
        single_index = index.get(unit.description)  # a describe-stage phrase outside the concepts counts as 0
        single = 0.0 if single_index is None else float(pearson(acts[check], sims[check, single_index]))
        if combined > single + margin:
            final = fit_combination(acts, sims, max_concepts=max_concepts)
            kept[unit.unit] = [Alternative(concepts[i], round_weight(w)) for i, w in final]
    return kept


def round_weight(weight: float) -> float:
    """Weights are reported to 4 significant digits (they are fitted on a few hundred samples)."""
    return float(f"{weight:.4g}")


__all__ = [
    "combination_embedding",
    "explain_combinations",
    "fit_combination",
    "format_combination",
]
