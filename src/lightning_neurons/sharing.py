"""Sharing the explanation work of a round between DDP ranks.

Under DDP every rank runs the explanation stage on the same (synced) recording; the expensive parts, finding the
region boxes of the (unit, sample) pairs that get no preview and embedding the region crops and control crops with
the image encoder, are split into one contiguous chunk per rank and gathered back with fixed-size ``all_gather``
calls. Every rank thus ends with the same boxes and embeddings a single process would compute, those stages take
about ``1 / world_size`` of their time, and no rank waits in a collective while another works alone (the ranks meet
at each gather, each having done its equal share).

Example:
    >>> import torch
    >>> share = WorkShare(rank=0, world_size=1, all_gather=lambda t: t[None])
    >>> share.chunk(10)
    range(0, 10)
    >>> share.gather_rows(torch.ones(10, 4), total=10).shape
    torch.Size([10, 4])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class WorkShare:
    """This rank's share of a round's work, and the collective that reassembles it.

    Args:
        rank: This process' global rank.
        world_size: Number of processes.
        all_gather: A collective ``tensor -> [world_size, *tensor.shape]`` (e.g. ``strategy.all_gather``). Every
            rank must call it the same number of times with tensors of the same shape.
        device: Device of the tensors given to the collective (NCCL needs CUDA tensors).
    """

    rank: int
    world_size: int
    all_gather: Callable[[Tensor], Tensor]
    device: torch.device | str = "cpu"

    def chunk(self, total: int) -> range:
        """The indices of ``range(total)`` this rank works on (contiguous, at most ``ceil(total / world_size)``)."""
        size = math.ceil(total / self.world_size) if total else 0
        start = min(total, self.rank * size)
        return range(start, min(total, start + size))

    def gather_rows(self, local: Tensor, total: int) -> Tensor:
        """Concatenate every rank's ``chunk(total)`` rows in rank order; returns ``[total, *row_shape]`` on the CPU.

        Two collectives: the row shape (a rank with no rows does not know it), then the padded rows.
        """
        if self.world_size <= 1:
            return local.cpu()
        size = math.ceil(total / self.world_size) if total else 0
        width = torch.tensor([local.shape[1] if local.dim() == 2 and local.shape[0] else -1], device=self.device)
        widths = _stacked(self.all_gather(width), width)
        dim = int(widths.max().item())
        if dim < 0 or size == 0:
            return torch.empty(0, max(dim, 0))
        padded = torch.zeros(size, dim, dtype=torch.float32, device=self.device)
        if local.shape[0]:
            padded[: local.shape[0]] = local.to(self.device, torch.float32)
        gathered = _stacked(self.all_gather(padded), padded)
        return gathered.reshape(self.world_size * size, dim)[:total].cpu()


def _stacked(gathered: Tensor, local: Tensor) -> Tensor:
    return gathered[None] if gathered.dim() == local.dim() else gathered


__all__ = ["WorkShare"]
