"""A bounded cache of image-region embeddings of probe samples, kept across explanation rounds.

The image encoder is frozen, so the embedding of one region of one probe sample (a unit's top crop, a control
crop, a whole image) is the same in every round that asks for it again. Between two explained epochs most units
keep many of their top samples and many boxes stay the same, so most of a later round's crops were embedded
before. :class:`RegionEmbeddingCache` keys an embedding by

* the encoder's identity and settings (:func:`encoder_key`: name, class, settings value, image size, resize mode),
* the sample: its id and a fingerprint of its pixels (two random-weight checksums of the uint8 image; a probe set
  whose sample ``i`` changed pixels between rounds misses instead of reusing a stale embedding),
* the box ``(x0, y0, x1, y1)`` and the crop size,

and embeds only the misses, in encoder-sized batches. It is bounded by bytes (least recently used entries go
first) and counts hits, misses and evictions; the pipeline reports them in ``round.meta["embedding_cache"]``.
The result equals embedding every region anew: a hit returns the embedding computed for the same pixels, box,
crop size and encoder.

Example:
    >>> import torch
    >>> class Mean:
    ...     name = "mean"
    ...     def encode_images(self, images):
    ...         return torch.nn.functional.normalize(images.mean((2, 3)), dim=1)
    >>> cache = RegionEmbeddingCache(max_bytes=1 << 20)
    >>> bank = (torch.rand(2, 3, 16, 16) * 255).to(torch.uint8)
    >>> rows, boxes = torch.tensor([0, 1]), torch.tensor([[0, 0, 8, 8], [0, 0, 16, 16]])
    >>> keys = cache.sample_keys(torch.tensor([10, 11]), bank)
    >>> first = cache.embed(Mean(), bank, rows, boxes, keys, crop_size=8, batch_size=4)
    >>> again = cache.embed(Mean(), bank, rows, boxes, keys, crop_size=8, batch_size=4)
    >>> torch.equal(first, again), cache.hits, cache.misses
    (True, 2, 2)
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lightning_neurons.backends.base import EMBEDDING_ATTRIBUTES, ImageTextEncoder
from lightning_neurons.regions import crop_batches

#: Default bound of a session's cache: 512 MiB (about 130,000 embeddings of the embedded backend's 1,011 floats).
DEFAULT_CACHE_MB = 512.0

#: Bytes counted per entry besides the embedding itself (key tuple, dict slot).
_ENTRY_OVERHEAD = 256

#: Attributes of an encoder that change its image embeddings without changing its name (per-call options).
_SETTING_ATTRIBUTES = ("settings", "views", *EMBEDDING_ATTRIBUTES)


def encoder_key(encoder: Any) -> Hashable:
    """What identifies an encoder's image embeddings: class, name and the settings that change them.

    An encoder may define ``cache_key`` (any hashable) to replace this.

    Example:
        >>> class Enc:
        ...     name, image_size = "e", 64
        >>> encoder_key(Enc())
        ('Enc', 'e', ('image_size', '64'))
    """
    own = getattr(encoder, "cache_key", None)
    if own is not None:
        return (type(encoder).__qualname__, own)
    parts: list[Any] = [type(encoder).__qualname__, str(getattr(encoder, "name", ""))]
    for attribute in _SETTING_ATTRIBUTES:
        try:
            value = getattr(encoder, attribute)
        except AttributeError:
            continue
        parts.append((attribute, repr(value)))
    return tuple(parts)


class RegionEmbeddingCache:
    """Bounded LRU cache of region embeddings, keyed by (encoder, sample id and pixels, box, crop size).

    Thread-safe (a lock guards the table), so the callback's background worker and the main thread may share one.

    Args:
        max_bytes: Most bytes held (embeddings plus a fixed per-entry overhead); least recently used entries are
            dropped first.
    """

    def __init__(self, max_bytes: int = int(DEFAULT_CACHE_MB * 2**20)) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._table: OrderedDict[Hashable, Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._table)

    def stats(self) -> dict[str, int]:
        """Counters since creation: ``hits``, ``misses``, ``evictions``, ``entries``, ``bytes``."""
        return {
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "entries": len(self._table),
            "bytes": self.nbytes,
        }

    def clear(self) -> None:
        """Forget every embedding (the counters stay)."""
        with self._lock:
            self._table.clear()
            self.nbytes = 0

    @staticmethod
    def sample_keys(sample_ids: Tensor, bank: Tensor, chunk: int = 64) -> list[tuple[int, int, int]]:
        """``(id, checksum, checksum)`` per bank row: the sample's id and two fingerprints of its uint8 pixels.

        The checksums are sums of the pixels times fixed random weights (computed on the bank's device, in chunks),
        so the same pixels give the same key in every round and different pixels differ with overwhelming
        probability.

        Args:
            sample_ids: ``[N]`` the id of each bank row.
            bank: uint8 ``[N, C, H, W]`` images.
            chunk: Rows per step (bounds the int64 temporary).
        """
        n = bank.shape[0]
        if n == 0:
            return []
        flat = bank.reshape(n, -1)
        gen = torch.Generator().manual_seed(flat.shape[1])
        weights = torch.randint(1, 2**31 - 1, (flat.shape[1], 2), generator=gen, dtype=torch.int64).to(bank.device)
        sums = []
        for start in range(0, n, chunk):
            part = flat[start : start + chunk].to(torch.int64)
            # int64 products and sums (< 2**31 * 255 * H * W * C): exact, no float rounding. No int64 matmul on CUDA.
            sums.append(torch.stack([(part * weights[:, j]).sum(dim=1) for j in range(2)], dim=1))
        values = torch.cat(sums).cpu().tolist()
        ids = sample_ids.reshape(-1).cpu().tolist()
        return [(int(i), int(a), int(b)) for i, (a, b) in zip(ids, values)]

    def embed(
        self,
        encoder: ImageTextEncoder,
        bank: Tensor,
        bank_rows: Tensor,
        boxes: Tensor,
        sample_keys: list[tuple[int, int, int]],
        *,
        crop_size: int,
        batch_size: int,
        show_progress: bool = False,
    ) -> Tensor:
        """Embeddings of the regions ``boxes`` of bank rows ``bank_rows``; only unseen regions are embedded.

        Args:
            encoder: The image encoder.
            bank: uint8 ``[N, 3, H, W]`` images.
            bank_rows: int64 ``[K]`` bank row of each region.
            boxes: int64 ``[K, 4]`` ``(x0, y0, x1, y1)`` boxes (a whole image is ``(0, 0, W, H)``).
            sample_keys: :meth:`sample_keys` of the bank (one per row).
            crop_size: Side the regions are resized to before the encoder.
            batch_size: Regions per encoder call.
            show_progress: A progress bar over the embedded batches.

        Returns:
            CPU float32 ``[K, D]``, rows in the order of the regions.
        """
        count = int(bank_rows.numel())
        if count == 0:
            return embed_regions(encoder, bank, bank_rows, boxes, crop_size, batch_size, show_progress)
        enc = encoder_key(encoder)
        rows = bank_rows.cpu().tolist()
        box_list = boxes.cpu().tolist()
        keys = [(enc, sample_keys[r], tuple(b), crop_size) for r, b in zip(rows, box_list)]
        found: dict[int, Tensor] = {}
        with self._lock:
            for i, key in enumerate(keys):
                value = self._table.get(key)
                if value is not None:
                    self._table.move_to_end(key)
                    found[i] = value
        missing = [i for i in range(count) if i not in found]
        # Distinct missing regions only (a region asked for twice in one call is embedded once).
        first: dict[Hashable, int] = {}
        for i in missing:
            first.setdefault(keys[i], i)
        todo = list(first.values())
        if todo:
            index = torch.tensor(todo, dtype=torch.long)
            fresh = embed_regions(
                encoder,
                bank,
                bank_rows[index.to(bank_rows.device)],
                boxes[index.to(boxes.device)],
                crop_size,
                batch_size,
                show_progress,
            )
            computed: dict[Hashable, Tensor] = {keys[i]: fresh[j] for j, i in enumerate(todo)}
            for i in missing:
                found[i] = computed[keys[i]]
            self._store(computed)
        with self._lock:
            self.hits += count - len(missing)
            self.misses += len(missing)
        return torch.stack([found[i] for i in range(count)])

    def _store(self, entries: dict[Hashable, Tensor]) -> None:
        with self._lock:
            for key, value in entries.items():
                value = value.clone()  # own storage: a row view would keep its whole batch alive
                if key in self._table:
                    continue
                self._table[key] = value
                self.nbytes += value.numel() * value.element_size() + _ENTRY_OVERHEAD
            while self.nbytes > self.max_bytes and self._table:
                _, old = self._table.popitem(last=False)
                self.nbytes -= old.numel() * old.element_size() + _ENTRY_OVERHEAD
                self.evictions += 1


def embed_regions(
    encoder: ImageTextEncoder,
    bank: Tensor,
    bank_rows: Tensor,
    boxes: Tensor,
    crop_size: int,
    batch_size: int,
    show_progress: bool = False,
) -> Tensor:
    """Cut regions out of bank images and embed them in encoder-sized batches; CPU float32 ``[K, D]``.

    On CUDA the next batch is cut on a side stream while the encoder works on this one
    (:func:`~lightning_neurons.regions.crop_batches`).
    """
    out: list[Tensor] = []
    total = -(-bank_rows.numel() // batch_size)
    batches = crop_batches(bank, bank_rows, boxes, crop_size, batch_size)
    progress = tqdm(batches, total=total, desc="explain: embed crops", disable=not show_progress, leave=False)
    with torch.no_grad():
        for crops in progress:
            out.append(encoder.encode_images(crops).float().cpu())
    if not out:
        return torch.empty(0, 0)
    return torch.cat(out)


__all__ = ["DEFAULT_CACHE_MB", "RegionEmbeddingCache", "embed_regions", "encoder_key"]
