"""Baselines that produce :class:`~lightning_neurons.ExplanationRound`-compatible descriptions.

They keep every unit's identity and top-k samples and replace only the text, so each metric runs on them
unchanged and shows what a number is worth:

- :func:`random_baseline`: a random vocabulary concept per unit (the chance level of every metric).
- :func:`constant_baseline`: one description for every unit (the "depictions" failure Describe-and-Dissect
  found in MILAN's data); :func:`generic_concepts` picks the concepts that match the probe images best on
  average, the strongest constant.
- :func:`label_baseline`: the dataset class most frequent among the unit's top-k samples, a label-only
  method in the spirit of Network Dissection (no foundation model at all).

Example:
    >>> from lightning_neurons.results import ExplanationRound, UnitExplanation
    >>> rnd = ExplanationRound(0, [UnitExplanation("l", 0, 0, "fur", 0.9, top_sample_ids=[3, 4, 5])])
    >>> label_baseline(rnd, {3: 1, 4: 1, 5: 0}, ["cat", "dog"]).get("l", 0).description
    'dog'
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_neurons.backends.base import ImageTextEncoder
from lightning_neurons.results import Alternative, ExplanationRound, UnitExplanation

#: Baselines compute no image-text score; ``nan`` says "not measured" (the drift history treats it as missing).
_NO_SCORE = float("nan")


def _replace(unit: UnitExplanation, texts: Sequence[str]) -> UnitExplanation:
    alternatives = [Alternative(text=t, score=_NO_SCORE) for t in texts[1:]]
    return dataclasses.replace(
        unit,
        description=texts[0],
        score=_NO_SCORE,
        margin=0.0,
        concept_score=0.0,
        alternatives=alternatives,
        source="baseline",
        ablation=None,
    )


def _round(round: ExplanationRound, units: list[UnitExplanation], name: str, **meta: object) -> ExplanationRound:
    return ExplanationRound(epoch=round.epoch, units=units, meta={**round.meta, "baseline": name, **meta})


def random_baseline(
    round: ExplanationRound, concepts: Sequence[str], *, num_alternatives: int = 4, seed: int = 0
) -> ExplanationRound:
    """A random concept per unit (and random distinct alternatives).

    Args:
        round: The round whose units to describe.
        concepts: The vocabulary to draw from.
        num_alternatives: Alternatives per unit (top-5 accuracy reads 4).
        seed: Seed of the draw.

    Raises:
        ValueError: If the vocabulary is empty.

    Example:
        >>> from lightning_neurons.results import ExplanationRound, UnitExplanation
        >>> rnd = ExplanationRound(0, [UnitExplanation("l", u, 0, "x", 1.0) for u in range(3)])
        >>> out = random_baseline(rnd, ["a", "b", "c"], num_alternatives=2)
        >>> [sorted([u.description] + [a.text for a in u.alternatives]) for u in out]
        [['a', 'b', 'c'], ['a', 'b', 'c'], ['a', 'b', 'c']]
    """
    concepts = list(dict.fromkeys(concepts))
    if not concepts:
        raise ValueError("random_baseline needs a non-empty vocabulary")
    n = min(len(concepts), 1 + num_alternatives)
    generator = torch.Generator().manual_seed(seed)
    units = [
        _replace(u, [concepts[int(i)] for i in torch.randperm(len(concepts), generator=generator)[:n]]) for u in round
    ]
    return _round(round, units, "random", seed=seed)


def constant_baseline(round: ExplanationRound, description: str, alternatives: Sequence[str] = ()) -> ExplanationRound:
    """The same description (and the same alternatives) for every unit.

    Example:
        >>> from lightning_neurons.results import ExplanationRound, UnitExplanation
        >>> rnd = ExplanationRound(0, [UnitExplanation("l", u, 0, str(u), 1.0) for u in range(2)])
        >>> {u.description for u in constant_baseline(rnd, "object")}
        {'object'}
    """
    texts = [description, *(t for t in alternatives if t != description)]
    return _round(round, [_replace(u, texts) for u in round], "constant", description=description)


def label_baseline(
    round: ExplanationRound,
    labels: Mapping[int, int],
    class_names: Sequence[str],
    *,
    num_alternatives: int = 4,
) -> ExplanationRound:
    """The class most frequent among each unit's top-k samples (ties: the better-ranked sample's class).

    Alternatives are the next most frequent classes, then the remaining classes in index order, so that
    top-5 accuracy is defined for it as for the other methods.

    Args:
        round: The round whose units to describe (its ``top_sample_ids`` are read).
        labels: ``{sample id: class index}`` for the top samples (``Recording.labels`` holds them).
        class_names: Class names, indexed by class.
        num_alternatives: Alternatives per unit.

    Raises:
        ValueError: If a unit has no labelled top sample.
    """
    units = []
    for u in round:
        ids = [i for i in u.top_sample_ids if i >= 0 and i in labels]
        if not ids:
            raise ValueError(f"unit {u.unit} of layer {u.layer!r} has no labelled top sample")
        counts = Counter(int(labels[i]) for i in ids)
        first_rank: dict[int, int] = {}
        for rank, i in enumerate(ids):
            first_rank.setdefault(int(labels[i]), rank)
        order = sorted(counts, key=lambda c: (-counts[c], first_rank[c]))
        order += [c for c in range(len(class_names)) if c not in counts]
        units.append(_replace(u, [class_names[c] for c in order[: 1 + num_alternatives]]))
    return _round(round, units, "label")


def generic_concepts(
    encoder: ImageTextEncoder | None,
    concepts: Sequence[str],
    image_embeddings: Tensor,
    n: int = 5,
    *,
    text_embeddings: Tensor | None = None,
) -> list[str]:
    """The ``n`` concepts with the highest mean similarity over the probe images (they "match everything").

    Args:
        encoder: Image-text encoder (for the concept embeddings); may be ``None`` when ``text_embeddings`` is given.
        concepts: The vocabulary.
        image_embeddings: ``[N, D]`` probe image embeddings from the same encoder.
        n: How many to return, most generic first.
        text_embeddings: ``[len(concepts), D]`` embeddings of ``concepts`` by the same encoder, if already known.

    Raises:
        ValueError: If neither an encoder nor matching text embeddings are given.

    Example:
        >>> images = torch.tensor([[1.0, 0.0], [0.8, 0.6]])
        >>> generic_concepts(None, ["red", "blue"], images, n=1, text_embeddings=torch.eye(2))
        ['red']
    """
    if text_embeddings is not None:
        if text_embeddings.shape[0] != len(concepts):
            raise ValueError(f"need one text embedding per concept, got {text_embeddings.shape[0]} for {len(concepts)}")
        text, concepts = text_embeddings.float(), list(concepts)
    elif encoder is not None:
        concepts = list(dict.fromkeys(concepts))
        text = encoder.encode_texts(concepts).float()
    else:
        raise ValueError("generic_concepts needs an encoder or the concepts' text_embeddings")
    mean_sim = (image_embeddings.float().to(text.device) @ text.T).mean(dim=0)
    return [concepts[int(i)] for i in mean_sim.argsort(descending=True)[:n]]


__all__ = ["constant_baseline", "generic_concepts", "label_baseline", "random_baseline"]
