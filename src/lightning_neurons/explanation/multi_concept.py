"""Multi-concept explanations: a unit as a sparse non-negative combination of up to three concepts.

Linear Explanations' idea (Oikarinen & Weng), our own code: a unit's activation over samples is predicted by a
weighted sum of the samples' image-text similarities to a few concepts, ``a ~ b + sum_j w_j * sim(x, c_j)``
with ``w_j >= 0``. Concepts are added greedily (each step adds the concept that most reduces the residual of a
non-negative least-squares fit) and the combination is kept only when, on samples it was not fitted on, its
prediction correlates with the activations better than the unit's single description does by ``margin``.

Because the prediction is linear in the text embedding, a combination acts like one text embedding,
``sum_j w_j * e_j`` (:func:`combination_embedding`), so every embedding-based metric (simulation) reads it.

The pipeline's ``multi_concept`` stage (:func:`combine_units`, ``ExplainConfig.multi_concept``) fits every unit
on what the round already holds, with no extra forward pass: the unit's own top crops (their embeddings and the
recorded activations) plus the whole reservoir images (their embeddings are the first control crops, the unit's
values on them come from the forward stage). All units of a layer are fitted at once, in chunks of units, as
batched tensor products; the greedy selection and the exact non-negative solve over at most three columns are
vectorised over the units too.

Example:
    >>> import torch
    >>> sims = torch.tensor([[1.0, 0.0, 0.2], [0.0, 1.0, 0.1], [1.0, 1.0, 0.0], [0.0, 0.0, 0.3]])
    >>> acts = 2 * sims[:, 0] + 1 * sims[:, 1]
    >>> [(i, round(w, 2)) for i, w in fit_combination(acts, sims, max_concepts=2)]
    [(0, 2.0), (1, 1.0)]
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from lightning_neurons.explanation.seeding import layer_generator
from lightning_neurons.results import Alternative, ExplanationRound, UnitExplanation

if TYPE_CHECKING:
    from lightning_neurons.explanation.settings import ExplainConfig
    from lightning_neurons.explanation.units import RoundEvidence


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


#: How every printout shows a unit without a combination.
NO_COMBINATION = "no combination"


def format_combination(combination: Sequence[Alternative] | None) -> str:
    """``"stripes (0.62) + zebra (0.38)"``: the concepts with their weights, normalised to sum to 1.

    Example:
        >>> format_combination([Alternative("stripes", 3.0), Alternative("zebra", 1.0)])
        'stripes (0.75) + zebra (0.25)'
        >>> format_combination(None)
        'no combination'
    """
    if not combination:
        return NO_COMBINATION
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


def pearson(x: Tensor, y: Tensor) -> Tensor:
    """Pearson correlation of two ``[N]`` vectors (0 for a constant one)."""
    return _weighted_pearson(x.float()[None], y.float()[None], torch.ones(1, x.numel(), device=x.device))[0]


def round_weight(weight: float) -> float:
    """Weights are reported to 4 significant digits (they are fitted on a few hundred samples)."""
    return float(f"{weight:.4g}")


# ---------------------------------------------------------------- the pipeline stage (batched over units)
#: Units fitted together in one batch (bounds the ``[units, k, concepts]`` similarity block held at once).
UNIT_CHUNK = 256

#: Fewest samples in each half of the held-out split for a unit to get a combination at all.
MIN_HALF = 4


def combine_units(
    units: Sequence[UnitExplanation],
    evidence: RoundEvidence,
    cfg: ExplainConfig,
    *,
    reduction: str = "max",
    top_crops: Literal["fit", "both", "none"] = "fit",
) -> int:
    """The pipeline's multi-concept stage: set ``combination`` on every unit whose combination is kept.

    Each unit is fitted on its own top crops (crop embeddings, recorded activations) and the whole reservoir images
    (the first control crops; the unit's value on each is the ``reduction`` of its whole map there, as the recording
    reduces its top samples' maps, whatever the map size). The reservoir images are split in two halves at random
    (seeded by ``cfg.seed``); the combination fitted on the top crops and one half is kept when its prediction
    correlates with the unit's activations on the other half better than the unit's description does by more than
    ``cfg.combination_margin``, and is then refitted on all samples. The keep decision reads whole images only, the
    samples simulation is about: on the benchmark's development split (seeds 0-2) that beat splitting the top
    crops too (``top_crops="both"``) and leaving them out (``"none"``). A description that is not one of the
    concepts (a describe-stage phrase) counts as a correlation of 0. Deterministic; every DDP rank holds the same
    evidence, so every rank computes the same combinations (no collective: the stage is a few batched products).

    Args:
        units: The round's explanations (changed in place: ``combination`` set or left ``None``).
        evidence: The round's evidence (crop embeddings, crop index, forward-stage values, concepts).
        cfg: ``max_concepts``, ``combination_margin``, ``seed``.
        reduction: How the recording reduced a map to one value per sample (``"max"`` or ``"mean"``).
        top_crops: Where the top crops go: ``"fit"`` (all into the fit, the default), ``"both"`` (split at random
            like the reservoir images) or ``"none"`` (left out).

    Returns:
        The number of units that got a combination.

    Example:
        >>> kept = combine_units(units, evidence, ExplainConfig(multi_concept=True))  # doctest: +SKIP
        >>> format_combination(units[5].combination)  # doctest: +SKIP
        'stripes (0.62) + zebra (0.38)'
    """
    crops, concepts = evidence.crops, evidence.concepts
    if crops.num_unique == 0 or len(concepts) == 0:
        return 0
    sims = evidence.similarities  # [K + M, C], the score stage's product
    device = sims.device
    top_sims = sims[: crops.num_unique]
    num_reservoir = int(evidence.forward.samples.reservoir.numel())
    reservoir_sims = sims[crops.num_unique : crops.num_unique + num_reservoir]  # whole images come first
    index = {text: i for i, text in enumerate(concepts.texts)}
    by_key = {u.key: u for u in units}
    kept = 0
    for name in evidence.forward.layers:
        lm = evidence.forward.layers[name]
        reservoir_acts = _reservoir_values(lm.reservoir_values(reduction), num_reservoir, lm.topk.num_units, device)
        crop_index = evidence.regions.crop_index[name].to(device)
        values = lm.topk.values.to(device).float()
        gen = layer_generator(cfg.seed, name, "multi_concept")  # one fixed split per layer and seed
        fit_half = torch.rand(crop_index.shape[0], crop_index.shape[1] + num_reservoir, generator=gen) < 0.5
        single = torch.tensor(
            [index.get(by_key[(name, u)].description, -1) if (name, u) in by_key else -1 for u in range(len(values))],
            dtype=torch.long,
        )
        for start in range(0, crop_index.shape[0], UNIT_CHUNK):
            rows = slice(start, start + UNIT_CHUNK)
            found = _combine_chunk(
                top_sims,
                reservoir_sims,
                crop_index[rows],
                values[rows],
                reservoir_acts[rows],
                fit_half[rows].to(device),
                single[rows].to(device),
                max_concepts=cfg.max_concepts,
                margin=cfg.combination_margin,
                top_crops=top_crops,
            )
            for row, pairs in found.items():
                unit = by_key.get((name, start + row))
                # Only a unit with a concept gets a combination ("no clear concept" beside "a (0.6) + b (0.4)"
                # would contradict itself).
                if unit is not None and unit.description and unit.kind in (None, "concept"):
                    unit.combination = [Alternative(concepts.texts[i], round_weight(w)) for i, w in pairs]
                    kept += 1
    return kept


def _reservoir_values(values: Tensor | None, num_reservoir: int, num_units: int, device: torch.device) -> Tensor:
    """``[U, R]`` each unit's value on each reservoir sample (:meth:`LayerMaps.reservoir_values`), zeros without."""
    if values is None or num_reservoir == 0 or values.shape[1] != num_reservoir:
        return torch.zeros(num_units, num_reservoir, device=device)
    return values.float().to(device)


def _combine_chunk(
    top_sims: Tensor,
    reservoir_sims: Tensor,
    crop_index: Tensor,
    top_values: Tensor,
    reservoir_values: Tensor,
    fit_half: Tensor,
    single: Tensor,
    *,
    max_concepts: int,
    margin: float,
    top_crops: Literal["fit", "both", "none"] = "fit",
) -> dict[int, list[tuple[int, float]]]:
    """Held-out fit, keep decision and refit of a chunk of units; ``{row: [(concept, weight), ...]}`` kept."""
    valid_top = crop_index >= 0
    top = top_sims[crop_index.clamp_min(0)] * valid_top[..., None]  # [B, k, C]
    acts_top = torch.where(valid_top, top_values, torch.zeros_like(top_values))
    k = crop_index.shape[1]
    valid = torch.cat([valid_top, torch.ones_like(reservoir_values, dtype=torch.bool)], dim=1)  # [B, k + R]
    if top_crops == "none":
        valid[:, :k] = False
    fit_w, check_w = (valid & fit_half).float(), (valid & ~fit_half).float()
    if top_crops == "fit":  # every top crop fits; the keep decision reads whole reservoir images only
        fit_w[:, :k], check_w[:, :k] = valid_top.float(), 0.0
    enough = (fit_w.sum(1) >= MIN_HALF) & (check_w.sum(1) >= MIN_HALF)
    data = (top, reservoir_sims, acts_top, reservoir_values)
    chosen, weights = _greedy_nnls(*data, fit_w[:, :k], fit_w[:, k:], max_concepts)
    predicted = _predict(top, reservoir_sims, chosen, weights)  # [B, k + R]
    acts = torch.cat([acts_top, reservoir_values], dim=1)
    combined = _weighted_pearson(predicted, acts, check_w)
    described = single >= 0
    single_pred = torch.cat(
        [
            top.gather(2, single.clamp_min(0)[:, None, None].expand(-1, k, 1))[..., 0],
            reservoir_sims[:, single.clamp_min(0)].T,
        ],
        dim=1,
    )
    single_corr = torch.where(described, _weighted_pearson(single_pred, acts, check_w), torch.zeros_like(combined))
    keep = enough & (weights > 0).any(1) & (combined > single_corr + margin)
    if not bool(keep.any()):
        return {}
    rows = torch.nonzero(keep).squeeze(1)
    all_w = valid[rows].float()
    chosen, weights = _greedy_nnls(
        top[rows], reservoir_sims, acts_top[rows], reservoir_values[rows], all_w[:, :k], all_w[:, k:], max_concepts
    )
    out: dict[int, list[tuple[int, float]]] = {}
    for row, idx, w in zip(rows.tolist(), chosen.tolist(), weights.tolist()):
        pairs = sorted(((i, v) for i, v in zip(idx, w) if v > 0), key=lambda p: -p[1])
        if pairs:
            out[row] = pairs
    return out


def _greedy_nnls(
    top: Tensor,
    reservoir_sims: Tensor,
    acts_top: Tensor,
    acts_res: Tensor,
    w_top: Tensor,
    w_res: Tensor,
    max_concepts: int,
) -> tuple[Tensor, Tensor]:
    """:func:`fit_combination` for a batch of units with per-unit sample weights (0/1 masks).

    Each unit ``b`` has samples ``top[b]`` (``[k, C]`` similarities, ``acts_top[b]``) and the shared reservoir
    samples (``reservoir_sims`` ``[R, C]``, ``acts_res[b]``), weighted by ``w_top[b]`` / ``w_res[b]``.

    Returns:
        ``(concepts [B, j], weights [B, j])``: the chosen concepts and their non-negative weights (0 for the
        columns a unit did not use).
    """
    batch = top.shape[0]
    n = (w_top.sum(1) + w_res.sum(1)).clamp_min(1.0)  # [B]
    mean_a = ((w_top * acts_top).sum(1) + (w_res * acts_res).sum(1)) / n
    t_top, t_res = (acts_top - mean_a[:, None]) * w_top, (acts_res - mean_a[:, None]) * w_res  # weighted target
    col_mean = (torch.einsum("bk,bkc->bc", w_top, top) + w_res @ reservoir_sims) / n[:, None]  # [B, C]
    col_sq = torch.einsum("bk,bkc->bc", w_top, top * top) + w_res @ (reservoir_sims * reservoir_sims)
    norms = (col_sq - n[:, None] * col_mean**2).clamp_min(1e-12).sqrt()
    chosen = torch.zeros(batch, 0, dtype=torch.long, device=top.device)
    weights = torch.zeros(batch, 0, device=top.device)
    active = torch.zeros(batch, 0, dtype=torch.bool, device=top.device)
    r_top, r_res = t_top, t_res  # weighted residuals (weight times residual)
    gram_rhs = None
    for _ in range(max_concepts):
        gain = (torch.einsum("bk,bkc->bc", r_top, top) + r_res @ reservoir_sims) / norms  # centring cancels
        if chosen.shape[1]:
            gain.scatter_(1, chosen, float("-inf"))
        best_gain, best = gain.max(dim=1)
        grows = best_gain > 1e-9
        if active.shape[1]:
            grows &= active[:, -1]  # a unit that stopped stays stopped
        chosen = torch.cat([chosen, best[:, None]], dim=1)
        active = torch.cat([active, grows[:, None]], dim=1)
        gram_rhs = _gram(top, reservoir_sims, chosen, w_top, w_res, t_top, t_res, n)
        weights = _nnls_small(*gram_rhs, active)
        x_top, x_res = _columns(top, reservoir_sims, chosen)
        means = col_mean.gather(1, chosen)  # [B, j]
        r_top = t_top - w_top * ((x_top - means[:, None, :]) @ weights[..., None])[..., 0]
        r_res = t_res - w_res * ((x_res - means[:, None, :]) @ weights[..., None])[..., 0]
        if not bool(grows.any()):
            break
    return chosen, weights * active


def _columns(top: Tensor, reservoir_sims: Tensor, chosen: Tensor) -> tuple[Tensor, Tensor]:
    """The chosen concepts' similarity columns: ``[B, k, j]`` on the top crops, ``[B, R, j]`` on the reservoir."""
    x_top = top.gather(2, chosen[:, None, :].expand(-1, top.shape[1], -1))
    x_res = reservoir_sims.T[chosen].transpose(1, 2)
    return x_top, x_res


def _gram(
    top: Tensor,
    reservoir_sims: Tensor,
    chosen: Tensor,
    w_top: Tensor,
    w_res: Tensor,
    t_top: Tensor,
    t_res: Tensor,
    n: Tensor,
) -> tuple[Tensor, Tensor]:
    """Weighted centred Gram matrix ``[B, j, j]`` of the chosen columns and their products with the target."""
    x_top, x_res = _columns(top, reservoir_sims, chosen)
    sums = (w_top[..., None] * x_top).sum(1) + (w_res[..., None] * x_res).sum(1)  # [B, j]
    cross = torch.einsum("bkj,bkl->bjl", w_top[..., None] * x_top, x_top)
    cross = cross + torch.einsum("brj,brl->bjl", w_res[..., None] * x_res, x_res)
    gram = cross - sums[:, :, None] * sums[:, None, :] / n[:, None, None]
    rhs = torch.einsum("bkj,bk->bj", x_top, t_top) + torch.einsum("brj,br->bj", x_res, t_res)
    return gram, rhs


def _nnls_small(gram: Tensor, rhs: Tensor, active: Tensor) -> Tensor:
    """Exact non-negative least squares over at most a few columns, batched: the best feasible subset solution.

    The optimum of a convex quadratic over the non-negative orthant is the unconstrained solution on its support,
    so among the subsets of active columns whose least-squares solution is non-negative the one with the lowest
    objective ``w' G w - 2 w' b`` is the optimum.
    """
    batch, j = rhs.shape
    scale = gram.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-12)
    eye = torch.eye(j, device=gram.device)
    best = torch.zeros(batch, j, device=gram.device)
    best_obj = torch.zeros(batch, device=gram.device)  # w = 0 is always feasible
    for mask in itertools.product((False, True), repeat=j):
        if not any(mask):
            continue
        s = torch.tensor(mask, device=gram.device)
        use = active & s  # columns of this subset the unit may use
        ok = (use == s).all(1)  # the subset only holds active columns
        outer = (s[:, None] & s[None, :]).float()
        system = gram * outer + eye * (~s).float() + 1e-9 * scale[:, None, None] * eye
        w = _solve_or_pinv(system, (rhs * s.float())[..., None])[..., 0]
        obj = (w[:, None, :] @ gram @ w[..., None])[:, 0, 0] - 2 * (w * rhs).sum(1)
        better = ok & (w >= 0).all(1) & (obj < best_obj)
        best = torch.where(better[:, None], w, best)
        best_obj = torch.where(better, obj, best_obj)
    return best


def _solve_or_pinv(system: Tensor, rhs: Tensor) -> Tensor:
    """``system⁻¹ rhs`` per batch row; a singular row falls back to the pseudo-inverse's minimum-norm solution.

    Two concepts whose similarities are (numerically) collinear on the unit's samples, as a random or tiny encoder
    gives, make the Gram system singular: the 1e-9 ridge is below float32's resolution, and ``linalg.solve`` raises
    for the whole batch. The minimum-norm least-squares solution splits the weight evenly between such concepts and
    has the same objective, so the subset search stays exact. Well-conditioned rows keep the exact solve.

    Example:
        >>> _solve_or_pinv(torch.tensor([[[1.0, 1.0], [1.0, 1.0]]]), torch.tensor([[[1.0], [1.0]]]))[0, :, 0]
        tensor([0.5000, 0.5000])
    """
    w, info = torch.linalg.solve_ex(system, rhs)
    bad = (info != 0) | ~torch.isfinite(w).all(dim=(1, 2))
    if bool(bad.any()):
        w = torch.where(bad[:, None, None], torch.linalg.pinv(system, hermitian=True) @ rhs, w)
    return w


def _predict(top: Tensor, reservoir_sims: Tensor, chosen: Tensor, weights: Tensor) -> Tensor:
    """``[B, k + R]`` each unit's combination prediction on its samples (top crops, then reservoir images)."""
    x_top, x_res = _columns(top, reservoir_sims, chosen)
    return torch.cat([(x_top @ weights[..., None])[..., 0], (x_res @ weights[..., None])[..., 0]], dim=1)


def _weighted_pearson(x: Tensor, y: Tensor, w: Tensor) -> Tensor:
    """Per-row Pearson correlation of ``x`` and ``y`` over the samples where ``w`` is 1 (0 for a constant row)."""
    n = w.sum(1).clamp_min(1.0)
    mx, my = (w * x).sum(1) / n, (w * y).sum(1) / n
    dx, dy = (x - mx[:, None]) * w, (y - my[:, None]) * w
    cov = (dx * dy).sum(1)
    den = (dx.square().sum(1) * dy.square().sum(1)).sqrt()
    return torch.where(den > 1e-12, cov / den.clamp_min(1e-12), torch.zeros_like(cov))


__all__ = [
    "combination_embedding",
    "combine_units",
    "explain_combinations",
    "fit_combination",
    "format_combination",
]
