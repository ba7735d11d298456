"""Optional stage 5 of the explanation: a phrase per unit, scored like a concept, kept where it beats the best one.

:func:`~lightning_neurons.explanation.describe.describe_units` captions each unit's top crops and merges captions
and top concepts into one short phrase; here each phrase is embedded, scored with the round's correction against
the concepts on the same crops, and replaces the description (which becomes the first alternative) only where it
scores higher.

Example:
    >>> rephrase_units(units, evidence, backend, ExplainConfig(describe=True))  # doctest: +SKIP
    >>> [u.source for u in units][:2]  # doctest: +SKIP
    ['describe', 'concept']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_neurons.backends.base import ImageTextEncoder
from lightning_neurons.explanation.describe import describe_units
from lightning_neurons.explanation.metrics import correlation
from lightning_neurons.explanation.scoring import concept_scores, separation, similarity
from lightning_neurons.explanation.settings import ExplainConfig
from lightning_neurons.explanation.units import RoundEvidence, layer_samples
from lightning_neurons.regions import crop_images
from lightning_neurons.results import Alternative, UnitExplanation


@dataclass(frozen=True)
class _PhraseScores:
    """The phrases of some units of one layer, scored on each unit's top crops."""

    units: list[int]
    phrases: list[str]
    score: Tensor  # [n] corrected score of the phrase
    best_concept: Tensor  # [n] corrected score of the unit's best concept
    auc: Tensor  # [n]
    correlation: Tensor  # [n] the phrase's correlation with the unit (the score)
    margin: Tensor  # [n]


def rephrase_units(
    units: list[UnitExplanation], evidence: RoundEvidence, backend: Any, encoder: ImageTextEncoder, cfg: ExplainConfig
) -> None:
    """Caption-and-summarise each unit; keep the phrase where it beats the best concept (edits ``units``).

    Args:
        units: The round's explanations (from :func:`~lightning_neurons.explanation.units.build_units`).
        evidence: The round's crops, embeddings, concepts and scores.
        backend: Has a ``captioner`` and a ``generator``.
        encoder: Embeds the phrases.
        cfg: ``describe_crops``, ``crop_size``, the correction and ``num_alternatives``.

    Raises:
        ValueError: If the backend has no captioner or text generator.
    """
    captioner, generator = getattr(backend, "captioner", None), getattr(backend, "generator", None)
    if captioner is None or generator is None:
        raise ValueError("describe=True needs a backend with a captioner and a text generator (e.g. 'embedded')")
    cfg = cfg.for_encoder(encoder)  # the crops are cut as for the encoder
    by_key = {u.key: u for u in units}
    emb = evidence.crops.embeddings.to(evidence.forward.device)
    for name in evidence.forward.layers:
        todo = _layer_phrases(name, evidence, captioner, generator, cfg)
        if todo:
            scored = _score_phrases(name, todo, evidence, emb, encoder, cfg)
            _keep_better(by_key, name, scored, cfg.num_alternatives)


def _layer_phrases(
    name: str, evidence: RoundEvidence, captioner: Any, generator: Any, cfg: ExplainConfig
) -> list[tuple[int, str]]:
    """``(unit, phrase)`` of the units of a layer that have crops and got a phrase."""
    regions, texts = evidence.regions, evidence.concepts.texts
    index = regions.crop_index[name].cpu()
    unit_ids = [u for u in range(index.shape[0]) if bool((index[u] >= 0).any())]
    if not unit_ids:
        return []
    unit_crops = [[int(i) for i in index[u][index[u] >= 0][: cfg.describe_crops]] for u in unit_ids]
    top = evidence.scores[name].top_indices
    unit_concepts = [[texts[int(i)] for i in top[u][:3]] for u in unit_ids]

    def load(ids_: list[int]) -> Tensor:
        sel = torch.tensor(ids_, device=regions.crop_bank.device)
        return crop_images(evidence.forward.bank, regions.crop_bank[sel], regions.crop_boxes[sel], cfg.crop_side)

    phrases = describe_units(captioner, generator, unit_crops, load, unit_concepts, max_words=6)
    return [(u, p) for u, p in zip(unit_ids, phrases) if p]


def _score_phrases(
    name: str,
    todo: list[tuple[int, str]],
    evidence: RoundEvidence,
    emb: Tensor,
    encoder: ImageTextEncoder,
    cfg: ExplainConfig,
) -> _PhraseScores:
    """Score each unit's phrase next to the concepts, with the round's correction, on the unit's own crops."""
    device, num_unique, num_c = emb.device, evidence.crops.num_unique, len(evidence.concepts)
    with torch.no_grad():
        phrase_emb = encoder.encode_texts([p for _, p in todo]).float().to(device)
    sims = similarity(emb, torch.cat([evidence.concepts.embeddings.to(device), phrase_emb]))  # [K + M, C + n]
    rows = torch.tensor([u for u, _ in todo], device=device)
    full_index = evidence.regions.crop_index[name]
    sub_index = full_index[rows]
    valid = sub_index >= 0
    top_sims, control = sims[:num_unique][sub_index.clamp_min(0)], sims[evidence.crops.control_rows(name).to(device)]
    correction = cfg.correction_value
    if correction.layer_wide:
        # p(c) of soft-WPMI is a mean over the layer's units: score all of them with the phrases added.
        aug = concept_scores(sims[:num_unique][full_index.clamp_min(0)], full_index >= 0, control, correction)[rows]
    else:
        aug = concept_scores(top_sims, valid, control, correction)
    cols = num_c + torch.arange(len(todo), device=device)
    auc, margin = separation(top_sims, valid, control, cols)
    phrase_correlation = _phrase_correlations(name, rows, sims[:, num_c:], evidence)
    return _PhraseScores(
        units=[u for u, _ in todo],
        phrases=[p for _, p in todo],
        score=aug[torch.arange(len(todo), device=device), cols],
        best_concept=aug[:, :num_c].max(dim=1).values,
        auc=auc,
        margin=margin,
        correlation=phrase_correlation,
    )


def _phrase_correlations(name: str, rows: Tensor, phrase_sims: Tensor, evidence: RoundEvidence) -> Tensor:
    """``[n]`` each unit's correlation with its own phrase over its samples (NaN without whole-image embeddings)."""
    whole_rows = evidence.crops.whole_rows
    if whole_rows is None:
        return torch.full((rows.numel(),), float("nan"))
    device = phrase_sims.device
    samples = layer_samples(evidence.forward, name, evidence.reduction, device)
    whole = phrase_sims[whole_rows.to(device)]
    stats = torch.zeros(whole.shape[0], 1, device=device)
    acts, weights, x, _, _ = samples.chunk(rows, whole, stats)
    own = torch.arange(rows.numel(), device=device)
    return correlation(acts, x, weights)[own, own]


def _keep_better(
    by_key: dict[tuple[str, int], UnitExplanation], name: str, scored: _PhraseScores, num_alternatives: int
) -> None:
    for j, (u, phrase) in enumerate(zip(scored.units, scored.phrases)):
        ex = by_key[(name, u)]
        # The kind stays the one the concept tests gave (the phrase is an LLM's pick, not a tested selection).
        if float(scored.score[j]) <= float(scored.best_concept[j]) or ex.kind == "dead":
            continue
        ex.alternatives = [Alternative(ex.description, ex.concept_score), *ex.alternatives][:num_alternatives]
        ex.description, ex.source = phrase, "describe"
        ex.concept_score = float(scored.score[j])
        ex.score, ex.auc, ex.margin = float(scored.correlation[j]), float(scored.auc[j]), float(scored.margin[j])


__all__ = ["rephrase_units"]
