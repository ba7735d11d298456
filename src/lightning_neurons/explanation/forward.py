"""Stage 1 of the explanation: forward the recorded samples again and keep what the later stages need.

The unique top and reservoir samples are fetched in chunks and forwarded with taps (``recording.hooks``, removed
on error too) that keep, per recorded layer, each unit's full map on its own top samples and a random subsample
of its values on the reservoir samples. The images are kept as ``uint8`` on the work device (a quarter of the
float size), so memory is bounded by the number of fetched samples, never the probe set.

Example:
    >>> samples = RoundSamples.of(recording)  # doctest: +SKIP
    >>> forward = forward_samples(model, samples, source, ExplainConfig(), torch.device("cpu"))  # doctest: +SKIP
    >>> forward.bank.dtype, forward.image_size  # doctest: +SKIP
    (torch.uint8, (64, 64))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lightning_neurons.explanation.seeding import layer_generator
from lightning_neurons.explanation.settings import ExplainConfig
from lightning_neurons.recording.hooks import LayerTaps
from lightning_neurons.recording.samples import SampleSource
from lightning_neurons.recording.types import LayerTopK, Recording
from lightning_neurons.regions import images_from_inputs


@dataclass(frozen=True)
class RoundSamples:
    """Which layers a round explains and which probe samples it needs.

    Args:
        layers: The recorded layers with at least one unit.
        ids: Sorted unique ids of every top and reservoir sample (CPU).
        reservoir: Sorted unique ids of the reservoir samples, the control set (CPU).
    """

    layers: dict[str, LayerTopK]
    ids: Tensor
    reservoir: Tensor

    @classmethod
    def of(cls, recording: Recording) -> RoundSamples:
        """The layers and samples of a recording."""
        layers = {name: lt for name, lt in recording.layers.items() if lt.num_units > 0}
        res = recording.reservoir_ids
        return cls(layers, recording.unique_sample_ids(), torch.unique(res[res >= 0].cpu()))


@dataclass
class LayerMaps:
    """What the forward pass keeps for one layer (filled chunk by chunk; the regions stage frees ``top_maps``).

    Args:
        topk: The layer's recording.
        sample_ids: ``[U, k]`` top sample ids on the work device (``-1`` where empty).
        top_maps: ``[U, k, h, w]`` float32 map of each unit on each of its top samples; NaN where not filled.
        control: ``[U, m]`` chunks of each unit's values on the reservoir samples (at most
            ``ceil(max_control_values / reservoir)`` random positions of each sample's map: the quantile threshold's
            sample, memory bounded by ``max_control_values`` per unit).
        reservoir: ``[U, n, 2]`` chunks of each unit's value on each reservoir sample, its whole map reduced by
            ``max`` (``[..., 0]``) and ``mean`` (``[..., 1]``), like the recording's top-k values: ``2 * R`` floats per
            unit, whatever the map size.
    """

    topk: LayerTopK
    sample_ids: Tensor
    top_maps: Tensor
    control: list[Tensor] = field(default_factory=list)
    reservoir: list[Tensor] = field(default_factory=list)

    @classmethod
    def empty(cls, topk: LayerTopK, device: torch.device) -> LayerMaps:
        """Unfilled maps for a layer's recording."""
        h, w = topk.map_size if topk.map_size is not None else (1, 1)
        sample_ids = topk.sample_ids.to(device)
        top = torch.full((topk.num_units, sample_ids.shape[1], h, w), float("nan"), device=device)
        return cls(topk, sample_ids, top)

    def control_values(self) -> Tensor | None:
        """``[U, m]`` every kept reservoir value of each unit (``None`` without reservoir samples)."""
        return torch.cat(self.control, dim=1) if self.control else None

    def reservoir_values(self, reduction: str = "max") -> Tensor | None:
        """``[U, R]`` each unit's whole-map value on each reservoir sample; ``None`` without reservoir samples.

        The map is reduced by ``"max"`` or ``"mean"``, the samples are in forward order. Unlike
        :meth:`control_values` (a random subset of positions for large maps), this is the value the recording would
        give the sample.
        """
        if reduction not in ("max", "mean"):
            raise ValueError(f"reduction must be 'max' or 'mean', got {reduction!r}")
        if not self.reservoir:
            return None
        return torch.cat(self.reservoir, dim=1)[..., 0 if reduction == "max" else 1]


@dataclass(frozen=True)
class ForwardResult:
    """What the forward stage hands on.

    Args:
        samples: The round's layers and sample ids.
        ids: ``samples.ids`` on the work device.
        bank: uint8 ``[N, 3, H, W]`` images of ``samples.ids`` (row ``i`` is sample ``samples.ids[i]``), on the
            work device.
        labels: ``[N]`` class labels (CPU), ``None`` if a probe batch had none.
        layers: :class:`LayerMaps` per explained layer.
    """

    samples: RoundSamples
    ids: Tensor
    bank: Tensor
    labels: Tensor | None
    layers: dict[str, LayerMaps]

    @property
    def device(self) -> torch.device:
        """The work device of regions and scoring."""
        return self.bank.device

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` of the model inputs."""
        return int(self.bank.shape[2]), int(self.bank.shape[3])

    def bank_rows(self, sample_ids: Tensor) -> Tensor:
        """Rows of ``bank`` holding the given (present) sample ids."""
        return torch.searchsorted(self.ids, sample_ids.to(self.device))

    def sample_keys(self) -> list[tuple[int, int, int]]:
        """Per bank row, the region cache's key of its sample: id and pixel fingerprints (computed once)."""
        return self._sample_keys

    @cached_property
    def _sample_keys(self) -> list[tuple[int, int, int]]:
        from lightning_neurons.explanation.embedding_cache import RegionEmbeddingCache

        return RegionEmbeddingCache.sample_keys(self.ids, self.bank)


class _MapKeeper:
    """The taps' target: keeps each forward chunk's maps of each unit's top samples and reservoir values."""

    def __init__(self, layers: dict[str, LayerMaps], reservoir: Tensor, per_sample: int, seed: int) -> None:
        self.layers = layers
        self.reservoir = reservoir
        self.per_sample = per_sample
        self.seed = seed
        self.picks: dict[str, Tensor] = {}
        self.chunk_ids = torch.empty(0, dtype=torch.long)
        self.reservoir_pos = torch.empty(0, dtype=torch.long)
        self.reservoir_index = torch.empty(0, dtype=torch.long)

    def start_chunk(self, chunk_ids: Tensor) -> None:
        self.chunk_ids = chunk_ids
        self.reservoir_pos = torch.nonzero(torch.isin(chunk_ids, self.reservoir)).squeeze(1)
        self.reservoir_index = torch.searchsorted(self.reservoir, chunk_ids[self.reservoir_pos])

    def _picks(self, name: str, hw: int, device: torch.device) -> Tensor:
        """``[R, per_sample]`` map positions kept of each reservoir sample: drawn once per layer from its own
        generator, so they do not depend on the other layers or on how the samples fall into chunks."""
        if name not in self.picks:
            gen = layer_generator(self.seed, name, "control_values")
            self.picks[name] = torch.randint(0, hw, (self.reservoir.numel(), self.per_sample), generator=gen)
        return self.picks[name].to(device)

    def keep(self, name: str, maps: Tensor) -> None:
        lm = self.layers[name]
        num_units, k = lm.sample_ids.shape
        if maps.shape[1] != num_units or tuple(maps.shape[2:]) != tuple(lm.top_maps.shape[2:]):
            raise ValueError(
                f"layer {name!r} now gives unit maps of shape {tuple(maps.shape[1:])}, but the recording has "
                f"{num_units} units with maps {tuple(lm.top_maps.shape[2:])}; explain with the recorded model"
            )
        chunk = self.chunk_ids
        flat_ids = lm.sample_ids.flatten()
        pos = torch.searchsorted(chunk, flat_ids).clamp(max=chunk.numel() - 1)
        hit = torch.nonzero((chunk[pos] == flat_ids) & (flat_ids >= 0)).squeeze(1)
        if hit.numel():
            lm.top_maps.view(num_units * k, *maps.shape[2:])[hit] = maps[pos[hit], hit // k]
        rpos = self.reservoir_pos
        if rpos.numel():
            values = maps[rpos].flatten(2)  # [n_r, U, hw]
            whole = values.float()
            lm.reservoir.append(torch.stack([whole.amax(dim=2), whole.mean(dim=2)], dim=-1).transpose(0, 1))
            hw = values.shape[2]
            if hw > self.per_sample:
                pick = self._picks(name, hw, values.device)[self.reservoir_index.to(values.device)]
                values = values.gather(2, pick[:, None, :].expand(-1, num_units, -1))
            lm.control.append(values.permute(1, 0, 2).reshape(num_units, -1))


class _ImageBank:
    """The fetched inputs as uint8 images in ``[0, 255]``, and their labels while every batch has some."""

    def __init__(self, size: int, cfg: ExplainConfig) -> None:
        self.size, self.cfg = size, cfg
        self.bank: Tensor | None = None
        self.labels: Tensor | None = torch.full((size,), -1, dtype=torch.long)

    def add(self, start: int, inputs: Tensor, labels: Tensor | None, device: torch.device) -> None:
        images = images_from_inputs(inputs.to(device), self.cfg.image_mean, self.cfg.image_std)
        if self.bank is None:
            self.bank = torch.empty(self.size, *images.shape[1:], dtype=torch.uint8, device=device)
        self.bank[start : start + images.shape[0]] = (images * 255).round().to(torch.uint8)
        if labels is None or self.labels is None:
            self.labels = None
        else:
            self.labels[start : start + images.shape[0]] = labels.reshape(-1).long().cpu()


def forward_samples(
    model: nn.Module, samples: RoundSamples, source: SampleSource, cfg: ExplainConfig, device: torch.device
) -> ForwardResult:
    """Forward a round's samples in chunks and keep the unit maps, images and labels.

    Args:
        model: The recorded network (eval mode and no grad while forwarding; its mode is restored).
        samples: The round's layers and samples (non-empty ``ids``).
        source: Gives the probe samples back by id.
        cfg: ``batch_size``, ``max_control_values``, ``seed``, taps and image settings.
        device: The work device the maps and images are kept on.

    Raises:
        ValueError: If a layer's unit maps no longer match the recording.
    """
    layers = {name: LayerMaps.empty(lt, device) for name, lt in samples.layers.items()}
    reservoir = samples.reservoir.to(device)
    per_sample = max(1, math.ceil(cfg.max_control_values / max(1, reservoir.numel())))
    keeper = _MapKeeper(layers, reservoir, per_sample, cfg.seed)
    kinds = {name: lm.topk.kind for name, lm in layers.items()}
    taps = LayerTaps.from_names(model, layers, cfg.output_selector, cfg.token_mode, kinds=kinds)

    def tap(name: str, out: Tensor) -> None:
        keeper.keep(name, taps.unit_maps(name, out.detach()).to(device, torch.float32))

    images = _ImageBank(samples.ids.numel(), cfg)
    ids_dev = samples.ids.to(device)
    # eval mode, no_grad, inputs cast to the parameter dtype; hooks removed and mode restored on error too.
    with taps.hooks(tap, forward_fn=cfg.forward_fn, stop_early=cfg.truncate_forward) as run:
        starts = range(0, ids_dev.numel(), cfg.batch_size)
        for start in tqdm(starts, desc="explain: forward", disable=not cfg.show_progress, leave=False):
            chunk = ids_dev[start : start + cfg.batch_size]
            inputs, chunk_labels = source.fetch(chunk.tolist())
            keeper.start_chunk(chunk)
            run(inputs)
            images.add(start, inputs, chunk_labels, device)
    assert images.bank is not None  # ids is non-empty
    return ForwardResult(samples, ids_dev, images.bank, images.labels, layers)


__all__ = ["ForwardResult", "LayerMaps", "RoundSamples", "forward_samples"]
