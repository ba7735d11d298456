"""The explanation stage: a :class:`~lightning_neurons.Recording` in, an ``ExplanationRound`` out.

Stages (docs/ARCHITECTURE.md, "Recording -> explanation"), each a function of its own module that hands the next
one a small dataclass, each timed in ``round.meta["timings"]``:

1. ``forward`` (:mod:`.forward`): :class:`RoundSamples` -> :class:`ForwardResult`. The unique top and reservoir
   samples are fetched in chunks and forwarded with taps that keep, per recorded layer, each unit's full map on
   its own top samples and a random subsample of its values on the reservoir samples; images are kept as
   ``uint8`` on the device, so memory is bounded by the number of fetched samples, never the probe set.
2. ``regions`` (:mod:`.crops`): -> :class:`Regions`. Per-unit quantile thresholds, boxes of the activated regions,
   previews, deduplication of overlapping boxes of the same sample (each unique crop is embedded once).
3. ``embed_crops`` (:mod:`.crops`): -> :class:`CropEmbeddings`, unique crops and control crops (whole reservoir
   images plus random crops whose sizes follow the top boxes) in large encoder batches, split between DDP ranks;
   ``embed_concepts`` (:mod:`.units`): -> :class:`~lightning_neurons.concepts.concept_set.ConceptSet`.
4. ``score`` (:mod:`.units`): one similarity product; ``significance`` (:mod:`.significance`): per layer each
   unit's correlation with every concept over the reservoir and its top samples (whole images), the permutation
   test (selection repeated, Benjamini-Hochberg over the layer), the cross-validated gain over image statistics and
   the unit's kind; then per layer the description (by correlation, or by the corrected concept score of
   :mod:`.correction`), its correlation (``score``), AUC and margin; :class:`RoundEvidence` -> ``UnitExplanation``
   list. Every random draw comes from the layer's own generator (:mod:`.seeding`): a layer's records do not depend
   on the other layers explained beside it.
5. ``multi_concept`` (:mod:`.multi_concept`, ``ExplainConfig.multi_concept``): each unit's combination of up to
   ``max_concepts`` concepts, fitted on its top crops and the reservoir images, kept where it simulates better.
6. optional ``describe`` (:mod:`.phrases`) and ``ablation``.

Example:
    >>> backend = load_backend("embedded")  # doctest: +SKIP
    >>> round_ = explain_recording(model, recording, source, backend, ["red", "stripes"])  # doctest: +SKIP
    >>> round_.get("layer4", 3).description  # doctest: +SKIP
    'stripes'
"""


from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lightning_neurons.backends.base import Backend, ImageTextEncoder
from lightning_neurons.explanation.ablation import ablate_units
from lightning_neurons.explanation.crops import CropEmbeddings, Regions, embed_crops, find_regions, preview_units
from lightning_neurons.explanation.embedding_cache import RegionEmbeddingCache
from lightning_neurons.explanation.forward import ForwardResult, RoundSamples, forward_samples
from lightning_neurons.explanation.multi_concept import combine_units
from lightning_neurons.explanation.phrases import rephrase_units
from lightning_neurons.explanation.settings import ExplainConfig
from lightning_neurons.explanation.units import (
    RoundEvidence,
    build_units,
    concept_set,
    crop_similarities,
    score_layers,
    test_layers,
)
from lightning_neurons.recording.hooks import evaluating, model_device
from lightning_neurons.recording.samples import SampleSource
from lightning_neurons.recording.types import LayerTopK, Recording
from lightning_neurons.regions import box_area_fraction
from lightning_neurons.results import UNIT_KINDS, ExplanationRound, UnitExplanation
from lightning_neurons.sharing import WorkShare


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
    cache: RegionEmbeddingCache | None = None,
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
        share: This rank's share of the region boxes and the crop embedding under DDP (``None``: this process does
            all of it).
        cache: Region embeddings kept across rounds (:class:`RegionEmbeddingCache`); only the regions it has not
            seen are embedded, and its hits and misses in this round go to ``meta["embedding_cache"]``. The round
            is the same with or without it.

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
    encoder = backend.encoder if isinstance(backend, Backend) else backend
    cfg = (config or ExplainConfig()).for_encoder(encoder)
    epoch = recording.epoch if epoch is None else epoch
    samples = RoundSamples.of(recording)
    _check_layers(model, samples.layers)
    meta = _round_meta(backend, encoder, recording, samples, cfg)
    if samples.ids.numel() == 0:
        meta.update(units=0, crops=0, unique_crops=0, control_crops=0, whole_images=0, concepts=0)
        return ExplanationRound(epoch=epoch, units=[], meta=meta)
    timings = meta["timings"]
    device = torch.device(cfg.device) if cfg.device else model_device(model)
    with _timed(timings, "forward"):
        forward = forward_samples(model, samples, source, cfg, device)
    with _timed(timings, "regions"):
        regions = find_regions(forward, preview_units(cfg, samples.layers), cfg, share)
    before = cache.stats() if cache is not None else None
    with _timed(timings, "embed_crops"):
        crops = embed_crops(encoder, forward, regions, cfg, share, cache)
    if cache is not None and before is not None:
        meta["embedding_cache"] = _cache_meta(cache, before)
    with _timed(timings, "embed_concepts"):
        concept_values = concept_set(concepts, encoder, cfg.encoder_batch_size)
    with _timed(timings, "score"):
        sims = crop_similarities(crops, concept_values, device)
        # selection="concept_score": the description is chosen first, then its correlation is tested.
        scores = score_layers(sims, crops, regions, cfg, device) if cfg.selection == "concept_score" else None
    with _timed(timings, "significance"):
        significance = test_layers(forward, crops, sims, cfg, reduction=recording.reduction, scores=scores)
    if scores is None:  # selection="correlation": the tests' correlations rank the concepts
        with _timed(timings, "rank"):
            scores = score_layers(sims, crops, regions, cfg, device, significance)
    evidence = RoundEvidence(forward, regions, crops, concept_values, scores, sims, significance, recording.reduction)
    units = build_units(evidence, epoch)
    if cfg.multi_concept:
        with _timed(timings, "multi_concept"):
            meta["combinations"] = combine_units(units, evidence, cfg, reduction=recording.reduction)
    if cfg.describe:
        with _timed(timings, "describe"):
            rephrase_units(units, evidence, backend, encoder, cfg)
    if cfg.ablation:
        with _timed(timings, "ablation"):
            _ablation(model, units, samples, source, cfg, class_names)
    meta.update(_counts(evidence, units))
    return ExplanationRound(epoch=epoch, units=units, meta=meta, previews=evidence.regions.previews)


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Add the seconds the block takes to ``timings[stage]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = time.perf_counter() - start


def _cache_meta(cache: RegionEmbeddingCache, before: dict[str, int]) -> dict[str, int]:
    """This round's hits, misses and evictions, and the cache's size after it."""
    after = cache.stats()
    out = {k: after[k] - before[k] for k in ("hits", "misses", "evictions")}
    out.update(entries=after["entries"], bytes=after["bytes"], max_bytes=cache.max_bytes)
    return out


def _check_layers(model: nn.Module, layers: dict[str, LayerTopK]) -> None:
    modules = dict(model.named_modules(remove_duplicate=False))
    unknown = [name for name in layers if name not in modules]
    if unknown:
        raise KeyError(f"recorded layers {unknown} are not modules of the model")


def _round_meta(
    backend: Any, encoder: ImageTextEncoder, recording: Recording, samples: RoundSamples, cfg: ExplainConfig
) -> dict[str, Any]:
    """The round's settings and inputs; the stages add their timings and counts."""
    return {
        "backend": getattr(backend, "name", type(backend).__name__),
        "encoder": getattr(encoder, "name", type(encoder).__name__),
        "correction": cfg.correction_value.name,
        # Deprecated: older writers hid units at or below it; set only where a confidence is still computed.
        "confidence_threshold": cfg.confidence_threshold if cfg.confidence_samples > 0 else None,
        "selection": cfg.selection,
        "permutations": cfg.permutations,
        "q_threshold": cfg.q_threshold,
        "gain_margin": cfg.gain_margin,
        "frequency_penalty": cfg.frequency_penalty,
        "quantile": cfg.quantile,
        "crop_size": cfg.crop_size,
        "top_k": recording.top_k,
        "samples": int(samples.ids.numel()),
        "timings": {},
    }


def _counts(evidence: RoundEvidence, units: list[UnitExplanation]) -> dict[str, Any]:
    boxes = evidence.regions.boxes
    return {
        "units": len(units),
        "crops": int(boxes.shape[0]),
        "unique_crops": evidence.crops.num_unique,
        "control_crops": evidence.crops.num_control,
        "whole_images": int(evidence.crops.embeddings.shape[0])
        - evidence.crops.num_unique
        - evidence.crops.num_control,
        "concepts": len(evidence.concepts),
        "mean_box_area": box_area_fraction(boxes, evidence.forward.image_size),
        "labels": evidence.forward.labels is not None,
        "kinds": {kind: sum(u.kind == kind for u in units) for kind in UNIT_KINDS},
    }


def _ablation(
    model: nn.Module,
    units: list[UnitExplanation],
    samples: RoundSamples,
    source: SampleSource,
    cfg: ExplainConfig,
    class_names: Sequence[str] | None,
) -> None:
    """Zero each chosen unit on the reservoir samples (an unbiased probe subset) and note the classes hurt."""
    if samples.reservoir.numel() == 0:
        raise ValueError("ablation=True needs reservoir samples in the recording")
    inputs, labels = source.fetch(samples.reservoir.tolist())
    if labels is None:
        raise ValueError("ablation=True needs class labels in the probe batches")
    chosen = cfg.ablation_units if cfg.ablation_units is not None else preview_units(cfg, samples.layers)
    modules = dict(model.named_modules(remove_duplicate=False))
    by_key = {u.key: u for u in units}
    with evaluating(model):
        for name, unit_list in chosen.items():
            if name not in samples.layers or not unit_list:
                continue
            result = ablate_units(
                model,
                modules[name],
                samples.layers[name].kind,
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


__all__ = [
    "CropEmbeddings",
    "ExplainConfig",
    "ForwardResult",
    "Regions",
    "RoundEvidence",
    "RegionEmbeddingCache",
    "RoundSamples",
    "explain_recording",
]
