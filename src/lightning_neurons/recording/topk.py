"""Running per-unit top-k of probe samples, merged on the device with vectorised torch ops.

A :class:`TopKBuffer` keeps, for each of ``U`` units, the ``k`` best ``(value, sample id, peak, label)``
entries seen so far. Batches are appended as candidate chunks and merged into the buffer every few batches
(one ``cat`` + one ``topk`` over ``[U, k + pending]``): no Python loop over units and no host synchronisation
while recording. Ties are broken deterministically (larger value first, then smaller sample id) by ranking a
single int64 key per entry, so the merged result does not depend on the order in which batches or ranks
arrive: two DDP processes give exactly the top-k of one process.

Example:
    >>> import torch
    >>> buf = TopKBuffer(num_units=2, k=2)
    >>> buf.add(torch.tensor([[1.0, 5.0], [3.0, 4.0], [2.0, 6.0]]), torch.tensor([0, 1, 2]))
    >>> buf.state()["sample_ids"]
    tensor([[1, 2],
            [2, 0]])
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

AllGather = Callable[[Tensor], Tensor]

_INT64_MIN = -(2**63)

#: Default cap on a buffer's pending candidate bytes (see :class:`TopKBuffer`).
DEFAULT_MAX_PENDING_BYTES = 64 * 2**20
_ID_LIMIT = 2**32  # sample ids share an int64 sort key with the value's 32 bits


def sort_keys(values: Tensor, ids: Tensor) -> Tensor:
    """One int64 key per entry whose order is (value descending, sample id ascending).

    The float32 value's bits are mapped to an order-preserving int32 and put in the high 32 bits; the low
    32 bits hold ``2**32 - 1 - id``. Non-finite values and empty slots (``id < 0``) get the smallest key.
    """
    # float32 whatever the default dtype (a float64 default, precision="64-true"): the bit trick reads 32-bit floats.
    values = values.to(torch.float32)
    bits = values.contiguous().view(torch.int32).to(torch.int64)
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # negative floats: flip magnitude order
    keys = (ordered << 32) + (_ID_LIMIT - 1 - ids.clamp(min=0))
    return torch.where(torch.isfinite(values) & (ids >= 0), keys, torch.full_like(keys, _INT64_MIN))


def random_keys(ids: Tensor, seed: int) -> Tensor:
    """A uniform pseudo-random float32 in ``[0, 1)`` per sample id, a pure function of ``(seed, id)``.

    Counter-based (splitmix64 mixing in int64 torch ops, on the ids' device), so every rank and every run
    draws the same key for the same sample without a per-sample generator or a host round trip.
    """
    # The seed is mixed in Python: a device tensor made from it would be a host-to-device copy (a sync) per batch.
    x = _splitmix(ids.to(torch.int64) + _seed_offset(seed))
    return ((x >> 40) & 0xFFFFFF).to(torch.float32) / float(1 << 24)  # 24 bits: exact in float32


def _seed_offset(seed: int) -> int:
    """``_splitmix`` of the seed as a signed 64-bit Python int (same arithmetic, modulo 2**64)."""
    mask = (1 << 64) - 1
    x = (seed + 0x9E3779B97F4A7C15) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    x ^= x >> 31
    return x - (1 << 64) if x >= 1 << 63 else x


def _splitmix(x: Tensor) -> Tensor:
    # Constants above 2**63 written as their signed int64 equivalents; int64 multiplication wraps.
    x = x + (0x9E3779B97F4A7C15 - 2**64)
    x = (x ^ ((x >> 30) & ((1 << 34) - 1))) * (0xBF58476D1CE4E5B9 - 2**64)
    x = (x ^ ((x >> 27) & ((1 << 37) - 1))) * (0x94D049BB133111EB - 2**64)
    return x ^ ((x >> 31) & ((1 << 33) - 1))


class TopKBuffer:
    """Running top-``k`` per unit of ``(value, sample id, peak, label)``.

    Memory held, in bytes, for ``U`` units, ``k`` entries, batches of ``B`` samples and ``M`` pending rows, where
    ``M = min(merge_rows, max(1, max_pending_bytes // (12 * U)))``::

        U * k * 28                   # buffer: float32 value + int64 id, peak, label (the label shared per entry)
        + (M + B) * (U * 12 + 16)    # pending candidate chunks: float32 value + int64 peak per unit, id + label
        + 2 * U * (k + M + B) * 8    # transient keys/indices during a merge

    It does not depend on the number of probe samples ``N``. ``max_pending_bytes`` keeps the pending chunks of a
    wide layer bounded (a 4,096-unit layer at ``merge_rows=2048`` would otherwise hold 100 MB of candidates, 24
    such layers 2.4 GB); merging earlier never changes the result, only how often a merge runs.

    Args:
        num_units: Number of units ``U``.
        k: Entries kept per unit.
        device: Where the buffer lives (the recorded module's device).
        merge_rows: Pending candidate rows that trigger a merge; larger amortises better, costs memory.
        max_pending_bytes: Cap on the pending candidates' bytes (``12 * U`` per row); fewer rows than
            ``merge_rows`` then trigger a merge. ``None``: no cap.

    Example:
        >>> import torch
        >>> buf = TopKBuffer(num_units=3, k=4)
        >>> buf.add(torch.randn(8, 3), torch.arange(8))
        >>> buf.state()["values"].shape
        torch.Size([3, 4])
    """

    def __init__(
        self,
        num_units: int,
        k: int,
        device: torch.device | str | None = None,
        merge_rows: int = 2048,
        max_pending_bytes: int | None = DEFAULT_MAX_PENDING_BYTES,
    ) -> None:
        if num_units < 1 or k < 1:
            raise ValueError(f"num_units and k must be >= 1, got {num_units} and {k}")
        self.num_units = num_units
        self.k = k
        self.merge_rows = max(1, merge_rows)
        if max_pending_bytes is not None:
            self.merge_rows = min(self.merge_rows, max(1, max_pending_bytes // (12 * num_units)))
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        # Explicit float32: under torch.set_default_dtype(torch.float64) (precision="64-true") the buffer would be
        # float64 and its 64-bit values would not pack into the int64 sort keys.
        self.values = torch.full((num_units, k), float("-inf"), dtype=torch.float32, device=self.device)
        self.sample_ids = torch.full((num_units, k), -1, dtype=torch.long, device=self.device)
        self.peaks = torch.full_like(self.sample_ids, -1)
        self.labels = torch.full_like(self.sample_ids, -1)
        # Count of non-finite candidates, kept on the device and read only at the end.
        self.nonfinite = torch.zeros((), dtype=torch.long, device=self.device)
        self._pending: list[tuple[Tensor, Tensor, Tensor | None, Tensor | None]] = []
        self._pending_rows = 0

    def add(self, values: Tensor, ids: Tensor, peaks: Tensor | None = None, labels: Tensor | None = None) -> None:
        """Append one batch of candidates.

        Args:
            values: ``[B, U]`` per-sample unit values, any float dtype (merged as float32). NaN/Inf are excluded
                and counted.
            ids: ``[B]`` int64 sample ids, unique across the whole probe set.
            peaks: ``[B, U]`` int64 peak positions, or ``None`` (stored as ``-1``).
            labels: ``[B]`` int64 class labels, or ``None`` (stored as ``-1``).
        """
        if values.dim() != 2 or values.shape[1] != self.num_units or ids.shape != values.shape[:1]:
            raise ValueError(
                f"expected values [B, {self.num_units}] and ids [B], got {tuple(values.shape)} and {tuple(ids.shape)}"
            )
        # Only appended here: the cast and the NaN/Inf handling run once per merge on the stacked chunks, so that
        # a batch costs no extra kernel launches beyond the reduction itself.
        self._pending.append((values, ids.to(self.device), peaks, labels))
        self._pending_rows += values.shape[0]
        if self._pending_rows >= self.merge_rows:
            self.flush()

    def flush(self) -> None:
        """Merge the pending candidate chunks into the buffer."""
        if not self._pending:
            return
        vals = torch.cat([v.to(self.device, torch.float32) for v, _, _, _ in self._pending])  # [n, U]
        finite = torch.isfinite(vals)
        self.nonfinite += (~finite).sum()
        vals = vals.masked_fill(~finite, float("-inf"))
        ids = torch.cat([i for _, i, _, _ in self._pending])  # [n]
        n = ids.shape[0]
        peaks = torch.cat(
            [
                p.to(self.device, torch.long) if p is not None else torch.full_like(v, -1, dtype=torch.long)
                for v, _, p, _ in self._pending
            ]
        )
        labels = torch.cat(
            [
                lab.to(self.device, torch.long) if lab is not None else torch.full_like(i, -1)
                for _, i, _, lab in self._pending
            ]
        )
        self._pending.clear()
        self._pending_rows = 0
        U = self.num_units
        self._merge(
            torch.cat([self.values, vals.T], dim=1),
            torch.cat([self.sample_ids, ids.expand(U, n)], dim=1),
            torch.cat([self.peaks, peaks.T], dim=1),
            torch.cat([self.labels, labels.expand(U, n)], dim=1),
        )

    def _merge(self, values: Tensor, ids: Tensor, peaks: Tensor, labels: Tensor) -> None:
        keys = sort_keys(values, ids)
        index = keys.topk(self.k, dim=1, sorted=True).indices
        empty = keys.gather(1, index) == _INT64_MIN
        self.values = values.gather(1, index).masked_fill(empty, float("-inf"))
        self.sample_ids = ids.gather(1, index).masked_fill(empty, -1)
        self.peaks = peaks.gather(1, index).masked_fill(empty, -1)
        self.labels = labels.gather(1, index).masked_fill(empty, -1)

    def merge_across_ranks(self, all_gather: AllGather, id_limit: int | None = None) -> None:
        """Replace this buffer by the top-``k`` over the buffers of all ranks (a collective: call on every rank).

        Args:
            all_gather: Gathers a tensor of the same shape from every rank and returns ``[W, *shape]``
                (``LightningModule.all_gather`` / ``Strategy.all_gather``). Buffers are fixed-size ``[U, k]``,
                so no padding negotiation is needed.
            id_limit: Drop ids ``>= id_limit`` (the duplicates a ``DistributedSampler`` pads the last batch with).
        """
        self.flush()
        packed = torch.stack(
            [self.values.view(torch.int32).to(torch.int64), self.sample_ids, self.peaks, self.labels], dim=-1
        )
        gathered = all_gather(packed)
        if gathered.dim() == packed.dim():  # single process: nothing gathered
            gathered = gathered[None]
        gathered = gathered.to(self.device).permute(1, 0, 2, 3).reshape(self.num_units, -1, 4)  # [U, W*k, 4]
        values = gathered[..., 0].to(torch.int32).view(torch.float32)
        ids = gathered[..., 1]
        if id_limit is not None:
            ids = ids.masked_fill(ids >= id_limit, -1)
        self._merge(values, ids, gathered[..., 2], gathered[..., 3])
        count = all_gather(self.nonfinite.reshape(1))
        self.nonfinite = count.sum().to(self.device)

    def state(self) -> dict[str, Tensor]:
        """Flush and return the buffer: ``values``, ``sample_ids``, ``peaks``, ``labels`` ``[U, k]`` (on device)."""
        self.flush()
        return {"values": self.values, "sample_ids": self.sample_ids, "peaks": self.peaks, "labels": self.labels}

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffer tensors (pending chunks not included)."""
        return sum(t.numel() * t.element_size() for t in (self.values, self.sample_ids, self.peaks, self.labels))


class Reservoir:
    """A uniform random sample of ``size`` probe-sample ids: those with the smallest :func:`random_keys`.

    Rank-independent (keys depend only on ``(seed, id)``) and merged across ranks like a :class:`TopKBuffer`
    with one unit, so DDP and a single process keep the same reservoir. Memory: ``size * 28`` bytes plus the
    pending candidates.

    Example:
        >>> import torch
        >>> res = Reservoir(size=4, seed=0)
        >>> res.add(torch.arange(100))
        >>> res.ids().numel()
        4
    """

    def __init__(self, size: int, seed: int = 0, device: torch.device | str | None = None) -> None:
        self.size = size
        self.seed = seed
        self.buffer = TopKBuffer(1, max(size, 1), device=device, merge_rows=max(4 * size, 256))

    def add(self, ids: Tensor, labels: Tensor | None = None) -> None:
        """Offer a batch of sample ids (and their labels)."""
        if self.size > 0:
            self.buffer.add(-random_keys(ids, self.seed)[:, None], ids, None, labels)

    def merge_across_ranks(self, all_gather: AllGather, id_limit: int | None = None) -> None:
        """Merge the reservoirs of all ranks (a collective)."""
        self.buffer.merge_across_ranks(all_gather, id_limit)

    def ids(self) -> Tensor:
        """The kept ids (``[<= size]``, on the buffer's device), in key order."""
        ids = self.buffer.state()["sample_ids"][0]
        return ids[ids >= 0] if self.size > 0 else ids[:0]

    def labels(self) -> Tensor:
        """Labels matching :meth:`ids` (``-1`` when unknown)."""
        state = self.buffer.state()
        return state["labels"][0][state["sample_ids"][0] >= 0] if self.size > 0 else state["labels"][0][:0]


__all__ = ["DEFAULT_MAX_PENDING_BYTES", "AllGather", "Reservoir", "TopKBuffer", "random_keys", "sort_keys"]
