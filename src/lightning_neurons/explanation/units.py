"""Stage 4 of the explanation: the concept set, one similarity product, per-layer scores, the unit explanations.

Example:
    >>> concepts = concept_set(["red", "stripes"], encoder, batch_size=256)  # doctest: +SKIP
    >>> sims = crop_similarities(crops, concepts, torch.device("cpu"))  # doctest: +SKIP
    >>> scores = score_layers(sims, crops, regions, ExplainConfig(), torch.device("cpu"))  # doctest: +SKIP
    >>> units = build_units(RoundEvidence(forward, regions, crops, concepts, scores, sims), epoch=3)  # doctest: +SKIP
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_neurons.backends.base import ImageTextEncoder
from lightning_neurons.concepts.concept_set import ConceptSet
from lightning_neurons.explanation.crops import CropEmbeddings, Regions
from lightning_neurons.explanation.forward import ForwardResult
from lightning_neurons.explanation.scoring import LayerScores, score_layer, similarity
from lightning_neurons.explanation.settings import ExplainConfig
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
        similarities: ``[K + M, C]`` similarity of every unique crop, then every control crop, with every concept
            (:func:`crop_similarities`; computed once, read by the score and the multi-concept stages).
    """

    forward: ForwardResult
    regions: Regions
    crops: CropEmbeddings
    concepts: ConceptSet
    scores: dict[str, LayerScores]
    similarities: Tensor


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


def score_layers(
    sims: Tensor, crops: CropEmbeddings, regions: Regions, cfg: ExplainConfig, device: torch.device
) -> dict[str, LayerScores]:
    """Each layer's concept scores, from the round's similarity product (:func:`crop_similarities`).

    With ``cfg.frequency_penalty`` the scores pay for concepts that win across the layer; with
    ``cfg.confidence_samples`` each unit also gets the confidence of its best concept
    (:func:`~lightning_neurons.explanation.scoring.score_layer`).
    """
    crop_sims, control_sims = sims[: crops.num_unique], sims[crops.num_unique :]
    correction = cfg.correction_value
    crop_sample = regions.crop_bank.to(device)  # units that fire on the same images share their concept
    return {
        name: score_layer(
            crop_sims,
            index.to(device),
            control_sims,
            correction,
            cfg.num_alternatives,
            crop_sample=crop_sample,
            frequency_weight=cfg.frequency_penalty,
            shared_overlap=cfg.shared_overlap,
            confidence=cfg.confidence_samples > 0,
            confidence_samples=max(1, cfg.confidence_samples),
            seed=cfg.seed,
        )
        for name, index in regions.crop_index.items()
    }


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
    texts = evidence.concepts.texts
    top_idx, top_val = sc.top_indices.cpu().tolist(), sc.top_values.cpu().tolist()
    auc, margin = sc.auc.cpu().tolist(), sc.margin.cpu().tolist()
    confidence = sc.confidence.cpu().tolist() if sc.confidence is not None else [None] * len(auc)
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
        if not has[u]:
            units.append(UnitExplanation(layer=name, unit=u, epoch=epoch, description="", score=float("nan")))
        else:
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
                    boxes=boxes[start:end],  # type: ignore[arg-type]
                    confidence=confidence[u],
                )
            )
        start = end
    return units


__all__ = ["RoundEvidence", "build_units", "concept_set", "crop_similarities", "score_layers"]
