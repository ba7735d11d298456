"""Stages 2 and 3 of the explanation: the activated regions of every unit, their unique crops and embeddings.

``find_regions`` thresholds each unit's maps at its activation quantile, boxes the activated regions, makes the
previews and merges overlapping boxes of the same sample, so that each unique crop is embedded once and shared
by every unit that uses it. ``embed_crops`` embeds the unique crops and the control crops (whole reservoir images
plus random crops whose sizes follow the top boxes) in large encoder batches, split between ranks under DDP.

Example:
    >>> regions = find_regions(forward, {"layer4": [0, 1]}, ExplainConfig())  # doctest: +SKIP
    >>> crops = embed_crops(encoder, forward, regions, ExplainConfig())  # doctest: +SKIP
    >>> crops.num_unique == regions.crop_bank.numel()  # doctest: +SKIP
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_neurons.backends.base import ImageTextEncoder
from lightning_neurons.explanation.embedding_cache import RegionEmbeddingCache, embed_regions
from lightning_neurons.explanation.forward import ForwardResult, LayerMaps
from lightning_neurons.explanation.settings import ExplainConfig
from lightning_neurons.recording.types import LayerTopK
from lightning_neurons.regions import (
    crop_images,
    crop_masks,
    dedupe_boxes,
    pooled_control_boxes,
    preview_images,
    region_boxes,
    snap_boxes,
    unit_thresholds,
)
from lightning_neurons.sharing import WorkShare

#: ``(layer, unit)`` -> uint8 preview images of the unit's top crops with the region outlined.
Previews = dict[tuple[str, int], Tensor]


@dataclass(frozen=True)
class Regions:
    """The boxes of every ``(unit, top sample)`` pair of a round and the unique crops they share.

    Pairs are the valid ``(unit, rank)`` slots of each layer in row-major order, layers one after the other.

    Args:
        bank_index: int64 ``[P]`` the image-bank row of each pair.
        boxes: int64 ``[P, 4]`` the ``(x0, y0, x1, y1)`` region box of each pair.
        spans: Per layer, its run of pairs.
        crop_index: Per layer, int64 ``[U, k]`` the unique crop of each top slot, best first; ``-1`` where empty.
        crop_bank: int64 ``[K]`` the image-bank row of each unique crop.
        crop_boxes: int64 ``[K, 4]`` its box.
        previews: The preview images of the preview units.
    """

    bank_index: Tensor
    boxes: Tensor
    spans: dict[str, slice]
    crop_index: dict[str, Tensor]
    crop_bank: Tensor
    crop_boxes: Tensor
    previews: Previews


@dataclass(frozen=True)
class CropEmbeddings:
    """Embeddings of a round's unique crops followed by its control crops.

    Rows: the unique top crops, then the control crops (the whole reservoir images first, then each layer's random
    crops), then the whole images of the other fetched samples (the top samples outside the reservoir).

    Args:
        embeddings: CPU float32 ``[num_unique + num_control + extra whole images, D]``.
        num_unique: Unique top crops (the first rows).
        num_control: Control crops (the rows after them).
        layer_controls: Per layer, int64 rows of its control crops (the whole reservoir images and its own random
            crops); ``None``: every control row serves every layer.
        whole_rows: int64 ``[N]`` the row of each image-bank sample's whole image (``None``: not embedded).
    """

    embeddings: Tensor
    num_unique: int
    num_control: int
    layer_controls: dict[str, Tensor] | None = None
    whole_rows: Tensor | None = None

    def control_rows(self, layer: str) -> Tensor:
        """int64 rows of ``layer``'s control crops."""
        if self.layer_controls is not None and layer in self.layer_controls:
            return self.layer_controls[layer]
        return torch.arange(self.num_unique, self.num_unique + self.num_control)


@dataclass(frozen=True)
class _LayerPairs:
    """One layer's valid slots, their boxes, and the region masks of the pairs that get a preview."""

    slots: Tensor  # [P_l] flat ``unit * k + rank``
    k: int
    bank_index: Tensor  # [P_l]
    boxes: Tensor  # [P_l, 4], on the box grid
    shown: Tensor  # [S] the pairs (rows of ``slots``) that get a preview
    shown_boxes: Tensor  # [S, 4], off the grid (the region as found)
    shown_masks: Tensor  # bool [S, mh, mw]


def preview_units(cfg: ExplainConfig, layers: dict[str, LayerTopK]) -> dict[str, list[int]]:
    """``{layer: units}`` to make previews for: ``cfg.preview_units``, else the first 8 units of every layer."""
    if cfg.preview_units is not None:
        return {name: list(units) for name, units in cfg.preview_units.items() if name in layers}
    return {name: list(range(min(8, lt.num_units))) for name, lt in layers.items()}


def find_regions(
    forward: ForwardResult,
    previews_of: dict[str, list[int]],
    cfg: ExplainConfig,
    share: WorkShare | None = None,
) -> Regions:
    """Boxes of every unit's activated regions, deduplicated into unique crops, and the previews.

    Frees each layer's ``top_maps`` once its boxes are found (the maps are the largest part of a round).

    Args:
        forward: The forward stage's result.
        previews_of: ``{layer: units}`` to make previews for.
        cfg: Threshold, box, dedupe and preview settings.
        share: Under DDP, this rank's share: each rank finds the boxes of one chunk of a layer's pairs without a
            preview and all gather them (a pair's box does not depend on the other pairs, so every rank ends with
            the boxes one process finds). ``None``: this process finds every box.
    """
    device = forward.device
    parts: dict[str, _LayerPairs] = {}
    previews: Previews = {}
    for name, lm in forward.layers.items():
        wanted = previews_of.get(name, [])
        parts[name] = _layer_pairs(lm, forward, cfg, wanted, share)
        if wanted:
            previews.update(_layer_previews(name, wanted, parts[name], forward, cfg))
        lm.top_maps = lm.top_maps[:0]  # free the maps
    bank = _cat([p.bank_index for p in parts.values()], torch.empty(0, dtype=torch.long, device=device))
    boxes = _cat([p.boxes for p in parts.values()], torch.empty(0, 4, dtype=torch.long, device=device))
    spans: dict[str, slice] = {}
    crop_index: dict[str, Tensor] = {}
    kept: list[Tensor] = []
    offset = unique = 0
    for name, pairs in parts.items():
        spans[name] = slice(offset, offset + pairs.slots.numel())
        # Boxes are merged within a layer only: which box stands for a merged group must not depend on the
        # other layers explained beside it (a layer's records depend on the layer alone).
        keep, assign = dedupe_boxes(pairs.bank_index, pairs.boxes, cfg.dedupe_iou)
        kept.append(keep + offset)
        shape = forward.layers[name].sample_ids.shape
        index = torch.full((shape.numel(),), -1, dtype=torch.long, device=device)
        index[pairs.slots] = assign + unique
        crop_index[name] = index.reshape(shape)
        offset = spans[name].stop
        unique += int(keep.numel())
    keep_all = _cat(kept, torch.empty(0, dtype=torch.long, device=device))
    return Regions(bank, boxes, spans, crop_index, bank[keep_all], boxes[keep_all], previews)


def _cat(parts: list[Tensor], empty: Tensor) -> Tensor:
    return torch.cat(parts) if parts else empty


def _layer_pairs(
    lm: LayerMaps,
    forward: ForwardResult,
    cfg: ExplainConfig,
    preview_units: list[int],
    share: WorkShare | None = None,
) -> _LayerPairs:
    """Every valid pair's box; the pairs previewed (the first ``preview_count`` of ``preview_units``) with masks too.

    One region pass serves both: a pair's box does not depend on the other pairs of the call, so the previewed pairs
    are found with their masks and the others without, and under DDP each rank finds one chunk of the others (the
    previewed few are found on every rank, which needs their masks on rank 0 and their boxes everywhere).
    """
    num_units, k = lm.sample_ids.shape
    valid = lm.sample_ids >= 0
    thresholds = unit_thresholds(lm.top_maps, lm.control_values(), cfg.quantile, valid)
    slots = torch.nonzero(valid.flatten()).squeeze(1)
    maps = lm.top_maps.reshape(num_units * k, *lm.top_maps.shape[2:])[slots]
    pair_thresholds = thresholds[slots // k]
    wanted = torch.tensor(preview_units, dtype=torch.long, device=slots.device)
    is_shown = torch.isin(slots // k, wanted) & (slots % k < cfg.preview_count)
    shown, hidden = torch.nonzero(is_shown).squeeze(1), torch.nonzero(~is_shown).squeeze(1)
    boxes = torch.empty(slots.numel(), 4, dtype=torch.long, device=slots.device)
    if share is not None and share.world_size > 1:
        part = share.chunk(hidden.numel())
        mine = hidden[part.start : part.stop]
        local, _ = _regions(maps[mine], pair_thresholds[mine], forward.image_size, cfg)
        # Box corners are whole pixels: exact in the float32 of the gather.
        gathered = share.gather_rows(local.reshape(-1, 4), hidden.numel()).reshape(-1, 4)
        boxes[hidden] = gathered.round().to(boxes.device, torch.long)
    else:
        boxes[hidden], _ = _regions(maps[hidden], pair_thresholds[hidden], forward.image_size, cfg)
    shown_boxes, shown_masks = _regions(maps[shown], pair_thresholds[shown], forward.image_size, cfg, masks=True)
    assert shown_masks is not None
    boxes[shown] = shown_boxes
    boxes = snap_boxes(boxes, forward.image_size, cfg.box_grid)
    bank_index = forward.bank_rows(lm.sample_ids.flatten()[slots])
    return _LayerPairs(slots, k, bank_index, boxes, shown, shown_boxes, shown_masks)


def _regions(
    maps: Tensor, thresholds: Tensor, image_size: tuple[int, int], cfg: ExplainConfig, masks: bool = False
) -> tuple[Tensor, Tensor | None]:
    return region_boxes(
        maps,
        thresholds,
        image_size,
        relative_threshold=cfg.relative_threshold,
        padding=cfg.padding,
        min_size=cfg.min_box,
        mask_size=cfg.mask_size,
        component=cfg.component,
        return_masks=masks,
        chunk_size=cfg.region_chunk,
    )


def _layer_previews(
    name: str, units: list[int], pairs: _LayerPairs, forward: ForwardResult, cfg: ExplainConfig
) -> Previews:
    """The first ``preview_count`` top crops of each wanted unit, region outlined, as uint8 CPU images."""
    sel = pairs.shown
    if sel.numel() == 0:
        return {}
    boxes = pairs.shown_boxes
    crops = crop_images(forward.bank, pairs.bank_index[sel], boxes, cfg.preview_size)
    cut = crop_masks(pairs.shown_masks, boxes, forward.image_size, cfg.preview_size)
    images = preview_images(crops, cut).cpu()
    sel_units = (pairs.slots[sel] // pairs.k).cpu()
    previews: Previews = {}
    for u in units:
        rows = torch.nonzero(sel_units == u).squeeze(1)
        if rows.numel():
            previews[(name, int(u))] = images[rows]
    return previews


def control_crops(
    forward: ForwardResult, top_boxes: Tensor, cfg: ExplainConfig, spans: dict[str, slice] | None = None
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Whole reservoir images plus, per layer, control crops whose sizes follow that layer's top boxes.

    The crops come from each reservoir sample's fixed pool (:func:`~lightning_neurons.regions.pooled_control_boxes`):
    a layer's control set depends on its own boxes alone, and layers or rounds whose boxes have similar sizes share
    most crops, which the region-embedding cache then embeds once.

    Args:
        forward: The image bank and the reservoir.
        top_boxes: ``[P, 4]`` every layer's top boxes.
        cfg: ``control_crops_per_image``, ``seed``.
        spans: Each layer's run of ``top_boxes`` (``None``: one pool named ``""``).

    Returns:
        ``(bank rows [M] on the work device, boxes [M, 4] on the CPU, {layer: its control rows in [0, M)})``.
    """
    height, width = image_size = forward.image_size
    reservoir = forward.samples.reservoir.to(forward.device)
    bank_idx = forward.bank_rows(reservoir)
    whole = torch.tensor([[0, 0, width, height]], dtype=torch.long).expand(reservoir.numel(), 4)
    parts_bank, parts_boxes = [bank_idx], [whole]
    whole_rows = torch.arange(reservoir.numel())
    rows: dict[str, Tensor] = {}
    slots = cfg.control_crops_per_image
    n_random = reservoir.numel() * slots
    offset = reservoir.numel()
    for name, span in (spans if spans is not None else {"": slice(0, top_boxes.shape[0])}).items():
        tb = top_boxes[span].float().cpu()
        if n_random and tb.shape[0]:
            fractions = torch.stack([(tb[:, 2] - tb[:, 0]) / width, (tb[:, 3] - tb[:, 1]) / height], dim=1)
            parts_boxes.append(pooled_control_boxes(reservoir, slots, image_size, fractions, cfg.seed))
            parts_bank.append(bank_idx.repeat(slots))
            rows[name] = torch.cat([whole_rows, torch.arange(offset, offset + n_random)])
            offset += n_random
        else:
            rows[name] = whole_rows
    return torch.cat(parts_bank), torch.cat(parts_boxes), rows


def embed_crops(
    encoder: ImageTextEncoder,
    forward: ForwardResult,
    regions: Regions,
    cfg: ExplainConfig,
    share: WorkShare | None = None,
    cache: RegionEmbeddingCache | None = None,
) -> CropEmbeddings:
    """Embed the unique crops, then the control crops; under DDP each rank embeds its chunk and all gather.

    Args:
        encoder: The image side of the image-text encoder.
        forward: The image bank.
        regions: The unique crops.
        cfg: ``crop_size`` (``None``: the encoder's side), ``encoder_batch_size``, control-crop settings.
        share: This rank's share of the work (``None``: this process embeds every crop).
        cache: Embeddings of regions seen in earlier rounds (or layers); only the others are embedded.
    """
    ctrl_bank, ctrl_boxes, ctrl_rows = control_crops(forward, regions.boxes, cfg, regions.spans)
    # The whole images of the other fetched samples (top samples outside the reservoir), for the score and the
    # significance tests, which compare whole images on the reservoir and the top samples alike.
    num_bank = int(forward.bank.shape[0])
    in_reservoir = torch.zeros(num_bank, dtype=torch.bool, device=forward.device)
    reservoir_rows = forward.bank_rows(forward.samples.reservoir.to(forward.device))
    in_reservoir[reservoir_rows] = True
    extra = torch.nonzero(~in_reservoir).squeeze(1)
    height, width = forward.image_size
    extra_boxes = torch.tensor([[0, 0, width, height]], dtype=torch.long, device=forward.device).expand(
        extra.numel(), 4
    )
    jobs_bank = torch.cat([regions.crop_bank, ctrl_bank, extra])
    jobs_boxes = torch.cat([regions.crop_boxes, ctrl_boxes.to(forward.device), extra_boxes])
    num_unique, num_control = int(regions.crop_bank.numel()), int(ctrl_bank.numel())
    whole_rows = torch.empty(num_bank, dtype=torch.long)
    whole_rows[reservoir_rows.cpu()] = torch.arange(reservoir_rows.numel()) + num_unique
    whole_rows[extra.cpu()] = torch.arange(extra.numel()) + num_unique + num_control
    layer_controls = {name: rows + num_unique for name, rows in ctrl_rows.items()}
    if share is not None and share.world_size > 1:
        # DDP: each rank embeds one contiguous chunk of the crops; one gather gives every rank all embeddings.
        part = share.chunk(jobs_bank.numel())
        mine = slice(part.start, part.stop)
        local = embed_region_crops(encoder, forward, jobs_bank[mine], jobs_boxes[mine], cfg, cache)
        embeddings = share.gather_rows(local, jobs_bank.numel())
    else:
        embeddings = embed_region_crops(encoder, forward, jobs_bank, jobs_boxes, cfg, cache)
    return CropEmbeddings(embeddings, num_unique, num_control, layer_controls, whole_rows)


def embed_region_crops(
    encoder: ImageTextEncoder,
    forward: ForwardResult,
    bank_rows: Tensor,
    boxes: Tensor,
    cfg: ExplainConfig,
    cache: RegionEmbeddingCache | None = None,
) -> Tensor:
    """Embed any regions of the round's images (top crops, control crops, whole images); CPU float32 ``[n, D]``.

    A whole image is the box ``(0, 0, W, H)``. With a ``cache`` only regions not embedded before are encoded.

    Args:
        encoder: The image encoder.
        forward: The image bank and its sample ids.
        bank_rows: int64 ``[n]`` bank row of each region.
        boxes: int64 ``[n, 4]`` boxes in input pixels.
        cfg: ``crop_size`` (``None``: the encoder's side), ``encoder_batch_size``, ``show_progress``.
        cache: The session's region cache, or ``None``.
    """
    cfg = cfg.for_encoder(encoder)
    if cache is None:
        return embed_regions(
            encoder, forward.bank, bank_rows, boxes, cfg.crop_side, cfg.encoder_batch_size, cfg.show_progress
        )
    keys = forward.sample_keys()
    return cache.embed(
        encoder,
        forward.bank,
        bank_rows,
        boxes,
        keys,
        crop_size=cfg.crop_side,
        batch_size=cfg.encoder_batch_size,
        show_progress=cfg.show_progress,
    )


__all__ = [
    "CropEmbeddings",
    "Previews",
    "Regions",
    "control_crops",
    "embed_crops",
    "embed_region_crops",
    "find_regions",
    "preview_units",
]
