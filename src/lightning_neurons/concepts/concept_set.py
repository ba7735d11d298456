"""The candidate concepts of a run as one typed value: texts and their embeddings.

Example:
    >>> import torch
    >>> concepts = ConceptSet(("red", "stripes"), torch.eye(2))
    >>> len(concepts), concepts.texts[1]
    (2, 'stripes')
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class ConceptSet:
    """Concept texts and their L2-normalised embeddings in one image-text space (row ``i`` embeds ``texts[i]``).

    Args:
        texts: The concepts.
        embeddings: ``[len(texts), D]`` float embeddings.

    Raises:
        ValueError: If the set is empty or the counts differ.
    """

    texts: tuple[str, ...]
    embeddings: Tensor

    def __post_init__(self) -> None:
        if not self.texts:
            raise ValueError("the concept vocabulary is empty")
        if self.embeddings.dim() != 2 or self.embeddings.shape[0] != len(self.texts):
            raise ValueError(
                f"{len(self.texts)} concepts but embeddings of shape {tuple(self.embeddings.shape)}; "
                "give one embedding row per concept"
            )

    def __len__(self) -> int:
        return len(self.texts)


__all__ = ["ConceptSet"]
