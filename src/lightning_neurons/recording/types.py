"""Data types produced by the recording half: per-layer top-k buffers and the whole recording."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

UnitKind = Literal["conv", "token", "linear"]
Reduction = Literal["max", "mean"]


@dataclass
class LayerTopK:
    """The top-k activating probe samples of every unit of one layer.

    Args:
        name: Layer name in ``model.named_modules()``.
        kind: ``"conv"`` (``[B, C, H, W]``, unit = channel), ``"token"`` (``[B, T, D]``, unit = hidden dim, map =
            patch grid) or ``"linear"`` (``[B, D]``, no map).
        num_units: Number of units ``U``.
        map_size: ``(h, w)`` of a unit's activation map, ``None`` for linear layers.
        values: ``[U, k]`` float32, best first; ``-inf`` where fewer than ``k`` samples were seen.
        sample_ids: ``[U, k]`` int64 probe-sample ids; ``-1`` where empty.
        peaks: ``[U, k]`` int64 flat index of the peak inside the ``h x w`` map; ``-1`` where empty or no map.
    """

    name: str
    kind: UnitKind
    num_units: int
    map_size: tuple[int, int] | None
    values: Tensor
    sample_ids: Tensor
    peaks: Tensor

    def to_state(self) -> dict[str, Any]:
        """CPU tensors and primitives, safe for ``torch.save`` and Lightning checkpoints."""
        return {
            "name": self.name,
            "kind": self.kind,
            "num_units": self.num_units,
            "map_size": self.map_size,
            "values": self.values.detach().cpu(),
            "sample_ids": self.sample_ids.detach().cpu(),
            "peaks": self.peaks.detach().cpu(),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> LayerTopK:
        """Inverse of :meth:`to_state`."""
        map_size = tuple(state["map_size"]) if state["map_size"] is not None else None
        return cls(**{**state, "map_size": map_size})  # type: ignore[arg-type]


@dataclass
class Recording:
    """Everything one validation pass leaves for the explanation stage.

    Args:
        layers: Per layer name, its :class:`LayerTopK`.
        reservoir_ids: ``[R]`` int64 ids of a uniform random sample of probe samples (the control set).
        num_samples: Number of probe samples seen.
        top_k: ``k``.
        reduction: How a unit's map was reduced to one value per sample.
        nonfinite: Number of NaN/Inf per-sample unit values left out of the ranking.
        epoch: Epoch of the validation pass (``None`` post hoc).
        labels: Optional ``{sample_id: class index}`` of the samples in the top-k sets and the reservoir.
    """

    layers: dict[str, LayerTopK]
    reservoir_ids: Tensor
    num_samples: int
    top_k: int
    reduction: Reduction = "max"
    nonfinite: int = 0
    epoch: int | None = None
    labels: dict[int, int] = field(default_factory=dict)

    def unique_sample_ids(self) -> Tensor:
        """Sorted ids of every sample in any top-k set or in the reservoir."""
        parts = [lt.sample_ids.flatten() for lt in self.layers.values()] + [self.reservoir_ids.flatten()]
        ids = torch.cat([p.cpu() for p in parts]) if parts else torch.empty(0, dtype=torch.long)
        return torch.unique(ids[ids >= 0])

    def to_state(self) -> dict[str, Any]:
        """CPU tensors and primitives, safe for ``torch.save`` and Lightning checkpoints."""
        return {
            "layers": {k: v.to_state() for k, v in self.layers.items()},
            "reservoir_ids": self.reservoir_ids.detach().cpu(),
            "num_samples": self.num_samples,
            "top_k": self.top_k,
            "reduction": self.reduction,
            "nonfinite": self.nonfinite,
            "epoch": self.epoch,
            "labels": dict(self.labels),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Recording:
        """Inverse of :meth:`to_state`."""
        state = dict(state)
        state["layers"] = {k: LayerTopK.from_state(v) for k, v in state["layers"].items()}
        return cls(**state)
