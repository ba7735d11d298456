"""An image-embedding cache shared across explanation rounds.

Between two explained epochs most units keep many of their top samples, and the region of a sample often stays
the same box, so the same crop is embedded again and again. :class:`CachedImageEncoder` wraps any
:class:`~lightning_neurons.backends.base.ImageTextEncoder` and embeds only the crops whose exact pixels it has not
seen, keyed by a hash of the crop. The cache is bounded (least recently used crops are dropped first).

Example:
    >>> import torch
    >>> from lightning_neurons.backends.base import ImageTextEncoder
    >>> class Mean:
    ...     name = "mean"
    ...     calls = 0
    ...     def encode_images(self, images):
    ...         Mean.calls += len(images)
    ...         return torch.nn.functional.normalize(images.mean((2, 3)), dim=1)
    ...     def encode_texts(self, texts):
    ...         return torch.ones(len(texts), 3) / 3 ** 0.5
    >>> encoder = CachedImageEncoder(Mean(), max_items=100)
    >>> images = torch.rand(4, 3, 8, 8)
    >>> _ = encoder.encode_images(images); _ = encoder.encode_images(images[:2])
    >>> Mean.calls, encoder.hits
    (4, 2)
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_neurons.backends.base import ImageTextEncoder


class CachedImageEncoder:
    """Wraps an image-text encoder with a bounded cache of image embeddings keyed by the images' pixels.

    Args:
        encoder: The encoder to wrap (texts pass straight through).
        max_items: Most embeddings kept (an embedding of dimension ``D`` costs ``4 * D`` bytes).
    """

    def __init__(self, encoder: ImageTextEncoder, max_items: int = 50_000) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        self.encoder = encoder
        self.name = encoder.name
        self.max_items = max_items
        self.hits = 0
        self.misses = 0
        self._cache: OrderedDict[bytes, Tensor] = OrderedDict()

    def __getattr__(self, item: str) -> Any:
        # Everything else (batch_size, cacheable, device, ...) is the wrapped encoder's.
        return getattr(self.encoder, item)

    def encode_images(self, images: Tensor) -> Tensor:
        """Embed ``[N, 3, H, W]`` images, reusing the embeddings of images seen before."""
        if images.shape[0] == 0:
            return self.encoder.encode_images(images)
        keys = [_key(image) for image in images]
        missing = [i for i, key in enumerate(keys) if key not in self._cache]
        if missing:
            fresh = self.encoder.encode_images(images[missing]).float().cpu()
            for i, row in zip(missing, fresh):
                self._cache[keys[i]] = row
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        out = torch.stack([self._cache[key] for key in keys])
        for key in keys:
            self._cache.move_to_end(key)
        while len(self._cache) > self.max_items:
            self._cache.popitem(last=False)
        return out

    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        """Embed texts (not cached here: vocabularies have their own disk cache)."""
        return self.encoder.encode_texts(texts)


def _key(image: Tensor) -> bytes:
    # Quantised to 8 bits: crops of the same sample and box are bit-identical, and float noise must not miss.
    pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return hashlib.blake2b(pixels.tobytes(), digest_size=16).digest() + bytes(str(tuple(image.shape)), "ascii")
