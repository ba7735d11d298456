"""Per-layer random generators: a layer's random draws depend on the seed and its own name only.

Every random choice of the explanation stage (control positions, control crops, held-out splits, permutations,
cross-validation folds) draws from a generator derived here from ``(seed, layer name, purpose)`` with a stable hash
(BLAKE2b, not Python's salted ``hash``), so a layer explained alone or beside other layers, in any order, draws
the same numbers and gets the same records.

Example:
    >>> layer_seed(0, "features.3") == layer_seed(0, "features.3")
    True
    >>> layer_seed(0, "features.3") != layer_seed(1, "features.3")
    True
    >>> float(layer_generator(0, "features.3", "folds").initial_seed() == layer_seed(0, "features.3", "folds"))
    1.0
"""

from __future__ import annotations

import hashlib

import torch


def layer_seed(seed: int, layer: str, purpose: str = "") -> int:
    """A 63-bit seed from ``(seed, layer, purpose)``, the same in every process and Python version.

    Example:
        >>> layer_seed(0, "layer4", "permutation") == layer_seed(0, "layer4", "folds")
        False
    """
    digest = hashlib.blake2b(f"{int(seed)}\x00{layer}\x00{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def layer_generator(seed: int, layer: str, purpose: str = "") -> torch.Generator:
    """A CPU generator seeded with :func:`layer_seed` (draw on the CPU, then move: the same on every device).

    Example:
        >>> a = torch.rand(3, generator=layer_generator(0, "fc", "x"))
        >>> torch.equal(a, torch.rand(3, generator=layer_generator(0, "fc", "x")))
        True
    """
    return torch.Generator(device="cpu").manual_seed(layer_seed(seed, layer, purpose))


def hashed_folds(sample_ids: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """Cross-validation fold of each probe sample, from its id and the seed alone (``[N]`` int64 in ``[0, folds)``).

    A sample keeps its fold whichever other samples a layer's units use, so folds never depend on other layers.

    Example:
        >>> f = hashed_folds(torch.arange(1000), 5, seed=0)
        >>> sorted(f.unique().tolist()), bool((f.bincount() > 150).all())
        ([0, 1, 2, 3, 4], True)
    """
    return (_hash32(sample_ids, seed) % folds).to(sample_ids.device)


def hashed_uniform(keys: torch.Tensor, seed: int, purpose: str = "") -> torch.Tensor:
    """A uniform number in ``[0, 1)`` per key, from the key, the seed and the purpose alone (CPU float64 ``[N]``).

    The same key gives the same number in every round, layer and process: draws made with it coincide wherever
    their inputs coincide (control crops then repeat across rounds and layers, and the embedding cache hits).

    Args:
        keys: int64 ``[N]`` keys, or ``[N, M]`` for keys made of ``M`` integers (e.g. sample id and slot).
        seed: The explanation's seed.
        purpose: What the numbers are for (different purposes draw independent numbers).

    Example:
        >>> u = hashed_uniform(torch.tensor([[7, 0], [7, 1]]), seed=0, purpose="x")
        >>> torch.equal(u, hashed_uniform(torch.tensor([[7, 0], [7, 1]]), 0, "x")), bool(u[0] != u[1])
        (True, True)
    """
    cols = keys.long().cpu().reshape(keys.shape[0], -1) if keys.dim() else keys.long().cpu().reshape(1, 1)
    salt = layer_seed(seed, "", purpose)
    high = torch.full((cols.shape[0],), salt & 0xFFFFFFFF, dtype=torch.long)
    low = torch.full((cols.shape[0],), (salt >> 32) & 0x7FFFFFFF, dtype=torch.long)
    for c in range(cols.shape[1]):
        high = _hash32(cols[:, c], high)
        low = _hash32(cols[:, c], low ^ 0x5BD1E995)
    return ((high << 21) ^ low).double().remainder(2.0**53) / 2.0**53


def _hash32(keys: torch.Tensor, seed: int | torch.Tensor) -> torch.Tensor:
    # A 32-bit integer mix (murmur3's finaliser) of int64 keys (high bits folded in), on the CPU.
    mask = (1 << 32) - 1
    k = keys.long().cpu()
    k = (k ^ (k >> 32)) & mask
    h = (k * 0x9E3779B1 + (seed & mask)) & mask
    h = ((h ^ (h >> 16)) * 0x85EBCA6B) & mask
    h = ((h ^ (h >> 13)) * 0xC2B2AE35) & mask
    return h ^ (h >> 16)


__all__ = ["hashed_folds", "hashed_uniform", "layer_generator", "layer_seed"]
