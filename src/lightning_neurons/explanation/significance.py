"""Per-round significance and kinds: is a unit associated with a concept at all, and beyond image statistics?

Two tests per unit, with nulls built in the round itself on the unit's samples (the recording's reservoir, a
uniform sample of the probe set, plus the unit's top samples; whole images everywhere):

(a) :func:`permutation_test`: the unit's activations are permuted ``B`` times over its samples and each time the
    selection is repeated (the maximum correlation over *all* concepts), so choosing the best of ``C`` concepts is
    paid for: ``p = (1 + #{null >= observed}) / (B + 1)`` with ``observed`` the correlation of the shown
    description; :func:`benjamini_hochberg` adjusts the layer's p-values (``q``). A unit that could not be
    significant stops once the null has reached its observed value ``h`` times (:func:`sequential_stop`), with
    Besag and Clifford's ``p = h / L``; the other units' p-values are those of all ``B`` permutations.
(b) :func:`concept_gain`: cross-validated ridge regression of the activation on simple image statistics
    (:func:`image_statistics`: colour means and spreads, brightness, contrast, saturation, edge energy, a 2x2
    colour layout) against the same plus the similarity to a concept chosen inside the training folds; the gain is
    the difference of the two cross-validated correlations. Random-weight units track brightness and colour and so
    do concept similarities: (a) calls them significant, (b) does not.

:func:`unit_kinds` turns both into ``UnitExplanation.kind``: ``"dead"`` (never active), ``"unclear"``
(``q > q_threshold``), ``"low_level"`` (significant, gain ``<= gain_margin``) or ``"concept"``.

Memory: :func:`layer_significance` works on chunks of units; a chunk holds the reservoir's ``[R, C]`` similarities
once and its units' ``[units, k, C]`` of their top samples (``C`` concepts; see
:class:`~lightning_neurons.explanation.metrics.SharedSampleValues`), less than the ``[units, N, C]`` the chunk size is
bounded by, and a ``[B', units, N + C]`` block of the permutation null, each within ``budget`` floats (default
``2**24``, 64 MiB), whatever the layer's size.

Example:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> sims = torch.rand(200, 5, generator=g)
    >>> acts = torch.stack([sims[:, 2] + 0.1 * torch.rand(200, generator=g), torch.rand(200, generator=g)])
    >>> p = permutation_test(acts, sims, None, permutations=99, generator=g)
    >>> bool(p[0] <= 0.01), bool(p[1] > 0.01)
    (True, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from lightning_neurons.explanation.metrics import SharedSampleValues, correlation

_CHANNELS = ("red", "green", "blue")
_CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")

#: Names of the columns of :func:`image_statistics` (what ``UnitExplanation.low_level`` shows).
STATISTICS: tuple[str, ...] = (
    *_CHANNELS,
    *(f"{c} spread" for c in _CHANNELS),
    "brightness",
    "contrast",
    "saturation",
    "edges",
    *(f"{corner} {c}" for corner in _CORNERS for c in _CHANNELS),
)

#: How a statistic reads when the unit follows it downwards.
_OPPOSITE = {"brightness": "darkness", "saturation": "greyness", "edges": "smoothness", "contrast": "flatness"}


def image_statistics(images: Tensor, size: int = 32) -> Tensor:
    """Simple statistics of each image, ``[N, len(STATISTICS)]`` float32 (columns named by :data:`STATISTICS`).

    Args:
        images: ``[N, 3, H, W]`` uint8 in ``[0, 255]`` or float in ``[0, 1]``.
        size: Images are averaged down to ``size x size`` first (cheap, and edges at one scale).

    Example:
        >>> stats = image_statistics(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
        >>> stats.shape[1] == len(STATISTICS), float(stats.abs().sum())
        (True, 0.0)
    """
    x = images.float()
    if images.dtype == torch.uint8:
        x = x / 255.0
    if x.shape[-1] > size or x.shape[-2] > size:
        x = F.adaptive_avg_pool2d(x, size)
    means = x.mean(dim=(2, 3))
    spreads = x.flatten(2).std(dim=2, unbiased=False)
    lum = x.mean(dim=1)  # brightness: the mean of the channels
    high, low = x.amax(dim=1), x.amin(dim=1)
    saturation = ((high - low) / high.clamp_min(1e-3)).mean(dim=(1, 2))
    dx = (lum[:, :, 1:] - lum[:, :, :-1]).abs().mean(dim=(1, 2))
    dy = (lum[:, 1:, :] - lum[:, :-1, :]).abs().mean(dim=(1, 2))
    layout = F.adaptive_avg_pool2d(x, 2).permute(0, 2, 3, 1).reshape(x.shape[0], 12)  # corner-major, then channel
    columns = [means, spreads, lum.mean(dim=(1, 2))[:, None], lum.flatten(1).std(dim=1, unbiased=False)[:, None]]
    return torch.cat([*columns, saturation[:, None], (dx + dy)[:, None], layout], dim=1)


def statistic_name(index: int, sign: float) -> str:
    """The readable name of statistic ``index``, for a unit that follows it up (``sign >= 0``) or down.

    Example:
        >>> statistic_name(6, 1.0), statistic_name(6, -1.0), statistic_name(0, -1.0)
        ('brightness', 'darkness', 'less red')
    """
    name = STATISTICS[index]
    if sign >= 0:
        return name
    return _OPPOSITE.get(name, f"less {name}")


def benjamini_hochberg(p_values: Tensor) -> Tensor:
    """Benjamini-Hochberg adjusted p-values (q-values) of ``[U]`` p-values; NaN entries are left out and stay NaN.

    Example:
        >>> [round(q, 4) for q in benjamini_hochberg(torch.tensor([0.01, 0.04, 0.03, float("nan")])).tolist()]
        [0.03, 0.04, 0.04, nan]
    """
    p = p_values.double()
    out = torch.full_like(p, float("nan"))
    finite = torch.nonzero(~torch.isnan(p)).squeeze(1)
    m = finite.numel()
    if m == 0:
        return out.to(p_values.dtype)
    ordered, order = torch.sort(p[finite])
    scaled = ordered * m / torch.arange(1, m + 1, dtype=torch.float64)
    q = torch.flip(torch.cummin(torch.flip(scaled, [0]), 0).values, [0]).clamp(max=1.0)
    out[finite[order]] = q
    return out.to(p_values.dtype)


def _pearson_rows(x: Tensor, y: Tensor, w: Tensor) -> Tensor:
    """Per-row weighted Pearson correlation of ``x`` and ``y`` ``[U, N]`` (0 for a constant row)."""
    return correlation(x, y[..., None], w)[..., 0] if y.dim() == 2 and x.shape == y.shape else correlation(x, y, w)


def _centred(a: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    n = w.sum(1, keepdim=True).clamp_min(1.0)
    ma = (w * a).sum(1, keepdim=True) / n
    da = (a - ma) * w
    return da, (da * (a - ma)).sum(1), n


def permutation_test(
    activations: Tensor,
    concepts: Tensor | SharedSampleValues,
    weights: Tensor | None,
    *,
    permutations: int = 200,
    generator: torch.Generator | None = None,
    observed: Tensor | None = None,
    budget: int = 1 << 24,
    stop_after: int | None = None,
) -> Tensor:
    """Permutation p-value of each unit's best correlation with any concept, the selection repeated under the null.

    With ``stop_after = h`` a unit stops being permuted once its null has reached the observed value ``h`` times,
    after ``L`` permutations, and its p-value is Besag and Clifford's sequential ``h / L`` (1991): a unit that is
    clearly not significant costs a few dozen permutations instead of ``B``. The permutations of the units that go
    on are the ones they get without stopping (every block's random numbers are drawn for all units), so their
    p-values stay ``(1 + #{null >= observed}) / (B + 1)``, all below every stopped unit's (at most ``h / (B + 1)``
    against at least ``h / B``).

    Args:
        activations: ``[U, N]``.
        concepts: ``[N, C]`` or ``[U, N, C]`` similarities (or :class:`SharedSampleValues`).
        weights: ``[U, N]`` 0/1 sample mask (``None``: all samples); activations are permuted among a unit's samples.
        permutations: ``B``, permutations per unit.
        generator: CPU generator of the permutations.
        observed: ``[U]`` the observed statistic (default: the maximum correlation over concepts).
        budget: Floats held by one block of the null, ``B' x U x (N + C)`` (bounds memory).
        stop_after: ``h``, exceedances after which a unit stops (``None``: every unit gets all ``B``).

    Returns:
        float32 ``[U]`` p-values; NaN for a constant unit.

    Example:
        >>> sims = torch.eye(4).repeat(10, 1)  # 40 samples, 4 concepts
        >>> acts = sims[:, 1][None] * 3.0
        >>> permutation_test(acts, sims, None, permutations=49, generator=torch.Generator().manual_seed(0)).tolist()
        [0.019999999552965164]
    """
    a = activations.float()
    units, n = a.shape
    w = torch.ones_like(a) if weights is None else weights.float()
    x = SharedSampleValues.of(concepts, units).float()
    if observed is None:
        observed = correlation(a, x, w).max(dim=1).values
    da, var_a, count = _centred(a, w)
    mx = x.products(w) / count
    var_x = (x.square().products(w) - count * mx.square()).clamp_min(0)
    den = (var_a[:, None] * var_x).sqrt()  # [U, C]
    scale = torch.where(den > 1e-12, 1.0 / den.clamp_min(1e-30), torch.zeros_like(den))
    valid = w > 0
    positions = torch.arange(n, device=a.device).expand(units, n)
    slots = torch.argsort(torch.where(valid, positions, positions + n), dim=1)  # valid positions first, in order
    block = max(1, budget // max(1, units * (n + x.num_concepts)))
    # Units stop between steps of a block: small steps stop them sooner, at the cost of more, smaller products.
    step = block if stop_after is None else max(1, min(block, _STOP_STEP))
    limit = permutations + 1 if stop_after is None else stop_after  # exceedances that stop a unit (never: B + 1)
    exceed = torch.zeros(units, device=a.device)
    stopped_at = torch.zeros(units, device=a.device)  # permutations run when the unit stopped; 0 while it goes on
    going = torch.arange(units, device=a.device)
    for start in range(0, permutations, block):
        b = min(block, permutations - start)
        keys = torch.rand(b, units, n, generator=generator).to(a.device)
        keys = torch.where(valid[None], keys, torch.full_like(keys, 2.0))
        for offset in range(0, b, step):
            if going.numel() == 0:
                break
            every = going.numel() == units
            part = keys[offset : offset + step] if every else keys[offset : offset + step, going]
            order = torch.argsort(part, dim=2)  # a random order of each unit's valid positions, then the others
            shuffled = torch.zeros_like(part).scatter_(
                2, slots[going][None].expand(part.shape[0], -1, -1), da[going][None].expand_as(part).gather(2, order)
            )
            values = x if every else x.subset(going)
            null = (values.products(shuffled) * scale[going][None]).amax(dim=2)  # [step, going]
            hits = (null >= observed[going][None] - 1e-6).float()
            running = exceed[going][None] + hits.cumsum(0)
            reached = running >= limit
            done = reached.any(0)
            exceed[going] = running[-1]
            if bool(done.any()):
                first = reached.float().argmax(0)  # the permutation that brought the h-th exceedance
                stopped_at[going[done]] = (start + offset + first[done] + 1).float()
                going = going[~done]
    p = torch.where(stopped_at > 0, limit / stopped_at.clamp_min(1.0), (1.0 + exceed) / (permutations + 1.0))
    return torch.where(var_a > 1e-12 * count[:, 0], p, torch.full_like(p, float("nan")))


#: Permutations between the points where :func:`permutation_test` lets units stop (with ``stop_after``).
_STOP_STEP = 25

#: Fewest exceedances before a unit may stop (:func:`sequential_stop`): Besag and Clifford's ``h / L`` is then
#: within about a third of the p-value it estimates.
MIN_STOP_EXCEEDANCES = 10


def sequential_stop(permutations: int, q_threshold: float) -> int | None:
    """The ``stop_after`` of a layer's :func:`permutation_test`: units stop only where no q-value could be significant.

    A unit that stops has ``p >= h / B``, and so ``q >= p``, at least twice ``q_threshold``: stopping decides no
    unit's kind, and every q-value below ``h / B`` is the one all ``B`` permutations give (see
    :func:`permutation_test`). ``None`` (no stopping) where ``h`` would not be below ``B``.

    Example:
        >>> sequential_stop(200, 0.05), sequential_stop(200, 0.6), sequential_stop(20, 0.05)
        (21, None, 10)
    """
    stop = max(MIN_STOP_EXCEEDANCES, math.floor(2 * q_threshold * permutations) + 1)
    return stop if stop < permutations else None


def _standardise(values: Tensor, w: Tensor) -> Tensor:
    """Columns of ``[U, N, F]`` scaled to zero mean and unit variance over each unit's weighted samples."""
    n = w.sum(1).clamp_min(1.0)[:, None, None]
    mean = (w[..., None] * values).sum(1, keepdim=True) / n
    var = (w[..., None] * (values - mean).square()).sum(1, keepdim=True) / n
    return (values - mean) / var.sqrt().clamp_min(1e-6)


def _ridge_predict(design: Tensor, target: Tensor, train: Tensor, alpha: float) -> Tensor:
    """Fit ``target ~ 1 + design`` on the ``train`` samples of each unit (ridge, intercept free); predict all."""
    ones = torch.ones_like(design[..., :1])
    d = torch.cat([ones, design], dim=2)  # [U, N, P]
    dw = d * train[..., None]
    gram = dw.transpose(1, 2) @ d
    penalty = torch.eye(d.shape[2], device=d.device) * alpha * train.sum(1).clamp_min(1.0)[:, None, None]
    penalty[:, 0, 0] = 0.0
    rhs = (dw * target[..., None]).sum(1)
    eye = 1e-6 * torch.eye(d.shape[2], device=d.device)
    beta = torch.linalg.solve(gram + penalty + eye, rhs[..., None])
    return (d @ beta)[..., 0]


def concept_gain(
    activations: Tensor,
    concepts: Tensor | SharedSampleValues,
    weights: Tensor,
    statistics: Tensor,
    folds: Tensor,
    *,
    num_folds: int = 5,
    alpha: float = 0.1,
) -> tuple[Tensor, Tensor, Tensor]:
    """Cross-validated correlation a concept adds to image statistics in predicting each unit's activations.

    For each fold the concept is chosen on the training samples (the highest correlation with the activations),
    then ridge regressions of the activations on the statistics and on the statistics plus that concept's similarity
    are fitted there and predict the fold's samples; the out-of-fold predictions of all folds are correlated with
    the activations.

    Args:
        activations: ``[U, N]``.
        concepts: ``[U, N, C]`` (or ``[N, C]``) similarities (or :class:`SharedSampleValues`).
        weights: ``[U, N]`` 0/1 sample mask.
        statistics: ``[U, N, F]`` (or ``[N, F]``) image statistics of the samples.
        folds: int64 ``[U, N]`` (or ``[N]``) fold of each sample, in ``[0, num_folds)``.
        num_folds: Number of folds.
        alpha: Ridge penalty per training sample on the standardised columns.

    Returns:
        ``(gain, cv_statistics, cv_both)``, float32 ``[U]`` each: ``gain = cv_both - cv_statistics``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> stats, sims = torch.rand(300, 3, generator=g), torch.rand(300, 4, generator=g)
        >>> acts = torch.stack([stats[:, 0], sims[:, 1]])  # one tracks a statistic, one a concept
        >>> gain, _, _ = concept_gain(acts, sims, torch.ones(2, 300), stats, torch.arange(300) % 5)
        >>> [round(abs(v), 1) for v in gain.tolist()]
        [0.0, 0.9]
    """
    a = activations.float()
    units = a.shape[0]
    w = weights.float()
    x = SharedSampleValues.of(concepts, units).float()
    s = statistics.float() if statistics.dim() == 3 else statistics.float()[None].expand(units, -1, -1)
    f = folds if folds.dim() == 2 else folds[None].expand(units, -1)
    s = _standardise(s, w)
    base = torch.zeros_like(a)
    both = torch.zeros_like(a)
    for fold in range(num_folds):
        test = (f == fold).float() * w
        train = (f != fold).float() * w
        if not bool((test.sum(1) > 0).any()):
            continue
        chosen = correlation(a, x, train).argmax(dim=1)  # the concept is chosen inside the training folds
        column = _standardise(x.column(chosen)[..., None], train)
        base += test * _ridge_predict(s, a, train, alpha)
        both += test * _ridge_predict(torch.cat([s, column], dim=2), a, train, alpha)
    cv_base = correlation(a, base[..., None], w)[:, 0]
    cv_both = correlation(a, both[..., None], w)[:, 0]
    return cv_both - cv_base, cv_base, cv_both


def low_level_statistic(activations: Tensor, statistics: Tensor, weights: Tensor) -> list[str]:
    """The name of the statistic most correlated (either sign) with each unit's activations.

    Example:
        >>> stats = torch.rand(50, len(STATISTICS), generator=torch.Generator().manual_seed(0))
        >>> low_level_statistic(-stats[:, 6][None], stats, torch.ones(1, 50))
        ['darkness']
    """
    corr = correlation(activations.float(), statistics.float(), weights.float())
    # A whole-image statistic reads better than a corner's: a corner wins only by a clear margin.
    whole = len(STATISTICS) - 12
    strength = corr.abs() - torch.cat([torch.zeros(whole), torch.full((corr.shape[1] - whole,), 0.05)]).to(corr.device)
    best = strength.argmax(dim=1)
    signs = corr.gather(1, best[:, None])[:, 0]
    return [statistic_name(i, s) for i, s in zip(best.tolist(), signs.tolist())]


def unit_kinds(dead: Tensor, q_values: Tensor, gain: Tensor, q_threshold: float, gain_margin: float) -> list[str]:
    """Each unit's kind: ``"dead"``, ``"unclear"`` (``q > q_threshold`` or untested), ``"low_level"`` or ``"concept"``.

    Example:
        >>> unit_kinds(torch.tensor([True, False, False, False]), torch.tensor([0.0, 0.2, 0.01, 0.01]),
        ...            torch.tensor([0.0, 0.3, 0.01, 0.2]), 0.05, 0.05)
        ['dead', 'unclear', 'low_level', 'concept']
    """
    out = []
    for is_dead, q, g in zip(dead.tolist(), q_values.tolist(), gain.tolist()):
        if is_dead:
            out.append("dead")
        elif not q <= q_threshold:  # NaN (untested) is not significant
            out.append("unclear")
        elif not g > gain_margin:
            out.append("low_level")
        else:
            out.append("concept")
    return out


@dataclass(frozen=True)
class LayerSignificance:
    """Scores and tests of one layer's units (``[U]`` each, CPU).

    Args:
        correlations: ``[U, C]`` correlation of each unit's activations with each concept's similarity.
        p_values: Permutation p-values (NaN for dead or constant units).
        q_values: Benjamini-Hochberg q-values over the layer.
        gain: Cross-validated correlation the concept adds beyond the image statistics.
        low_level: The statistic that follows each unit best.
        dead: Units never active on their samples.
        samples: Samples each unit was tested on.
        kinds: Each unit's kind (:func:`unit_kinds`).
    """

    correlations: Tensor
    p_values: Tensor
    q_values: Tensor
    gain: Tensor
    low_level: list[str]
    dead: Tensor
    samples: Tensor
    kinds: list[str]


@dataclass(frozen=True)
class UnitSamples:
    """One layer's units and their samples: the reservoir (shared) and each unit's own top samples.

    Args:
        reservoir_ids: int64 ``[R]`` probe ids of the reservoir samples.
        reservoir_values: ``[U, R]`` each unit's value on them.
        reservoir_rows: int64 ``[R]`` their rows in ``sims`` / ``statistics``.
        top_ids: int64 ``[U, k]`` each unit's top sample ids (``-1`` where empty).
        top_values: ``[U, k]`` its values on them.
        top_rows: int64 ``[U, k]`` their rows in ``sims`` / ``statistics`` (any value where empty).
    """

    reservoir_ids: Tensor
    reservoir_values: Tensor
    reservoir_rows: Tensor
    top_ids: Tensor
    top_values: Tensor
    top_rows: Tensor

    def chunk(
        self, rows: slice | Tensor, sims: Tensor, statistics: Tensor
    ) -> tuple[Tensor, Tensor, SharedSampleValues, Tensor, Tensor]:
        """``(activations [u, N], weights [u, N], sims [u, N, C], statistics [u, N, F], ids [u, N])`` of some units.

        A top sample that is also in the reservoir is counted once (its top slot gets weight 0). The similarities
        keep the reservoir's rows once (:class:`~lightning_neurons.explanation.metrics.SharedSampleValues`).
        """
        top_ids = self.top_ids[rows]
        u = top_ids.shape[0]
        r = self.reservoir_ids.numel()
        top_ok = (top_ids >= 0) & ~torch.isin(top_ids, self.reservoir_ids)
        acts = torch.cat([self.reservoir_values[rows].float(), self.top_values[rows].float()], dim=1)
        weights = torch.cat([torch.ones(u, r, device=top_ok.device), top_ok.float()], dim=1)
        acts = acts * (weights > 0)
        top_rows = self.top_rows[rows].clamp_min(0)
        x = SharedSampleValues(sims[self.reservoir_rows], sims[top_rows])
        s = torch.cat([statistics[self.reservoir_rows][None].expand(u, -1, -1), statistics[top_rows]], dim=1)
        ids = torch.cat([self.reservoir_ids[None].expand(u, -1), top_ids], dim=1)
        return acts, weights, x, s, ids


def layer_significance(
    samples: UnitSamples,
    sims: Tensor,
    statistics: Tensor,
    *,
    folds: Tensor,
    num_folds: int,
    permutations: int,
    generator: torch.Generator,
    alpha: float = 0.1,
    q_threshold: float = 0.05,
    gain_margin: float = 0.05,
    chosen: Tensor | None = None,
    budget: int = 1 << 24,
) -> LayerSignificance:
    """Correlations, permutation test, BH, concept gain and low-level statistic of every unit of a layer.

    Args:
        samples: The layer's units and their samples.
        sims: ``[S, C]`` whole-image similarity of every sample row with every concept.
        statistics: ``[S, F]`` :func:`image_statistics` of every sample row.
        folds: int64 ``[S]`` cross-validation fold of every sample row (from its probe id, see
            :func:`~lightning_neurons.explanation.seeding.hashed_folds`).
        num_folds: Number of folds.
        permutations: Permutations per unit (``0``: no test, p-values NaN).
        generator: The layer's generator of permutations.
        alpha: Ridge penalty.
        q_threshold: False discovery rate of :func:`unit_kinds`.
        gain_margin: Concept gain a significant unit needs to be kind ``"concept"``.
        chosen: int64 ``[U]`` each unit's shown concept, whose correlation is tested against the null of the best
            of all concepts (``None``: the best concept by correlation, the selection the null repeats).
        budget: Floats held by a chunk's ``[units, N, C]`` similarities and by a block of the null.
    """
    units = samples.top_ids.shape[0]
    n = samples.reservoir_ids.numel() + samples.top_ids.shape[1]
    c = sims.shape[1]
    step = max(1, budget // max(1, n * (c + statistics.shape[1])))
    parts: dict[str, list] = {key: [] for key in ("corr", "p", "gain", "low", "dead", "n")}
    for start in range(0, units, step):
        rows = slice(start, start + step)
        acts, w, x, s, _ = samples.chunk(rows, sims, statistics)
        fold = _fold_rows(samples, rows, folds)
        corr = correlation(acts, x, w)
        observed = None if chosen is None else corr.gather(1, chosen[rows].to(corr.device)[:, None])[:, 0]
        valid_max = torch.where(w > 0, acts, torch.full_like(acts, -float("inf"))).amax(1)
        valid_min = torch.where(w > 0, acts, torch.full_like(acts, float("inf"))).amin(1)
        dead = ~(valid_max > 0) | ~(valid_max - valid_min > 1e-6 * valid_max.abs().clamp_min(1e-6))
        if permutations > 0:
            p = permutation_test(
                acts,
                x,
                w,
                permutations=permutations,
                generator=generator,
                observed=observed,
                budget=budget,
                stop_after=sequential_stop(permutations, q_threshold),
            )
        else:
            p = torch.full((acts.shape[0],), float("nan"))
        p = torch.where(dead.to(p.device), torch.full_like(p, float("nan")), p)
        gain, _, _ = concept_gain(acts, x, w, s, fold, num_folds=num_folds, alpha=alpha)
        parts["corr"].append(corr.cpu())
        parts["p"].append(p.cpu())
        parts["gain"].append(gain.cpu())
        parts["low"].extend(low_level_statistic(acts, s, w))
        parts["dead"].append(dead.cpu())
        parts["n"].append(w.sum(1).cpu())
    p_all = torch.cat(parts["p"]) if parts["p"] else torch.empty(0)
    q_all = benjamini_hochberg(p_all)
    gain_all = torch.cat(parts["gain"]) if parts["gain"] else torch.empty(0)
    dead_all = torch.cat(parts["dead"]) if parts["dead"] else torch.empty(0, dtype=torch.bool)
    return LayerSignificance(
        correlations=torch.cat(parts["corr"]) if parts["corr"] else torch.empty(0, c),
        p_values=p_all,
        q_values=q_all,
        gain=gain_all,
        low_level=parts["low"],
        dead=dead_all,
        samples=torch.cat(parts["n"]) if parts["n"] else torch.empty(0),
        kinds=unit_kinds(dead_all, q_all, gain_all, q_threshold, gain_margin),
    )


def _fold_rows(samples: UnitSamples, rows: slice, folds: Tensor) -> Tensor:
    """``[u, N]`` fold of each of the chunk's samples."""
    top_rows = samples.top_rows[rows].clamp_min(0)
    reservoir = folds[samples.reservoir_rows][None].expand(top_rows.shape[0], -1)
    return torch.cat([reservoir, folds[top_rows]], dim=1)


__all__ = [
    "STATISTICS",
    "LayerSignificance",
    "UnitSamples",
    "benjamini_hochberg",
    "concept_gain",
    "image_statistics",
    "low_level_statistic",
    "permutation_test",
    "sequential_stop",
    "statistic_name",
    "layer_significance",
    "unit_kinds",
]
