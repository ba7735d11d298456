"""Stage 4 of the explanation: the concept set, one similarity product, per-layer scores, the unit explanations.

Example:
    >>> concepts = concept_set(["red", "stripes"], encoder, batch_size=256)  # doctest: +SKIP
    >>> sims = crop_similarities(crops, concepts, torch.device("cpu"))  # doctest: +SKIP
    >>> scores = score_layers(sims, crops, regions, ExplainConfig(), torch.device("cpu"))  # doctest: +SKIP
    >>> units = build_units(RoundEvidence(forward, regions, crops, concepts, scores, sims), epoch=3)  # doctest: +SKIP
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_neurons.backends.base import ImageTextEncoder
from lightning_neurons.concepts.concept_set import ConceptSet
from lightning_neurons.explanation.crops import CropEmbeddings, Regions
from lightning_neurons.explanation.forward import ForwardResult
from lightning_neurons.explanation.scoring import LayerScores, score_layer, similarity
from lightning_neurons.explanation.seeding import hashed_folds, layer_generator, layer_seed
from lightning_neurons.explanation.settings import ExplainConfig
from lightning_neurons.explanation.significance import (
    LayerSignificance,
    UnitSamples,
    image_statistics,
    layer_significance,
)
from lightning_neurons.results import Alternative, UnitExplanation


@dataclass(frozen=True)
class RoundEvidence:
    """Everything the stages found about a round's units, for building and revising their explanations.

    Args:
        forward: Images, labels and layer maps.
        regions: Boxes and unique crops.
        crops: Embeddings of the unique and control crops.
        concepts: The candidate concepts.
        scores: :class:`~lightning_neurons.explanation.scoring.LayerScores` per layer.
        similarities: ``[K + M + E, C]`` similarity of every unique crop, every control crop and every other whole
            image with every concept (:func:`crop_similarities`; computed once, read by every later stage).
        significance: Per layer, each unit's correlations with the concepts, its tests and statistic
            (:func:`test_layers`); empty for rounds built without it.
        reduction: How the recording reduced unit maps to one value per sample.
    """

    forward: ForwardResult
    regions: Regions
    crops: CropEmbeddings
    concepts: ConceptSet
    scores: dict[str, LayerScores]
    similarities: Tensor
    significance: dict[str, LayerSignificance] = field(default_factory=dict)
    reduction: str = "max"


def concept_set(concepts: Any, encoder: ImageTextEncoder, batch_size: int) -> ConceptSet:
    """The candidate concepts as a :class:`~lightning_neurons.concepts.concept_set.ConceptSet`.

    Args:
        concepts: A ``ConceptSet``, a list of strings (embedded here), a ``(texts, embeddings)`` pair, or a
            vocabulary object with an ``embed(encoder)`` method (its cached embeddings are used).
        encoder: Embeds the texts.
        batch_size: Texts per encoder call.

    Raises:
        TypeError: For a single string.
        ValueError: For an empty vocabulary or a count mismatch.
    """
    if isinstance(concepts, str):
        raise TypeError("concepts must be a list of strings (or a vocabulary), not a single string")
    if isinstance(concepts, ConceptSet):
        return ConceptSet(concepts.texts, concepts.embeddings.float())
    if isinstance(concepts, tuple) and len(concepts) == 2 and isinstance(concepts[1], Tensor):
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
    return ConceptSet(tuple(texts), emb.float())


def _vocabulary_texts(vocabulary: Any) -> list[str]:
    for attr in ("concepts", "texts", "terms", "words"):
        value = getattr(vocabulary, attr, None)
        if value is not None and not callable(value):
            return [str(t) for t in value]
    return [str(t) for t in vocabulary]


def crop_similarities(crops: CropEmbeddings, concepts: ConceptSet, device: torch.device) -> Tensor:
    """The one similarity product of the round: every unique crop, then every control crop, with every concept.

    Returns:
        float32 ``[K + M, C]`` on ``device`` (``K = crops.num_unique`` rows first).
    """
    return similarity(crops.embeddings.to(device), concepts.embeddings.to(device))


def test_layers(
    forward: ForwardResult,
    crops: CropEmbeddings,
    sims: Tensor,
    cfg: ExplainConfig,
    reduction: str = "max",
    scores: dict[str, LayerScores] | None = None,
) -> dict[str, LayerSignificance]:
    """Per layer: each unit's correlation with every concept, its permutation test, concept gain and statistic.

    Every unit is scored on the reservoir samples (a uniform sample of the probe set) and its own top samples, by
    the whole-map value the recording keeps (``reduction``) against the whole image's similarity with each concept
    (:mod:`~lightning_neurons.explanation.significance`). Random draws come from each layer's own generator; folds
    follow the sample ids.

    Args:
        forward: Image bank, reservoir values and top samples.
        crops: Row of each sample's whole-image embedding (``crops.whole_rows``).
        sims: The round's similarity product (:func:`crop_similarities`).
        cfg: ``permutations``, ``cv_folds``, ``ridge``, ``seed``.
        reduction: How the recording reduced unit maps (``"max"`` or ``"mean"``).
        scores: The layers' concept scores, whose chosen concepts are tested (``None``: the best by correlation).
    """
    if crops.whole_rows is None:
        return {}
    device = sims.device
    whole = sims[crops.whole_rows.to(device)]  # [N_bank, C]
    statistics = image_statistics(forward.bank).to(device)
    folds = hashed_folds(forward.ids, cfg.cv_folds, cfg.seed)
    out: dict[str, LayerSignificance] = {}
    for name in forward.layers:
        samples = layer_samples(forward, name, reduction, device)
        out[name] = layer_significance(
            samples,
            whole,
            statistics,
            folds=folds.to(device),
            num_folds=cfg.cv_folds,
            permutations=cfg.permutations,
            generator=layer_generator(cfg.seed, name, "permutation"),
            alpha=cfg.ridge,
            q_threshold=cfg.q_threshold,
            gain_margin=cfg.gain_margin,
            chosen=None if scores is None or name not in scores else scores[name].top_indices[:, 0].to(device),
        )
    return out


def layer_samples(forward: ForwardResult, name: str, reduction: str, device: torch.device) -> UnitSamples:
    """A layer's units and their samples (the reservoir and each unit's top samples), rows into the image bank."""
    lm = forward.layers[name]
    reservoir = forward.samples.reservoir.to(forward.device)
    values = lm.reservoir_values(reduction)
    if values is None or values.shape[1] != reservoir.numel():
        values, reservoir = torch.zeros(lm.topk.num_units, 0), reservoir[:0]
    top_ids = lm.sample_ids.to(forward.device)
    return UnitSamples(
        reservoir_ids=reservoir.to(device),
        reservoir_values=values.float().to(device),
        reservoir_rows=forward.bank_rows(reservoir).to(device),
        top_ids=top_ids.to(device),
        top_values=lm.topk.values.float().to(device),
        top_rows=forward.bank_rows(top_ids.clamp_min(0)).to(device),
    )


def score_layers(
    sims: Tensor,
    crops: CropEmbeddings,
    regions: Regions,
    cfg: ExplainConfig,
    device: torch.device,
    significance: dict[str, LayerSignificance] | None = None,
) -> dict[str, LayerScores]:
    """Each layer's concept scores, from the round's similarity product (:func:`crop_similarities`).

    Each layer is scored against its own control crops. With ``cfg.selection == "correlation"`` and the layer's
    ``significance``, concepts are ranked by their correlation with the unit; otherwise by the corrected scores,
    which with ``cfg.frequency_penalty`` pay for concepts that win across the layer. With
    ``cfg.confidence_samples`` each unit also gets the confidence of its best concept
    (:func:`~lightning_neurons.explanation.scoring.score_layer`).
    """
    crop_sims = sims[: crops.num_unique]
    correction = cfg.correction_value
    crop_sample = regions.crop_bank.to(device)  # units that fire on the same images share their concept
    out: dict[str, LayerScores] = {}
    for name, index in regions.crop_index.items():
        sig = (significance or {}).get(name)
        by_correlation = cfg.selection == "correlation" and sig is not None
        out[name] = score_layer(
            crop_sims,
            index.to(device),
            sims[crops.control_rows(name).to(device)],
            correction,
            cfg.num_alternatives,
            crop_sample=crop_sample,
            frequency_weight=0.0 if by_correlation else cfg.frequency_penalty,
            shared_overlap=cfg.shared_overlap,
            confidence=cfg.confidence_samples > 0,
            confidence_samples=max(1, cfg.confidence_samples),
            seed=layer_seed(cfg.seed, name, "confidence"),
            ranking=sig.correlations if by_correlation and sig is not None else None,
        )
    return out


def build_units(evidence: RoundEvidence, epoch: int | None) -> list[UnitExplanation]:
    """One :class:`~lightning_neurons.UnitExplanation` per unit of every layer (empty units get no description)."""
    # Everything per unit is read back as flat Python lists once per layer and sliced, never indexed per unit:
    # a tensor index per unit costs microseconds, which at 100k units is most of a round. The cyclic garbage
    # collector is paused meanwhile: millions of new lists and floats would trigger full collections that
    # cost more than the building itself (4x measured at 8,192 units) and would find no cycles in them.
    paused = gc.isenabled()
    gc.disable()
    try:
        boxes = [tuple(b) for b in evidence.regions.boxes.cpu().tolist()]
        units: list[UnitExplanation] = []
        for name in evidence.forward.layers:
            units.extend(_layer_units(name, evidence, boxes[evidence.regions.spans[name]], epoch))
        return units
    finally:
        if paused:
            gc.enable()


def _layer_units(name: str, evidence: RoundEvidence, boxes: list[tuple], epoch: int | None) -> list[UnitExplanation]:
    lt = evidence.forward.layers[name].topk
    sc = evidence.scores[name]
    sig = evidence.significance.get(name)
    texts = evidence.concepts.texts
    top_idx, top_val = sc.top_indices.cpu().tolist(), sc.top_values.cpu().tolist()
    auc, margin = sc.auc.cpu().tolist(), sc.margin.cpu().tolist()
    confidence = sc.confidence.cpu().tolist() if sc.confidence is not None else [None] * len(auc)
    if sig is not None:
        chosen = sc.top_indices[:, :1].cpu()
        corr = sig.correlations.gather(1, chosen)[:, 0].tolist()
        p_values, q_values, gains = (_optional(t) for t in (sig.p_values, sig.q_values, sig.gain))
        kinds, low_level = list(sig.kinds), sig.low_level
    else:
        corr = auc
        p_values = q_values = gains = [None] * len(auc)
        kinds, low_level = [None] * len(auc), [None] * len(auc)
    ids_cpu, vals_cpu = lt.sample_ids.cpu(), lt.values.cpu().float()
    valid = ids_cpu >= 0
    # The layer's pairs are its valid (unit, rank) slots in row-major order, so unit u's boxes, ids and
    # activations are one contiguous run of them.
    ends = valid.sum(dim=1).cumsum(0).tolist()
    flat_ids, flat_vals = ids_cpu[valid].tolist(), vals_cpu[valid].tolist()
    has = (evidence.regions.crop_index[name] >= 0).any(dim=1).cpu().tolist()
    units: list[UnitExplanation] = []
    start = 0
    for u in range(lt.sample_ids.shape[0]):
        end = ends[u]
        kind = kinds[u]
        if kind == "dead" or not has[u]:
            # A unit that never fires (or has no crops) gets no concept: no description, no score.
            units.append(
                UnitExplanation(
                    layer=name,
                    unit=u,
                    epoch=epoch,
                    description="",
                    score=float("nan"),
                    source="concept",
                    top_sample_ids=flat_ids[start:end],
                    activations=flat_vals[start:end],
                    boxes=boxes[start:end],  # type: ignore[arg-type]
                    kind=kind if kind is None or kind == "dead" else "unclear",
                )
            )
        else:
            idx, val = top_idx[u], top_val[u]
            units.append(
                UnitExplanation(
                    layer=name,
                    unit=u,
                    epoch=epoch,
                    description=texts[idx[0]],
                    score=float(corr[u]),
                    margin=float(margin[u]),
                    concept_score=float(val[0]),
                    alternatives=[Alternative(texts[i], float(v)) for i, v in zip(idx[1:], val[1:])],
                    source="concept",
                    top_sample_ids=flat_ids[start:end],
                    activations=flat_vals[start:end],
                    boxes=boxes[start:end],  # type: ignore[arg-type]
                    confidence=confidence[u],
                    kind=kind,
                    p_value=p_values[u],
                    q_value=q_values[u],
                    low_level=low_level[u],
                    concept_gain=gains[u],
                    auc=float(auc[u]),
                )
            )
        start = end
    return units


def _optional(values: Tensor) -> list[float | None]:
    """Floats of a ``[U]`` tensor, ``None`` for NaN (JSON null)."""
    return [None if v != v else float(v) for v in values.cpu().tolist()]


__all__ = ["RoundEvidence", "build_units", "concept_set", "crop_similarities", "layer_samples", "score_layers", "test_layers"]
