"""Final-layer protocol (CLIP-Dissect, Table 3): explain a classifier's output units and compare with the classes.

Output unit ``j`` of a trained classifier is known to mean class ``j``. Two numbers:

- With the class names as the vocabulary: top-1 / top-5 accuracy, i.e. whether the unit's own class is its
  description (top-1) or among the description and its first alternatives (top-5).
- With a general vocabulary (the class names may not be in it): the mean cosine similarity, in a sentence
  embedding space (MiniLM here, mpnet in CLIP-Dissect), between each unit's description and its class name,
  and (:func:`final_layer_class_rank`) how that class name ranks among all class names, which a generic
  description close to every class name cannot inflate.

Example:
    >>> from lightning_neurons.results import Alternative, ExplanationRound, UnitExplanation
    >>> units = [UnitExplanation("head", 0, None, "Cat", 0.9, alternatives=[Alternative("dog", 0.1)]),
    ...          UnitExplanation("head", 1, None, "cat", 0.8, alternatives=[Alternative("dog", 0.2)])]
    >>> final_layer_accuracy(ExplanationRound(None, units), "head", ["cat", "dog"], ks=(1, 2))
    {'top1': 0.5, 'top2': 1.0}
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lightning_neurons.results import ExplanationRound, UnitExplanation

EmbedFn = Callable[[list[str]], Tensor]


def normalize_text(text: str) -> str:
    """Lower-case and collapse whitespace, so that ``"Coffee  Cup"`` matches ``"coffee cup"``.

    Example:
        >>> normalize_text("  Coffee  Cup ")
        'coffee cup'
    """
    return " ".join(text.lower().split())


def ranked_texts(unit: UnitExplanation) -> list[str]:
    """The unit's description followed by its alternatives, best first (the ranking that top-k reads).

    Example:
        >>> from lightning_neurons.results import Alternative, UnitExplanation
        >>> ranked_texts(UnitExplanation("l", 0, None, "fur", 0.7, alternatives=[Alternative("cat", 0.2)]))
        ['fur', 'cat']
    """
    return [unit.description, *(alt.text for alt in unit.alternatives)]


def _unit_classes(
    units: list[UnitExplanation], class_names: Sequence[str], unit_classes: Sequence[int] | None
) -> list[int]:
    classes = [u.unit for u in units] if unit_classes is None else [int(unit_classes[u.unit]) for u in units]
    bad = [c for c in classes if not 0 <= c < len(class_names)]
    if bad:
        raise ValueError(f"units map to classes {bad[:5]} outside the {len(class_names)} class names")
    return classes


def final_layer_accuracy(
    round: ExplanationRound,
    layer: str,
    class_names: Sequence[str],
    *,
    ks: Sequence[int] = (1, 5),
    unit_classes: Sequence[int] | None = None,
) -> dict[str, float]:
    """Top-k accuracy of output unit -> its own class, from the description and alternatives ranking.

    Args:
        round: Explanations of the output layer, made with the class names as the vocabulary.
        layer: Name of the output layer.
        class_names: Class names, indexed by class.
        ks: Which top-k accuracies to report. A unit with fewer than ``k - 1`` alternatives is judged on the
            ranking it has.
        unit_classes: Class of each unit (default: unit ``j`` is class ``j``).

    Returns:
        ``{"top1": ..., "top5": ...}`` (one key per ``k``), fractions of the layer's explained units.

    Raises:
        ValueError: If the layer has no explained units or a unit maps outside the class names.
    """
    units = round.layer(layer)
    if not units:
        raise ValueError(f"layer {layer!r} has no explanations in this round (layers: {round.layers})")
    classes = _unit_classes(units, class_names, unit_classes)
    targets = [normalize_text(class_names[c]) for c in classes]
    rankings = [[normalize_text(t) for t in ranked_texts(u)] for u in units]
    return {
        f"top{k}": sum(target in ranking[:k] for target, ranking in zip(targets, rankings)) / len(units) for k in ks
    }


def embed_texts(texts: Sequence[str], embed: EmbedFn) -> Tensor:
    """L2-normalised embeddings ``[len(texts), D]`` of ``texts`` in order, each distinct text embedded once.

    Example:
        >>> import torch
        >>> calls = []
        >>> embed = lambda t: calls.append(list(t)) or torch.tensor([[2.0, 0.0]] * len(t))
        >>> embed_texts(["cat", "cat"], embed).tolist(), calls
        ([[1.0, 0.0], [1.0, 0.0]], [['cat']])
    """
    unique = list(dict.fromkeys(texts))
    emb = torch.nn.functional.normalize(embed(unique).float(), dim=-1)
    index = {t: i for i, t in enumerate(unique)}
    return emb[[index[t] for t in texts]]


def text_similarity(a: Sequence[str], b: Sequence[str], embed: EmbedFn) -> Tensor:
    """Cosine similarity of matching texts ``a[i]`` and ``b[i]`` in a sentence-embedding space.

    Args:
        a: Texts.
        b: Texts of the same length.
        embed: Text embedder (e.g. ``backend.encode_descriptions``, MiniLM in the embedded backend).

    Returns:
        ``[len(a)]`` cosine similarities (embeddings are re-normalised, so any embedder works).

    Example:
        >>> import torch
        >>> table = {"cat": [1.0, 0.0], "kitten": [0.6, 0.8], "car": [0.0, 1.0]}
        >>> embed = lambda texts: torch.tensor([table[t] for t in texts])
        >>> text_similarity(["cat", "car"], ["kitten", "kitten"], embed).tolist()
        [0.6000000238418579, 0.800000011920929]
    """
    if len(a) != len(b):
        raise ValueError(f"need texts of equal length, got {len(a)} and {len(b)}")
    if not a:
        return torch.zeros(0)
    emb = embed_texts([*a, *b], embed)
    return (emb[: len(a)] * emb[len(a) :]).sum(dim=-1)


def final_layer_similarity(
    round: ExplanationRound,
    layer: str,
    class_names: Sequence[str],
    embed: EmbedFn,
    *,
    unit_classes: Sequence[int] | None = None,
) -> Tensor:
    """Per output unit, the cosine similarity between its description and its class name.

    Args:
        round: Explanations of the output layer (usually made with a general vocabulary).
        layer: Name of the output layer.
        class_names: Class names, indexed by class.
        embed: Sentence embedder of the descriptions (MiniLM in the embedded backend).
        unit_classes: Class of each unit (default: unit ``j`` is class ``j``).

    Returns:
        ``[U]`` similarities, ordered by unit.
    """
    units = round.layer(layer)
    if not units:
        raise ValueError(f"layer {layer!r} has no explanations in this round (layers: {round.layers})")
    classes = _unit_classes(units, class_names, unit_classes)
    return text_similarity([u.description for u in units], [class_names[c] for c in classes], embed)


def final_layer_class_rank(
    round: ExplanationRound,
    layer: str,
    class_names: Sequence[str],
    embed: EmbedFn,
    *,
    unit_classes: Sequence[int] | None = None,
) -> Tensor:
    """Per output unit, how its own class name ranks among all class names by similarity to its description.

    The raw similarity of :func:`final_layer_similarity` rewards descriptions that are close to every class
    name (a generic word such as "bird" or "object" scores about 0.35 with MiniLM against any class). This is
    the AUC of the own class's similarity against the other classes' similarities: 1 when the description is
    closer to its class than to any other, 0.5 for a description that says nothing about which class it is.

    Args:
        round: Explanations of the output layer.
        layer: Name of the output layer.
        class_names: Class names, indexed by class (at least two).
        embed: Sentence embedder.
        unit_classes: Class of each unit (default: unit ``j`` is class ``j``).

    Returns:
        ``[U]`` AUCs in ``[0, 1]``, ordered by unit.

    Example:
        >>> import torch
        >>> from lightning_neurons.results import ExplanationRound, UnitExplanation
        >>> table = {"fur": [0.8, 0.6], "cat": [1.0, 0.0], "car": [0.0, 1.0]}
        >>> embed = lambda texts: torch.tensor([table[t] for t in texts])
        >>> rnd = ExplanationRound(0, [UnitExplanation("head", u, 0, "fur", 1.0) for u in range(2)])
        >>> final_layer_class_rank(rnd, "head", ["cat", "car"], embed).tolist()
        [1.0, 0.0]
    """
    from lightning_neurons.evaluation.stats import auc

    units = round.layer(layer)
    if not units:
        raise ValueError(f"layer {layer!r} has no explanations in this round (layers: {round.layers})")
    if len(class_names) < 2:
        raise ValueError("the class-name rank needs at least two classes")
    classes = _unit_classes(units, class_names, unit_classes)
    emb = embed_texts([*(u.description for u in units), *class_names], embed)
    sims = emb[: len(units)] @ emb[len(units) :].T  # [U, classes]
    own = torch.tensor(classes)
    positive = sims.gather(1, own[:, None])
    others = torch.ones_like(sims, dtype=torch.bool)
    others[torch.arange(len(units)), own] = False
    negative = sims[others].reshape(len(units), -1)
    return auc(positive, negative)


__all__ = [
    "embed_texts",
    "final_layer_accuracy",
    "final_layer_class_rank",
    "final_layer_similarity",
    "normalize_text",
    "ranked_texts",
    "text_similarity",
]
