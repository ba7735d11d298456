"""Simulation (Linear Explanations' metric): does the description predict the unit's activation?

For every held-out probe sample, the image-text similarity between the sample and the unit's description is
a prediction of how strongly the unit fires on it; the score is the Pearson correlation of that prediction
with the unit's real activation over the probe. A description that names what the unit responds to gives a
positive correlation; a random or generic one gives about 0.

Example:
    >>> import torch
    >>> acts = torch.tensor([[1.0], [2.0], [3.0]])          # 3 samples x 1 unit
    >>> images = torch.eye(3)                                 # sample embeddings
    >>> texts = torch.tensor([[0.1, 0.2, 0.3]])               # description embedding, 1 unit
    >>> simulation_scores(acts, images, texts).tolist()
    [1.0]
"""

from __future__ import annotations

from torch import Tensor

from lightning_neurons.evaluation.stats import pearson


def simulation_scores(activations: Tensor, image_embeddings: Tensor, text_embeddings: Tensor) -> Tensor:
    """Per-unit Pearson correlation between activations and description-image similarity.

    Args:
        activations: ``[N, U]`` unit values on ``N`` held-out samples.
        image_embeddings: ``[N, D]`` L2-normalised embeddings of those samples.
        text_embeddings: ``[U, D]`` L2-normalised embedding of each unit's description.

    Returns:
        ``[U]`` correlations; 0 for a dead unit or a description whose similarity is the same for every sample.

    Raises:
        ValueError: If the shapes do not match.
    """
    if activations.dim() != 2 or activations.shape[0] != image_embeddings.shape[0]:
        raise ValueError(
            f"activations [N, U] and image_embeddings [N, D] must agree in N, got {tuple(activations.shape)} "
            f"and {tuple(image_embeddings.shape)}"
        )
    if text_embeddings.shape[0] != activations.shape[1]:
        raise ValueError(f"need one description per unit: {text_embeddings.shape[0]} for {activations.shape[1]} units")
    sims = image_embeddings.float() @ text_embeddings.float().T  # [N, U]
    return pearson(activations.float().T, sims.T)


__all__ = ["simulation_scores"]
