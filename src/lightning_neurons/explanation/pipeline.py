"""The explanation stage: a :class:`~lightning_neurons.Recording` in, an ``ExplanationRound`` out.

Stages (docs/ARCHITECTURE.md, "Recording -> explanation"), each timed in ``round.meta["timings"]``:

1. ``forward``: the unique top and reservoir samples are fetched in chunks and forwarded with temporary hooks
   (removed in ``finally``) that keep, per recorded layer, each unit's full map on its own top samples and a
   random subsample of its values on the reservoir samples. The images are kept as ``uint8`` on the device
   (a quarter of the float size), so memory is bounded by the number of fetched samples, never the probe set.
2. ``regions``: per-unit quantile thresholds, boxes of the activated regions, deduplication of overlapping
   boxes of the same sample (each unique crop is embedded once and shared by every unit using it).
3. ``embed``: unique crops and control crops (whole reservoir images plus random crops whose sizes follow the
   top boxes) go through the image encoder in large batches; concept texts are embedded once (a vocabulary
   object with an ``embed(encoder)`` method caches them).
4. ``score``: one similarity product, then per layer the batched concept scores, AUC and margin.
5. optional ``describe`` and ``ablation``; ``previews`` for logging.

Example:
    >>> backend = load_backend("embedded")  # doctest: +SKIP
    >>> round_ = explain_recording(model, recording, source, backend, ["red", "stripes"])  # doctest: +SKIP
    >>> round_.get("layer4", 3).description  # doctest: +SKIP
    'stripes'
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lightning_neurons.backends.base import Backend, ImageTextEncoder
from lightning_neurons.concepts.concept_set import ConceptSet
from lightning_neurons.explanation.ablation import HurtMeasure, ablate_units
from lightning_neurons.explanation.describe import describe_units
from lightning_neurons.explanation.scoring import (
    Correction,
    LayerScores,
    concept_scores,
    score_layer,
    separation,
    similarity,
)
from lightning_neurons.recording.hooks import ForwardFn, LayerTaps, SelectorSpec
from lightning_neurons.recording.hooks import selector_for as _selector_for
from lightning_neurons.recording.samples import SampleSource
from lightning_neurons.recording.types import LayerTopK, Recording
from lightning_neurons.recording.units import OutputSelector, TokenMode
from lightning_neurons.regions import (
    box_area_fraction,
    crop_images,
    crop_masks,
    dedupe_boxes,
    images_from_inputs,
    preview_images,
    random_boxes,
    region_boxes,
    unit_thresholds,
)
from lightning_neurons.results import Alternative, ExplanationRound, UnitExplanation
from lightning_neurons.sharing import WorkShare


@dataclass
class ExplainConfig:
    """Settings of the explanation stage.

    Args:
        crop_size: Side of the square crops given to the image encoder.
        quantile: Per-unit activation quantile that defines the activated region (Network Dissection: 0.995).
        relative_threshold: Fallback threshold, as a fraction of a map's range, where the quantile leaves nothing.
        padding: Padding added on each side of a region box, as a fraction of its size.
        min_box: Minimum box side as a fraction of the image's shorter side.
        mask_size: Long side of the resolution at which region masks are computed.
        component: ``"peak"`` (the connected component holding the peak) or ``"all"`` (the whole mask's box).
        dedupe_iou: Boxes of the same sample overlapping more than this become one crop.
        num_alternatives: Runner-up concepts kept per unit.
        correction: ``"control"`` (minus the mean similarity on control crops) or ``"soft_wpmi"`` (CLIP-Dissect).
        wpmi_temperature: Softmax scale for soft-WPMI.
        control_crops_per_image: Random crops per reservoir image added to the control set (besides the whole image).
        max_control_values: Reservoir activations kept per unit for the quantile threshold.
        describe: Run the caption-and-summarise stage (needs a captioner and a text generator in the backend).
        describe_crops: Top crops captioned per unit.
        ablation: Run the ablation check (needs labels in the recording source).
        ablation_units: Units to ablate per layer; ``None`` = the preview units.
        ablation_top: Classes reported per ablated unit.
        ablation_measure: How much zeroing a unit hurts a class: ``"probability"`` (default), the drop of the
            class's mean true-class softmax probability; ``"accuracy"``, the drop of its top-1 accuracy, which
            moves in steps of one image per class and is mostly noise on a reservoir of a few hundred samples.
        batch_size: Probe samples per model forward.
        encoder_batch_size: Crops per image-encoder call.
        region_chunk: ``(unit, sample)`` pairs per vectorised region step.
        image_mean: Per-channel mean the model inputs were normalised with (``None``: per-image min-max).
        image_std: Per-channel standard deviation of that normalisation.
        token_mode: How token outputs become patch grids (as in recording).
        output_selector: Which part of a layer's output holds the units: one selector or
            ``{layer name or glob: selector}`` (as in recording).
        forward_fn: How to run the model on a batch of probe inputs, ``forward_fn(model, inputs)`` (``None``:
            ``model(inputs)``), for models whose ``forward`` is not ``forward(images)``; used by the forward
            pass and the ablation.
        preview_size: Side of the preview images.
        preview_count: Previews per unit.
        preview_units: ``{layer: [units]}`` to make previews for; ``None`` = the first 8 units of every layer.
        device: Device for region extraction and scoring; ``None`` = the model's device.
        truncate_forward: Stop each explanation forward pass as soon as every recorded layer has produced its
            output (the rest of the network is not needed: explaining early layers then costs a fraction of a
            full forward). Leave ``False`` for models that call a recorded module more than once per forward.
        seed: Seed of the random control crops.
        show_progress: Show tqdm progress bars.

    Example:
        >>> ExplainConfig(correction="soft_wpmi", crop_size=128).crop_size
        128
    """

    crop_size: int = 224
    quantile: float = 0.995
    relative_threshold: float = 0.5
    padding: float = 0.1
    min_box: float = 0.1
    mask_size: int = 112
    component: Literal["peak", "all"] = "peak"
    dedupe_iou: float = 0.8
    num_alternatives: int = 4
    correction: Correction = "control"
    wpmi_temperature: float = 10.0
    control_crops_per_image: int = 1
    max_control_values: int = 65536
    describe: bool = False
    describe_crops: int = 5
    ablation: bool = False
    ablation_units: dict[str, list[int]] | None = None
    ablation_top: int = 3
    ablation_measure: HurtMeasure = "probability"
    batch_size: int = 64
    encoder_batch_size: int = 256
    region_chunk: int = 1024
    image_mean: tuple[float, ...] | None = None
    image_std: tuple[float, ...] | None = None
    token_mode: TokenMode = "auto"
    output_selector: SelectorSpec = None
    forward_fn: ForwardFn | None = None
    preview_size: int = 64
    preview_count: int = 8
    preview_units: dict[str, list[int]] | None = None
    device: str | None = None
    truncate_forward: bool = False
    seed: int = 0
    show_progress: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.quantile <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {self.quantile}")
        if not 0.0 <= self.relative_threshold <= 1.0:
            raise ValueError(f"relative_threshold must be in [0, 1], got {self.relative_threshold}")
        if self.correction not in ("control", "soft_wpmi"):
            raise ValueError(f"correction must be 'control' or 'soft_wpmi', got {self.correction!r}")
        if self.component not in ("peak", "all"):
            raise ValueError(f"component must be 'peak' or 'all', got {self.component!r}")
        for name in ("crop_size", "batch_size", "encoder_batch_size", "region_chunk", "mask_size", "preview_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    def selector_for(self, layer: str) -> OutputSelector | None:
        """The output selector of one layer: an exact key of ``output_selector``, else its first matching glob."""
        return _selector_for(self.output_selector, layer)


@dataclass
class _LayerState:
    """What the forward pass keeps for one layer."""

    topk: LayerTopK
    sample_ids: Tensor  # [U, k] on the work device
    top_maps: Tensor  # [U, k, h, w] float32, NaN where not (yet) filled
    control: list[Tensor] = field(default_factory=list)  # [U, m] chunks


@dataclass
class _Pass:
    """Samples of the current forward chunk, read by the hooks."""

    chunk_ids: Tensor | None = None
    reservoir_pos: Tensor | None = None


def explain_recording(
    model: nn.Module,
    recording: Recording,
    source: SampleSource,
    backend: Backend | ImageTextEncoder,
    concepts: Any,
    config: ExplainConfig | None = None,
    *,
    epoch: int | None = None,
    class_names: Sequence[str] | None = None,
    share: WorkShare | None = None,
) -> ExplanationRound:
    """Explain every recorded unit with the best concept of a vocabulary, scored against control crops.

    Args:
        model: The network the recording came from (its training mode is restored afterwards).
        recording: Top-k samples per unit and the reservoir (see :func:`~lightning_neurons.collect_top_k`).
        source: Gives the probe samples back by id.
        backend: A :class:`~lightning_neurons.Backend` (or just an image-text encoder).
        concepts: Candidate concepts: a :class:`~lightning_neurons.concepts.concept_set.ConceptSet`, a list of
            strings, a ``(texts, embeddings)`` pair, or a vocabulary object
            with an ``embed(encoder)`` method (its cached embeddings are used).
        config: Settings (defaults: :class:`ExplainConfig`).
        epoch: Epoch stamped on the results (default: ``recording.epoch``).
        class_names: Names of the class indices, for the ablation check.
        share: This rank's share of the crop embedding under DDP (``None``: this process embeds every crop).

    Returns:
        The :class:`~lightning_neurons.ExplanationRound`, with ``meta`` (counts, timings, correction) and
        ``previews`` for the preview units.

    Raises:
        KeyError: If a recorded layer is not a module of ``model``.
        ValueError: If the model outputs no longer match the recording, or a needed backend part is missing.

    Example:
        >>> rnd = explain_recording(model, recording, source, backend, ["red", "green"])  # doctest: +SKIP
        >>> rnd.meta["unique_crops"] <= rnd.meta["crops"]  # doctest: +SKIP
        True
    """
    cfg = config or ExplainConfig()
    encoder = backend.encoder if isinstance(backend, Backend) else backend
    timings: dict[str, float] = {}
    epoch = recording.epoch if epoch is None else epoch
    model_device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(cfg.device) if cfg.device else model_device
    layers = {name: lt for name, lt in recording.layers.items() if lt.num_units > 0}
    modules = dict(model.named_modules(remove_duplicate=False))
    unknown = [name for name in layers if name not in modules]
    if unknown:
        raise KeyError(f"recorded layers {unknown} are not modules of the model")

    ids = recording.unique_sample_ids()
    meta: dict[str, Any] = {
        "backend": getattr(backend, "name", type(backend).__name__),
        "encoder": getattr(encoder, "name", type(encoder).__name__),
        "correction": cfg.correction,
        "quantile": cfg.quantile,
        "top_k": recording.top_k,
        "samples": int(ids.numel()),
        "timings": timings,
    }
    if ids.numel() == 0:
        meta.update(units=0, crops=0, unique_crops=0, control_crops=0, concepts=0)
        return ExplanationRound(epoch=epoch, units=[], meta=meta)

    # 1. forward
    t0 = time.perf_counter()
    bank, labels, states = _forward_pass(model, recording, layers, modules, source, ids, cfg, device, model_device)
    image_size = (bank.shape[2], bank.shape[3])
    timings["forward"] = time.perf_counter() - t0

    # 2. regions
    t0 = time.perf_counter()
    ids_dev = ids.to(device)
    pair_bank: list[Tensor] = []
    pair_boxes: list[Tensor] = []
    pair_slots: dict[str, Tensor] = {}
    previews: dict[tuple[str, int], Tensor] = {}
    preview_units = _preview_units(cfg, layers)
    for name, st in states.items():
        num_units, k = st.sample_ids.shape
        valid = st.sample_ids >= 0
        control = torch.cat(st.control, dim=1) if st.control else None
        thresholds = unit_thresholds(st.top_maps, control, cfg.quantile, valid)
        slots = torch.nonzero(valid.flatten()).squeeze(1)
        maps = st.top_maps.reshape(num_units * k, *st.top_maps.shape[2:])[slots]
        boxes, _ = _regions(maps, thresholds[slots // k], image_size, cfg)
        bank_idx = torch.searchsorted(ids_dev, st.sample_ids.flatten()[slots])
        pair_bank.append(bank_idx)
        pair_boxes.append(boxes)
        pair_slots[name] = slots
        wanted = preview_units.get(name, [])
        if wanted:
            _add_previews(previews, name, wanted, slots, k, maps, thresholds, bank, bank_idx, image_size, cfg)
        st.top_maps = st.top_maps[:0]  # free the maps
    all_bank = torch.cat(pair_bank) if pair_bank else torch.empty(0, dtype=torch.long, device=device)
    all_boxes = torch.cat(pair_boxes) if pair_boxes else torch.empty(0, 4, dtype=torch.long, device=device)
    keep, assign = dedupe_boxes(all_bank, all_boxes, cfg.dedupe_iou)
    crop_bank, crop_boxes = all_bank[keep], all_boxes[keep]
    timings["regions"] = time.perf_counter() - t0

    # 3. embed crops (unique top crops, then control crops) and concepts
    t0 = time.perf_counter()
    res_ids = torch.unique(recording.reservoir_ids[recording.reservoir_ids >= 0].cpu()).to(device)
    ctrl_bank, ctrl_boxes = _control_crops(res_ids, ids_dev, all_boxes, image_size, cfg)
    jobs_bank = torch.cat([crop_bank, ctrl_bank])
    jobs_boxes = torch.cat([crop_boxes, ctrl_boxes.to(device)])
    if share is not None and share.world_size > 1:
        # DDP: each rank embeds one contiguous chunk of the crops; one gather gives every rank all embeddings.
        part = share.chunk(jobs_bank.numel())
        local = _embed_crops(encoder, bank, jobs_bank[part.start : part.stop], jobs_boxes[part.start : part.stop], cfg)
        embeddings = share.gather_rows(local, jobs_bank.numel())
    else:
        embeddings = _embed_crops(encoder, bank, jobs_bank, jobs_boxes, cfg)
    timings["embed_crops"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    texts, text_emb = _concept_embeddings(concepts, encoder, cfg.encoder_batch_size)
    timings["embed_concepts"] = time.perf_counter() - t0

    # 4. score
    t0 = time.perf_counter()
    num_unique = int(keep.numel())
    sims = similarity(embeddings.to(device), text_emb.to(device))  # [K + M, C]: the one big product
    crop_sims, control_sims = sims[:num_unique], sims[num_unique:]
    crop_index: dict[str, Tensor] = {}
    scores: dict[str, LayerScores] = {}
    offset = 0
    for name, st in states.items():
        slots = pair_slots[name]
        index = torch.full((st.sample_ids.numel(),), -1, dtype=torch.long, device=device)
        index[slots] = assign[offset : offset + slots.numel()]
        offset += slots.numel()
        crop_index[name] = index.reshape(st.sample_ids.shape)
        scores[name] = score_layer(
            crop_sims,
            crop_index[name],
            control_sims,
            cfg.correction,
            cfg.num_alternatives,
            **({"temperature": cfg.wpmi_temperature} if cfg.correction == "soft_wpmi" else {}),
        )
    timings["score"] = time.perf_counter() - t0

    units = _build_units(states, scores, crop_index, all_boxes, pair_slots, texts, epoch)

    # 5. optional stages
    if cfg.describe:
        t0 = time.perf_counter()
        _describe(
            backend,
            encoder,
            units,
            states,
            crop_index,
            scores,
            embeddings,
            num_unique,
            text_emb,
            texts,
            bank,
            crop_bank,
            crop_boxes,
            cfg,
            device,
        )
        timings["describe"] = time.perf_counter() - t0
    if cfg.ablation:
        t0 = time.perf_counter()
        _ablation(model, modules, layers, units, source, res_ids.cpu(), cfg, preview_units, class_names)
        timings["ablation"] = time.perf_counter() - t0

    meta.update(
        units=len(units),
        crops=int(all_boxes.shape[0]),
        unique_crops=num_unique,
        control_crops=int(ctrl_bank.numel()),
        concepts=len(texts),
        mean_box_area=box_area_fraction(all_boxes, image_size),
        labels=labels is not None,
    )
    return ExplanationRound(epoch=epoch, units=units, meta=meta, previews=previews)


@contextmanager
def _train_mode_restored(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    try:
        model.eval()
        yield
    finally:
        model.train(was_training)


def _forward_pass(
    model: nn.Module,
    recording: Recording,
    layers: dict[str, LayerTopK],
    modules: dict[str, nn.Module],
    source: SampleSource,
    ids: Tensor,
    cfg: ExplainConfig,
    device: torch.device,
    model_device: torch.device,
) -> tuple[Tensor, Tensor | None, dict[str, _LayerState]]:
    """Forward the fetched samples; returns the uint8 image bank, the labels and the per-layer state."""
    states: dict[str, _LayerState] = {}
    for name, lt in layers.items():
        h, w = lt.map_size if lt.map_size is not None else (1, 1)
        sample_ids = lt.sample_ids.to(device)
        top = torch.full((lt.num_units, sample_ids.shape[1], h, w), float("nan"), device=device)
        states[name] = _LayerState(lt, sample_ids, top)
    reservoir = torch.unique(recording.reservoir_ids[recording.reservoir_ids >= 0].cpu()).to(device)
    per_sample = max(1, math.ceil(cfg.max_control_values / max(1, reservoir.numel())))
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    current = _Pass()
    kinds = {name: st.topk.kind for name, st in states.items()}
    taps = LayerTaps.from_names(model, states, cfg.output_selector, cfg.token_mode, kinds=kinds)

    def tap(name: str, out: Tensor) -> None:
        maps = taps.unit_maps(name, out.detach()).to(device, torch.float32)
        _consume(states[name], maps, current, name, per_sample, gen)

    bank: Tensor | None = None
    labels: Tensor | None = torch.full((ids.numel(),), -1, dtype=torch.long)
    ids_dev = ids.to(device)
    # eval mode, no_grad, inputs cast to the parameter dtype; hooks removed and mode restored on error too.
    with taps.hooks(tap, forward_fn=cfg.forward_fn, stop_early=cfg.truncate_forward) as run:
        starts = range(0, ids.numel(), cfg.batch_size)
        for start in tqdm(starts, desc="explain: forward", disable=not cfg.show_progress, leave=False):
            chunk = ids_dev[start : start + cfg.batch_size]
            inputs, chunk_labels = source.fetch(chunk.tolist())
            current.chunk_ids = chunk
            current.reservoir_pos = torch.nonzero(torch.isin(chunk, reservoir)).squeeze(1)
            run(inputs)
            images = images_from_inputs(inputs.to(device), cfg.image_mean, cfg.image_std)
            if bank is None:
                bank = torch.empty(ids.numel(), *images.shape[1:], dtype=torch.uint8, device=device)
            bank[start : start + chunk.numel()] = (images * 255).round().to(torch.uint8)
            if chunk_labels is None or labels is None:
                labels = None
            else:
                labels[start : start + chunk.numel()] = chunk_labels.reshape(-1).long().cpu()
    assert bank is not None  # ids is non-empty
    return bank, labels, states


def _consume(st: _LayerState, maps: Tensor, current: _Pass, name: str, per_sample: int, gen: torch.Generator) -> None:
    """Keep a chunk's maps of each unit's top samples, and a subsample of the reservoir samples' values."""
    num_units, k = st.sample_ids.shape
    if maps.shape[1] != num_units or tuple(maps.shape[2:]) != tuple(st.top_maps.shape[2:]):
        raise ValueError(
            f"layer {name!r} now gives unit maps of shape {tuple(maps.shape[1:])}, but the recording has "
            f"{num_units} units with maps {tuple(st.top_maps.shape[2:])}; explain with the recorded model"
        )
    chunk = current.chunk_ids
    assert chunk is not None
    flat_ids = st.sample_ids.flatten()
    pos = torch.searchsorted(chunk, flat_ids).clamp(max=chunk.numel() - 1)
    hit = torch.nonzero((chunk[pos] == flat_ids) & (flat_ids >= 0)).squeeze(1)
    if hit.numel():
        st.top_maps.view(num_units * k, *maps.shape[2:])[hit] = maps[pos[hit], hit // k]
    rpos = current.reservoir_pos
    if rpos is not None and rpos.numel():
        values = maps[rpos].flatten(2)  # [n_r, U, hw]
        hw = values.shape[2]
        if hw > per_sample:
            pick = torch.randint(0, hw, (rpos.numel(), per_sample), generator=gen).to(values.device)
            values = values.gather(2, pick[:, None, :].expand(-1, num_units, -1))
        st.control.append(values.permute(1, 0, 2).reshape(num_units, -1))


def _regions(maps: Tensor, thresholds: Tensor, image_size: tuple[int, int], cfg: ExplainConfig, masks: bool = False):
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


def _preview_units(cfg: ExplainConfig, layers: dict[str, LayerTopK]) -> dict[str, list[int]]:
    if cfg.preview_units is not None:
        return {name: list(units) for name, units in cfg.preview_units.items() if name in layers}
    return {name: list(range(min(8, lt.num_units))) for name, lt in layers.items()}


def _add_previews(
    previews: dict[tuple[str, int], Tensor],
    name: str,
    units: list[int],
    slots: Tensor,
    k: int,
    maps: Tensor,
    thresholds: Tensor,
    bank: Tensor,
    bank_idx: Tensor,
    image_size: tuple[int, int],
    cfg: ExplainConfig,
) -> None:
    unit_of = slots // k
    rank_of = slots % k
    wanted = torch.tensor(units, device=slots.device)
    sel = torch.nonzero(torch.isin(unit_of, wanted) & (rank_of < cfg.preview_count)).squeeze(1)
    if sel.numel() == 0 or cfg.preview_count <= 0:
        return
    boxes, masks = _regions(maps[sel], thresholds[unit_of[sel]], image_size, cfg, masks=True)
    assert masks is not None
    crops = crop_images(bank, bank_idx[sel], boxes, cfg.preview_size)
    cut = crop_masks(masks, boxes, image_size, cfg.preview_size)
    images = preview_images(crops, cut).cpu()
    sel_units = unit_of[sel].cpu()
    for u in units:
        rows = torch.nonzero(sel_units == u).squeeze(1)
        if rows.numel():
            previews[(name, int(u))] = images[rows]


def _control_crops(
    reservoir: Tensor, ids: Tensor, top_boxes: Tensor, image_size: tuple[int, int], cfg: ExplainConfig
) -> tuple[Tensor, Tensor]:
    """Whole reservoir images plus random crops whose sizes are drawn from the top boxes' sizes."""
    height, width = image_size
    bank_idx = torch.searchsorted(ids, reservoir)
    whole = torch.tensor([[0, 0, width, height]], dtype=torch.long).expand(reservoir.numel(), 4)
    parts_bank, parts_boxes = [bank_idx], [whole]
    n_random = reservoir.numel() * cfg.control_crops_per_image
    if n_random:
        tb = top_boxes.float().cpu()
        fractions = torch.stack([(tb[:, 2] - tb[:, 0]) / width, (tb[:, 3] - tb[:, 1]) / height], dim=1)
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        parts_boxes.append(random_boxes(n_random, image_size, fractions, gen))
        parts_bank.append(bank_idx.repeat(cfg.control_crops_per_image))
    return torch.cat(parts_bank), torch.cat(parts_boxes)


def _embed_crops(
    encoder: ImageTextEncoder, bank: Tensor, bank_idx: Tensor, boxes: Tensor, cfg: ExplainConfig
) -> Tensor:
    """Cut and embed crops in encoder-sized batches; returns CPU float32 ``[n, D]``."""
    out: list[Tensor] = []
    starts = range(0, bank_idx.numel(), cfg.encoder_batch_size)
    with torch.no_grad():
        for start in tqdm(starts, desc="explain: embed crops", disable=not cfg.show_progress, leave=False):
            sl = slice(start, start + cfg.encoder_batch_size)
            crops = crop_images(bank, bank_idx[sl], boxes[sl], cfg.crop_size)
            out.append(encoder.encode_images(crops).float().cpu())
    if not out:
        return torch.empty(0, 0)
    return torch.cat(out)


def _vocabulary_texts(vocabulary: Any) -> list[str]:
    for attr in ("concepts", "texts", "terms", "words"):
        value = getattr(vocabulary, attr, None)
        if value is not None and not callable(value):
            return [str(t) for t in value]
    return [str(t) for t in vocabulary]


def _concept_embeddings(concepts: Any, encoder: ImageTextEncoder, batch_size: int) -> tuple[list[str], Tensor]:
    """Texts and L2-normalised embeddings of the candidate concepts (duck-typed vocabulary objects cache them)."""
    if isinstance(concepts, str):
        raise TypeError("concepts must be a list of strings (or a vocabulary), not a single string")
    if isinstance(concepts, ConceptSet):
        texts, emb = list(concepts.texts), concepts.embeddings
    elif isinstance(concepts, tuple) and len(concepts) == 2 and isinstance(concepts[1], Tensor):
        texts, emb = [str(t) for t in concepts[0]], concepts[1]
    elif hasattr(concepts, "embed"):
        result = concepts.embed(encoder)
        if isinstance(result, tuple):
            texts, emb = [str(t) for t in result[0]], result[1]
        else:
            texts, emb = _vocabulary_texts(concepts), result
    else:
        texts = [str(t) for t in concepts]
        with torch.no_grad():
            chunks = [encoder.encode_texts(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
        emb = torch.cat(chunks) if chunks else torch.empty(0, 0)
    if not texts:
        raise ValueError("the concept vocabulary is empty")
    if emb.shape[0] != len(texts):
        raise ValueError(f"{len(texts)} concepts but {emb.shape[0]} concept embeddings")
    return texts, emb.float()


def _build_units(
    states: dict[str, _LayerState],
    scores: dict[str, LayerScores],
    crop_index: dict[str, Tensor],
    all_boxes: Tensor,
    pair_slots: dict[str, Tensor],
    texts: list[str],
    epoch: int | None,
) -> list[UnitExplanation]:
    # Everything per unit is read back as flat Python lists once per layer and sliced, never indexed per unit:
    # a tensor index per unit costs microseconds, which at 100k units is most of a round. The cyclic garbage
    # collector is paused meanwhile: millions of new lists and floats would trigger full collections that
    # cost more than the building itself (4x measured at 8,192 units) and would find no cycles in them.
    import gc

    paused = gc.isenabled()
    gc.disable()
    try:
        return _build_units_unpaused(states, scores, crop_index, all_boxes, pair_slots, texts, epoch)
    finally:
        if paused:
            gc.enable()


def _build_units_unpaused(
    states: dict[str, _LayerState],
    scores: dict[str, LayerScores],
    crop_index: dict[str, Tensor],
    all_boxes: Tensor,
    pair_slots: dict[str, Tensor],
    texts: list[str],
    epoch: int | None,
) -> list[UnitExplanation]:
    units: list[UnitExplanation] = []
    boxes_cpu = [tuple(b) for b in all_boxes.cpu().tolist()]
    offset = 0
    nan = float("nan")
    for name, st in states.items():
        lt = st.topk
        num_units = lt.sample_ids.shape[0]
        sc = scores[name]
        top_idx, top_val = sc.top_indices.cpu().tolist(), sc.top_values.cpu().tolist()
        auc, margin = sc.auc.cpu().tolist(), sc.margin.cpu().tolist()
        ids_cpu, vals_cpu = lt.sample_ids.cpu(), lt.values.cpu().float()
        valid = ids_cpu >= 0
        # The layer's pairs are its valid (unit, rank) slots in row-major order, so unit u's boxes, ids and
        # activations are one contiguous run of them.
        ends = valid.sum(dim=1).cumsum(0).tolist()
        flat_ids = ids_cpu[valid].tolist()
        flat_vals = vals_cpu[valid].tolist()
        layer_boxes = boxes_cpu[offset : offset + pair_slots[name].numel()]
        offset += pair_slots[name].numel()
        has = (crop_index[name] >= 0).any(dim=1).cpu().tolist()
        start = 0
        for u in range(num_units):
            end = ends[u]
            if not has[u]:
                units.append(UnitExplanation(layer=name, unit=u, epoch=epoch, description="", score=nan))
                start = end
                continue
            idx, val = top_idx[u], top_val[u]
            units.append(
                UnitExplanation(
                    layer=name,
                    unit=u,
                    epoch=epoch,
                    description=texts[idx[0]],
                    score=float(auc[u]),
                    margin=float(margin[u]),
                    concept_score=float(val[0]),
                    alternatives=[Alternative(texts[i], float(v)) for i, v in zip(idx[1:], val[1:])],
                    source="concept",
                    top_sample_ids=flat_ids[start:end],
                    activations=flat_vals[start:end],
                    boxes=layer_boxes[start:end],  # type: ignore[arg-type]
                )
            )
            start = end
    return units


def _describe(
    backend: Any,
    encoder: ImageTextEncoder,
    units: list[UnitExplanation],
    states: dict[str, _LayerState],
    crop_index: dict[str, Tensor],
    scores: dict[str, LayerScores],
    embeddings: Tensor,
    num_unique: int,
    text_emb: Tensor,
    texts: list[str],
    bank: Tensor,
    crop_bank: Tensor,
    crop_boxes: Tensor,
    cfg: ExplainConfig,
    device: torch.device,
) -> None:
    """Caption-and-summarise each unit; keep the phrase where it beats the best concept."""
    captioner, generator = getattr(backend, "captioner", None), getattr(backend, "generator", None)
    if captioner is None or generator is None:
        raise ValueError("describe=True needs a backend with a captioner and a text generator (e.g. 'embedded')")
    by_key = {u.key: u for u in units}
    emb = embeddings.to(device)
    for name in states:
        index = crop_index[name].cpu()
        sc = scores[name]
        unit_ids = [u for u in range(index.shape[0]) if bool((index[u] >= 0).any())]
        if not unit_ids:
            continue
        unit_crops = [[int(i) for i in index[u][index[u] >= 0][: cfg.describe_crops]] for u in unit_ids]
        unit_concepts = [[texts[int(i)] for i in sc.top_indices[u][:3]] for u in unit_ids]

        def load(ids_: list[int]) -> Tensor:
            sel = torch.tensor(ids_, device=crop_bank.device)
            return crop_images(bank, crop_bank[sel], crop_boxes[sel], cfg.crop_size)

        phrases = describe_units(captioner, generator, unit_crops, load, unit_concepts, max_words=6)
        todo = [(u, p) for u, p in zip(unit_ids, phrases) if p]
        if not todo:
            continue
        with torch.no_grad():
            phrase_emb = encoder.encode_texts([p for _, p in todo]).float().to(device)
        sims = similarity(emb, torch.cat([text_emb.to(device), phrase_emb]))  # [K + M, C + n]
        rows = torch.tensor([u for u, _ in todo], device=device)
        sub_index = crop_index[name][rows]
        valid = sub_index >= 0
        top_sims = sims[:num_unique][sub_index.clamp_min(0)]
        control = sims[num_unique:]
        extra: dict[str, Any] = {"temperature": cfg.wpmi_temperature} if cfg.correction == "soft_wpmi" else {}
        if cfg.correction == "soft_wpmi":
            # p(c) of soft-WPMI is a mean over the layer's units: score all of them with the phrases added.
            full_index = crop_index[name]
            all_scores = concept_scores(
                sims[:num_unique][full_index.clamp_min(0)], full_index >= 0, control, cfg.correction, **extra
            )
            aug = all_scores[rows]
        else:
            aug = concept_scores(top_sims, valid, control, cfg.correction)
        num_c = len(texts)
        cols = num_c + torch.arange(len(todo), device=device)
        phrase_score = aug[torch.arange(len(todo), device=device), cols]
        best_concept = aug[:, :num_c].max(dim=1).values
        auc, margin = separation(top_sims, valid, control, cols)
        for j, (u, phrase) in enumerate(todo):
            if float(phrase_score[j]) <= float(best_concept[j]):
                continue
            ex = by_key[(name, u)]
            ex.alternatives = [Alternative(ex.description, ex.concept_score), *ex.alternatives][: cfg.num_alternatives]
            ex.description, ex.source = phrase, "describe"
            ex.concept_score = float(phrase_score[j])
            ex.score, ex.margin = float(auc[j]), float(margin[j])


def _ablation(
    model: nn.Module,
    modules: dict[str, nn.Module],
    layers: dict[str, LayerTopK],
    units: list[UnitExplanation],
    source: SampleSource,
    reservoir: Tensor,
    cfg: ExplainConfig,
    preview_units: dict[str, list[int]],
    class_names: Sequence[str] | None,
) -> None:
    """Zero each chosen unit on the reservoir samples (an unbiased probe subset) and note the classes hurt."""
    if reservoir.numel() == 0:
        raise ValueError("ablation=True needs reservoir samples in the recording")
    inputs, labels = source.fetch(reservoir.tolist())
    if labels is None:
        raise ValueError("ablation=True needs class labels in the probe batches")
    chosen = cfg.ablation_units if cfg.ablation_units is not None else preview_units
    by_key = {u.key: u for u in units}
    with _train_mode_restored(model):
        for name, unit_list in chosen.items():
            if name not in layers or not unit_list:
                continue
            result = ablate_units(
                model,
                modules[name],
                layers[name].kind,
                unit_list,
                inputs,
                labels,
                class_names=class_names,
                top=cfg.ablation_top,
                batch_size=cfg.batch_size,
                output_selector=cfg.selector_for(name),
                layer_name=name,
                measure=cfg.ablation_measure,
                forward_fn=cfg.forward_fn,
            )
            for u, hurt in result.items():
                if (name, u) in by_key:
                    by_key[(name, u)].ablation = hurt


__all__ = ["ExplainConfig", "explain_recording"]
