"""Explanation metrics: how well a concept's image-text similarity agrees with a unit's activations.

Every function compares ``U`` units with ``C`` concepts at once over ``N`` probe samples, with no Python loop over
units: ``activations`` is ``[U, N]`` (unit ``u``'s value on sample ``n``), ``concepts`` is ``[N, C]`` (the same
samples for every unit) or ``[U, N, C]`` (each unit its own samples), and the result is ``[U, C]``.

NeuronEval (Oikarinen, Yan, Weng, ICML 2025) checks metrics with a missing-labels and an extra-labels test: of
these, :func:`correlation`, :func:`cosine` and :func:`auprc` pass both, :func:`auc` and :func:`wpmi` fail them.
The explanation's headline score ``UnitExplanation.score`` is :func:`correlation` over a uniformly sampled probe set
(the recording's reservoir) plus the unit's top samples; the old AUC is kept as ``UnitExplanation.auc``.

Example:
    >>> import torch
    >>> acts = torch.tensor([[0.0, 1.0, 2.0, 3.0]])          # 1 unit, 4 samples
    >>> sims = torch.tensor([[0.1, 0.4], [0.2, 0.3], [0.3, 0.2], [0.4, 0.1]])  # 2 concepts
    >>> correlation(acts, sims).round(decimals=3).tolist()
    [[1.0, -1.0]]
    >>> auc(acts, sims > 0.25).tolist()
    [[1.0, 0.0]]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SharedSampleValues:
    """``[U, N, C]`` values whose first ``R`` samples are the same rows for every unit, stored without repeating them.

    A layer's units are tested on the reservoir (the same ``R`` samples for all) and their own top samples: the
    ``[U, N, C]`` similarities are ``R`` shared rows ``[R, C]`` then ``[U, k, C]`` rows of each unit. Every sum over
    samples is then one matrix product with the shared rows plus a small batched one, and the repeated rows are
    never materialised (on a 256-unit layer with 192 reservoir images and 16 top samples, 13x less memory).

    Args:
        shared: ``[R, C]`` the rows every unit has, first.
        own: ``[U, k, C]`` each unit's own rows, after them.

    Example:
        >>> values = SharedSampleValues(torch.rand(5, 3), torch.rand(2, 4, 3))
        >>> a = torch.rand(2, 9)
        >>> torch.allclose(values.products(a), torch.einsum("un,unc->uc", a, values.dense()))
        True
    """

    shared: Tensor
    own: Tensor

    @classmethod
    def of(cls, concepts: Tensor | SharedSampleValues, units: int) -> SharedSampleValues:
        """``[N, C]`` (shared by all units), ``[U, N, C]`` (each its own) or already split values, split."""
        if isinstance(concepts, SharedSampleValues):
            return concepts
        if concepts.dim() == 2:
            return cls(concepts, concepts.new_empty(units, 0, concepts.shape[1]))
        own = _per_unit(concepts, units)  # checks the shape
        return cls(own.new_empty(0, own.shape[2]), own)

    @property
    def num_concepts(self) -> int:
        """``C``."""
        return int(self.shared.shape[1])

    def float(self) -> SharedSampleValues:
        """The values in float32."""
        return SharedSampleValues(self.shared.float(), self.own.float())

    def square(self) -> SharedSampleValues:
        """The values squared."""
        return SharedSampleValues(self.shared.square(), self.own.square())

    def products(self, a: Tensor) -> Tensor:
        """``[..., U, C]`` sums over samples of ``a[..., u, n] * values[u, n, c]`` for ``a`` ``[..., U, N]``."""
        r = self.shared.shape[0]
        out = a[..., :r] @ self.shared
        if self.own.shape[1]:
            out = out + torch.einsum("...un,unc->...uc", a[..., r:], self.own)
        return out

    def subset(self, units: Tensor) -> SharedSampleValues:
        """The values of some units (``units``: int64 indices into ``U``); the shared rows stay shared."""
        return SharedSampleValues(self.shared, self.own[units])

    def column(self, index: Tensor) -> Tensor:
        """``[U, N]``: each unit's values of its own concept ``index[u]``."""
        own = self.own.gather(2, index[:, None, None].expand(-1, self.own.shape[1], 1))[..., 0]
        return torch.cat([self.shared[:, index].T, own], dim=1)

    def dense(self) -> Tensor:
        """The ``[U, N, C]`` tensor itself (for tests and small inputs)."""
        units = self.own.shape[0]
        return torch.cat([self.shared[None].expand(units, -1, -1), self.own], dim=1)


def _per_unit(concepts: Tensor, units: int) -> Tensor:
    """``concepts`` as ``[U, N, C]`` (a view when it is shared ``[N, C]``)."""
    if concepts.dim() == 2:
        return concepts[None].expand(units, -1, -1)
    if concepts.dim() != 3 or concepts.shape[0] != units:
        raise ValueError(f"concepts must be [N, C] or [{units}, N, C], got {tuple(concepts.shape)}")
    return concepts


def _weights(activations: Tensor, weights: Tensor | None) -> Tensor:
    if weights is None:
        return torch.ones_like(activations, dtype=torch.float32)
    if weights.shape != activations.shape:
        raise ValueError(f"weights must be {tuple(activations.shape)}, got {tuple(weights.shape)}")
    return weights.float()


def _products(a: Tensor, x: Tensor | SharedSampleValues) -> Tensor:
    """``[U, C]`` sum over samples of ``a[u, n] * x[(u,) n, c]`` (one matrix product)."""
    if isinstance(x, SharedSampleValues):
        return x.products(a)
    return a @ x if x.dim() == 2 else torch.einsum("un,unc->uc", a, x)


def correlation(activations: Tensor, concepts: Tensor | SharedSampleValues, weights: Tensor | None = None) -> Tensor:
    """Pearson correlation of each unit's activations with each concept's similarity over the probe samples.

    Args:
        activations: ``[U, N]``.
        concepts: ``[N, C]`` or ``[U, N, C]`` image-text similarities (or any concept values), or
            :class:`SharedSampleValues`.
        weights: Optional ``[U, N]`` sample weights; ``0`` leaves a sample out (how units with different sample
            sets share one tensor).

    Returns:
        float32 ``[U, C]`` in ``[-1, 1]``; 0 where either side is constant over the unit's samples.

    Example:
        >>> correlation(torch.tensor([[1.0, 2.0, 3.0, 9.0]]), torch.tensor([[1.0], [2.0], [3.0], [0.0]]),
        ...             torch.tensor([[1.0, 1.0, 1.0, 0.0]])).tolist()
        [[1.0]]
    """
    a = activations.float()
    w = _weights(a, weights)
    x = concepts.float()
    n = w.sum(1, keepdim=True).clamp_min(1.0)  # [U, 1]
    ma = (w * a).sum(1, keepdim=True) / n
    da = (a - ma) * w  # centred, zero where left out
    mx = _products(w, x) / n  # [U, C] weighted concept means
    cov = _products(da, x)  # sum w (a - ma) x  ==  sum w (a - ma)(x - mx)
    var_a = (da * (a - ma)).sum(1, keepdim=True)
    var_x = _products(w, x.square()) - n * mx.square()
    den = (var_a * var_x.clamp_min(0)).sqrt()
    ok = den > 1e-12 * n
    return torch.where(ok, cov / den.clamp_min(1e-30), torch.zeros_like(cov)).clamp(-1.0, 1.0)


def cosine(activations: Tensor, concepts: Tensor, weights: Tensor | None = None) -> Tensor:
    """Cosine similarity (uncentred) of each unit's activation vector with each concept's value vector.

    Example:
        >>> cosine(torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0], [0.0, 1.0]])).tolist()
        [[1.0, 0.0]]
    """
    a = activations.float()
    w = _weights(a, weights)
    x = concepts.float()
    dot = _products(w * a, x)
    norm_a = (w * a.square()).sum(1, keepdim=True).sqrt()
    norm_x = _products(w, x.square()).clamp_min(0).sqrt()
    den = norm_a * norm_x
    return torch.where(den > 1e-12, dot / den.clamp_min(1e-30), torch.zeros_like(dot))


def _average_ranks(values: Tensor) -> Tensor:
    """1-based ranks along the last dimension, ties sharing their mean rank."""
    ordered = torch.sort(values, dim=-1).values.contiguous()
    low = torch.searchsorted(ordered, values.contiguous(), right=False).float()
    high = torch.searchsorted(ordered, values.contiguous(), right=True).float()
    return (low + high + 1.0) / 2.0


def auc(activations: Tensor, labels: Tensor) -> Tensor:
    """ROC AUC of ranking the samples by a unit's activation to find each concept's positive samples.

    Ties in activation count one half (Mann-Whitney). Fails NeuronEval's missing- and extra-labels tests; kept for
    comparison (``UnitExplanation.auc`` is the related top-crops-versus-controls AUC).

    Args:
        activations: ``[U, N]``.
        labels: bool ``[N, C]`` or ``[U, N, C]``: which samples show the concept (see :func:`top_fraction`).

    Returns:
        float32 ``[U, C]``; NaN for a concept with no positive or no negative sample.

    Example:
        >>> auc(torch.tensor([[3.0, 2.0, 1.0, 1.0]]), torch.tensor([[True], [False], [True], [False]])).tolist()
        [[0.625]]
    """
    ranks = _average_ranks(activations.float())
    y = _per_unit(labels, activations.shape[0]).float()
    pos = y.sum(1)  # [U, C]
    neg = y.shape[1] - pos
    rank_sum = torch.einsum("un,unc->uc", ranks, y)
    value = (rank_sum - pos * (pos + 1) / 2) / (pos * neg).clamp_min(1.0)
    return torch.where((pos > 0) & (neg > 0), value, torch.full_like(value, float("nan")))


def auprc(activations: Tensor, labels: Tensor) -> Tensor:
    """Area under the precision-recall curve (average precision) of finding a concept's samples by activation.

    Samples are ranked by activation, highest first (ties keep sample order).

    Args:
        activations: ``[U, N]``.
        labels: bool ``[N, C]`` or ``[U, N, C]``.

    Returns:
        float32 ``[U, C]`` in ``[0, 1]``; NaN for a concept without positives.

    Example:
        >>> round(auprc(torch.tensor([[3.0, 2.0, 1.0]]), torch.tensor([[True], [False], [True]])).item(), 4)
        0.8333
    """
    order = torch.argsort(activations.float(), dim=1, descending=True, stable=True)
    y = _per_unit(labels, activations.shape[0]).float()
    y = y.gather(1, order[..., None].expand(-1, -1, y.shape[2]))
    hits = y.cumsum(1)
    rank = torch.arange(1, y.shape[1] + 1, device=y.device, dtype=torch.float32)[None, :, None]
    pos = y.sum(1)
    value = (hits / rank * y).sum(1) / pos.clamp_min(1.0)
    return torch.where(pos > 0, value, torch.full_like(value, float("nan")))


def wpmi(
    activations: Tensor, concepts: Tensor, *, fraction: float = 0.05, temperature: float = 10.0, lam: float = 1.0
) -> Tensor:
    """CLIP-Dissect-style weighted pointwise mutual information of a unit's top samples with each concept.

    ``p(c | x)`` is a softmax over the concepts of ``temperature`` x the similarities; ``p(c | unit)`` its mean over
    the unit's top ``fraction`` of samples by activation; ``p(c)`` its mean over all samples; the score is
    ``log p(c | unit) - lam * log p(c)``. Its scale moves with the number of concepts; it fails NeuronEval's tests.

    Args:
        activations: ``[U, N]``.
        concepts: ``[N, C]`` or ``[U, N, C]`` similarities.
        fraction: Share of samples counted as the unit's top samples (at least one).
        temperature: Softmax scale.
        lam: Weight of the ``log p(c)`` term.

    Example:
        >>> sims = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
        >>> wpmi(torch.tensor([[5.0, 0.0, 0.0, 0.0]]), sims, fraction=0.25).argmax(dim=1).tolist()
        [0]
    """
    units, n = activations.shape
    k = max(1, min(n, round(fraction * n)))
    probs = torch.softmax(temperature * _per_unit(concepts.float(), units), dim=2)  # [U, N, C]
    top = torch.topk(activations.float(), k, dim=1).indices
    given = probs.gather(1, top[..., None].expand(-1, -1, probs.shape[2])).mean(1)
    prior = probs.mean(1)
    return torch.log(given + 1e-12) - lam * torch.log(prior + 1e-12)


def top_fraction(values: Tensor, fraction: float) -> Tensor:
    """Bool ``[N, C]``: the top ``fraction`` of samples of each column (at least one), as binary concept labels.

    Example:
        >>> top_fraction(torch.tensor([[0.1], [0.9], [0.5], [0.2]]), 0.5).squeeze(1).tolist()
        [False, True, True, False]
    """
    n = values.shape[0]
    k = max(1, min(n, round(fraction * n)))
    top = torch.topk(values.float(), k, dim=0).indices
    return torch.zeros_like(values, dtype=torch.bool).scatter_(0, top, True)


__all__ = ["auc", "auprc", "correlation", "cosine", "top_fraction", "wpmi"]
