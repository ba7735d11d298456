"""Contrast (CoSy's AUC and MAD, without an image generator).

CoSy generates images of the description and asks whether the unit fires more on them than on control
images. With no generator offline, the "concept images" are the held-out probe images that the image-text
encoder finds most similar to the description; the controls are the other held-out images (or a random
subset of them). Two scores per unit:

- AUC: probability that the unit's activation on a concept image exceeds that on a control image (0.5 =
  chance, 1 = the description's images always win).
- MAD: the mean activation difference, concept minus control, in units of the controls' standard deviation.

Example:
    >>> import torch
    >>> acts = torch.tensor([[5.0], [4.0], [0.0], [1.0]])    # 4 samples x 1 unit
    >>> sims = torch.tensor([[0.9], [0.8], [0.1], [0.2]])    # similarity of each sample with the description
    >>> result = contrast_scores(acts, sims, num_concept=2)
    >>> result.auc.tolist(), result.mad.tolist()
    ([1.0], [8.0])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_neurons.evaluation.stats import auc, mad


@dataclass
class ContrastResult:
    """Per-unit contrast scores.

    Args:
        auc: ``[U]`` AUC of activations on concept images against control images.
        mad: ``[U]`` mean activation difference over the control standard deviation.
        concept_index: ``[U, m]`` probe positions used as each unit's concept images.
    """

    auc: Tensor
    mad: Tensor
    concept_index: Tensor


def contrast_scores(
    activations: Tensor,
    similarities: Tensor,
    *,
    num_concept: int | None = None,
    concept_fraction: float = 0.1,
    num_control: int | None = None,
    seed: int = 0,
) -> ContrastResult:
    """AUC and MAD of every unit's activations on its description's images against control images.

    Args:
        activations: ``[N, U]`` unit values on held-out samples.
        similarities: ``[N, U]`` similarity of each sample with each unit's description.
        num_concept: Concept images per unit; default ``concept_fraction * N`` (at least 2).
        concept_fraction: Fraction of the probe used as concept images when ``num_concept`` is not given.
        num_control: Control images per unit, drawn at random from the rest; ``None`` uses all the rest
            (no sampling noise).
        seed: Seed of the control draw.

    Returns:
        The :class:`ContrastResult`.

    Raises:
        ValueError: If the shapes disagree or too few samples are left for controls.
    """
    if activations.shape != similarities.shape or activations.dim() != 2:
        raise ValueError(
            f"activations and similarities must both be [N, U], got {tuple(activations.shape)} and "
            f"{tuple(similarities.shape)}"
        )
    n, units = activations.shape
    m = num_concept if num_concept is not None else max(2, round(concept_fraction * n))
    if not 1 <= m <= n - 2:
        raise ValueError(f"need 1 <= num_concept <= N - 2, got {m} for N = {n}")
    rest = n - m
    q = rest if num_control is None else min(num_control, rest)
    acts = activations.float().T  # [U, N]
    concept_index = similarities.float().T.topk(m, dim=1).indices  # [U, m]
    # A random order of the non-concept samples per unit: concept samples get a key above every random key.
    keys = torch.rand(units, n, generator=torch.Generator().manual_seed(seed))
    keys.scatter_(1, concept_index, 2.0)
    control_index = keys.argsort(dim=1)[:, :q]
    positive = acts.gather(1, concept_index)
    negative = acts.gather(1, control_index)
    return ContrastResult(auc=auc(positive, negative), mad=mad(positive, negative), concept_index=concept_index)


__all__ = ["ContrastResult", "contrast_scores"]
