"""Row-wise statistics shared by the metrics: Pearson correlation, rank AUC and mean absolute difference.

Every function works on a batch of units at once (one row per unit) and defines the degenerate cases
explicitly instead of returning NaN: a row with zero variance has no linear relation to anything, so its
correlation is 0; empty groups give an AUC of 0.5 (chance).

Example:
    >>> import torch
    >>> pearson(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[2.0, 4.0, 7.0]])).tolist() > [0.99]
    True
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Below this standard deviation a row counts as constant (float32 noise of a constant row is ~1e-7 relative).
_EPS = 1e-6


def pearson(x: Tensor, y: Tensor) -> Tensor:
    """Pearson correlation of matching rows of ``x`` and ``y``.

    Args:
        x: ``[U, N]`` (or ``[N]``) values, e.g. a unit's activations over ``N`` samples.
        y: Same shape, e.g. the similarity of the unit's description with each sample.

    Returns:
        ``[U]`` correlations in ``[-1, 1]``; ``0`` for a row where either side is constant (zero variance).

    Raises:
        ValueError: If the shapes differ or there are fewer than two samples.

    Example:
        >>> pearson(torch.tensor([[1.0, 2.0], [5.0, 5.0]]), torch.tensor([[3.0, 1.0], [1.0, 2.0]])).tolist()
        [-1.0, 0.0]
    """
    if x.shape != y.shape:
        raise ValueError(f"pearson needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[-1] < 2:
        raise ValueError("pearson needs at least two samples per row")
    x = x.double().reshape(-1, x.shape[-1])
    y = y.double().reshape(-1, y.shape[-1])
    xc = x - x.mean(dim=1, keepdim=True)
    yc = y - y.mean(dim=1, keepdim=True)
    sx = xc.pow(2).mean(dim=1).sqrt()
    sy = yc.pow(2).mean(dim=1).sqrt()
    scale_x = x.abs().amax(dim=1).clamp_min(1.0)
    scale_y = y.abs().amax(dim=1).clamp_min(1.0)
    constant = (sx <= _EPS * scale_x) | (sy <= _EPS * scale_y)
    r = (xc * yc).mean(dim=1) / (sx * sy).clamp_min(1e-300)
    return torch.where(constant, torch.zeros_like(r), r.clamp(-1.0, 1.0)).float()


def auc(positive: Tensor, negative: Tensor) -> Tensor:
    """Mann-Whitney AUC per row: the probability that a positive value exceeds a negative one (ties count 1/2).

    Args:
        positive: ``[U, P]`` values of the positive group (e.g. a unit's activations on concept images).
        negative: ``[U, Q]`` values of the negative (control) group.

    Returns:
        ``[U]`` AUCs in ``[0, 1]``; 0.5 is chance and also the value for an empty group.

    Example:
        >>> auc(torch.tensor([[3.0, 2.0]]), torch.tensor([[1.0, 2.0]])).tolist()
        [0.875]
    """
    positive = positive.float().reshape(-1, positive.shape[-1])
    negative = negative.float().reshape(-1, negative.shape[-1])
    if positive.shape[0] != negative.shape[0]:
        raise ValueError(f"auc needs the same number of rows, got {positive.shape[0]} and {negative.shape[0]}")
    if positive.shape[1] == 0 or negative.shape[1] == 0:
        return torch.full((positive.shape[0],), 0.5)
    diff = positive[:, :, None] - negative[:, None, :]  # [U, P, Q]; probe sets are small, no need for ranks
    wins = (diff > 0).float() + 0.5 * (diff == 0).float()
    return wins.mean(dim=(1, 2))


def mad(positive: Tensor, negative: Tensor, *, min_std_fraction: float = 0.1) -> Tensor:
    """CoSy's mean activation difference: ``(mean(positive) - mean(negative)) / std(negative)`` per row.

    A control set that barely varies is no unit of measurement: a ReLU unit silent on every control image would
    divide by ~0 and one such unit would dominate a layer's mean. The denominator is therefore floored at
    ``min_std_fraction`` times the standard deviation of the row's values over both groups (the unit's own spread
    on the probe), which bounds such a unit's MAD instead of letting it run to thousands.

    Args:
        positive: ``[U, P]`` activations on the concept images.
        negative: ``[U, Q]`` activations on the control images.
        min_std_fraction: Floor of the control standard deviation, as a fraction of the pooled one.

    Returns:
        ``[U]`` differences in units of the (floored) control standard deviation; 0 where the two means are equal
        or every value of the row is the same.

    Example:
        >>> mad(torch.tensor([[3.0, 3.0]]), torch.tensor([[0.0, 2.0]])).tolist()
        [2.0]
        >>> mad(torch.tensor([[1.0]]), torch.tensor([[0.0] * 9])).tolist()  # silent controls: floored, not 1e6
        [33.33333206176758]
    """
    positive = positive.float().reshape(-1, positive.shape[-1])
    negative = negative.float().reshape(-1, negative.shape[-1])
    if positive.shape[1] == 0 or negative.shape[1] < 2:
        return torch.zeros(positive.shape[0])
    diff = positive.mean(dim=1) - negative.mean(dim=1)
    std = negative.std(dim=1, unbiased=False)
    pooled = torch.cat([positive, negative], dim=1).std(dim=1, unbiased=False)
    scale = torch.maximum(positive.abs().amax(dim=1), negative.abs().amax(dim=1)).clamp_min(1.0)
    out = diff / torch.maximum(std, torch.maximum(min_std_fraction * pooled, _EPS * scale))
    return torch.where(diff.abs() <= _EPS * scale, torch.zeros_like(out), out)


__all__ = ["auc", "mad", "pearson"]
