"""Ablation check (the paper's): do the classes hurt most by zeroing a unit agree with its description?

A class is hurt by a unit in proportion to the drop of its mean true-class probability (softmax of the logits
at the true label, averaged over the class's held-out samples) when the unit is zeroed: the classes the unit
*supports*. This is the default (``measure="probability"``) because the alternative, the drop of per-class
top-1 accuracy (``measure="accuracy"``, what the explanation pipeline reports), moves in steps of one image
(``1 / 16`` per class in the benchmark): most units flip one or two images of arbitrary classes, so their "hurt
classes" are largely noise, and units that flip none are left out. The probability drop is continuous, ranks
every class and is dominated by the classes whose evidence the unit carries.

The drops depend only on the unit, not on its description, so they are measured once per layer
(:func:`ablation_drops`, with :func:`lightning_neurons.explanation.ablation.ablate_units`) and every method and
baseline is judged against the same hurt classes (:func:`ablation_agreement`). A description "names" a hurt
class when it equals it (case-insensitive) or when their sentence-embedding similarity reaches a threshold.

Example:
    >>> import torch
    >>> table = {"fur": [0.8, 0.6], "cat": [1.0, 0.0], "sky": [0.0, 1.0]}
    >>> embed = lambda texts: torch.tensor([table[t] for t in texts])
    >>> res = ablation_agreement(["fur", "sky", "cat"], [["cat"], ["cat"], []], embed, threshold=0.7)
    >>> res.hit.tolist(), res.evaluated.tolist()
    ([True, False, False], [True, True, False])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_neurons.evaluation.final_layer import EmbedFn, embed_texts, normalize_text
from lightning_neurons.evaluation.stats import auc
from lightning_neurons.explanation.ablation import HurtMeasure, ablate_units
from lightning_neurons.recording.hooks import ForwardFn, LayerTaps, SelectorSpec, evaluating
from lightning_neurons.recording.types import UnitKind

Hurt = list[tuple[str, float]]


@dataclass
class AblationAgreement:
    """Per-unit agreement of descriptions with the classes their ablation hurts.

    Args:
        hit: ``[U]`` bool, the description names one of the unit's hurt classes: it equals one, or (with the
            class names known) the class name closest to it is a hurt class, or (without them) its similarity
            with a hurt class reaches the threshold.
        similarity: ``[U]`` the best sentence-embedding similarity of the description with a hurt class
            (0 where no class is hurt). Uncentred: a generic word close to every class name scores high on it,
            so it is a diagnostic, not a quality measure.
        evaluated: ``[U]`` bool, the unit hurts at least one class (only those count in the means).
        rank: ``[U]`` AUC of the description's similarity with the hurt classes against the other classes
            (0.5 = chance; ``nan`` where no class list was given or every class is hurt).
        gap: ``[U]`` mean similarity of the description with the hurt classes minus its mean similarity with
            the other classes (0 = chance, ``nan`` as for ``rank``): the similarity, centred per description.
    """

    hit: Tensor
    similarity: Tensor
    evaluated: Tensor
    rank: Tensor | None = None
    gap: Tensor | None = None

    def summary(self) -> dict[str, float]:
        """Means over the evaluated units, ``nan`` where not measured.

        Keys: ``ablation_hit_rate``, ``ablation_rank``, ``ablation_similarity_gap``, ``ablation_similarity``
        (uncentred) and ``ablation_units``.
        """
        n = int(self.evaluated.sum())
        nan = float("nan")
        out: dict[str, float] = {
            "ablation_hit_rate": nan,
            "ablation_rank": nan,
            "ablation_similarity_gap": nan,
            "ablation_similarity": nan,
            "ablation_units": n,
        }
        if n == 0:
            return out
        out["ablation_hit_rate"] = float(self.hit[self.evaluated].float().mean())
        out["ablation_similarity"] = float(self.similarity[self.evaluated].mean())
        for key, values in (("ablation_rank", self.rank), ("ablation_similarity_gap", self.gap)):
            if values is not None:
                kept = values[self.evaluated]
                kept = kept[torch.isfinite(kept)]
                out[key] = float(kept.mean()) if kept.numel() else nan
        return out


def layer_kind(
    model: nn.Module,
    layer: str,
    sample: Tensor,
    *,
    output_selector: SelectorSpec = None,
    forward_fn: ForwardFn | None = None,
) -> UnitKind:
    """The unit kind (``conv``/``token``/``linear``) of a layer, from one forward pass of one sample.

    Args:
        model: The network (run in ``eval()`` mode; its mode is restored).
        layer: Layer name.
        sample: Probe inputs; the first one is forwarded.
        output_selector: Which part of a tuple/dict output holds the units (one selector or ``{name or glob: ...}``).
        forward_fn: How to run the model, ``forward_fn(model, inputs)`` (``None``: ``model(inputs)``).
    """
    taps = LayerTaps.from_names(model, [layer], output_selector)

    def infer(name: str, out: Tensor) -> None:
        taps.kind_of(name, out)

    with taps.hooks(infer, forward_fn=forward_fn, stop_early=True) as run:
        run(sample[:1])
    if layer not in taps.kinds:
        raise ValueError(f"layer {layer!r} did not run in the forward pass")
    return taps.kinds[layer]


def ablation_drops(
    model: nn.Module,
    layer: str,
    units: Sequence[int],
    inputs: Tensor,
    labels: Tensor,
    class_names: Sequence[str],
    *,
    top: int = 3,
    measure: HurtMeasure = "probability",
    output_selector: SelectorSpec = None,
    forward_fn: ForwardFn | None = None,
) -> dict[int, Hurt]:
    """Per unit, the classes whose mean true-class probability (or accuracy) drops most when the unit is zeroed.

    Args:
        model: The network (run in ``eval()`` mode here; its mode is restored afterwards).
        layer: Name of the layer holding the units.
        units: Units to ablate.
        inputs: ``[N, ...]`` held-out probe inputs.
        labels: ``[N]`` their class labels.
        class_names: Class names, indexed by class.
        top: Hurt classes kept per unit (only positive drops).
        measure: ``"probability"`` (default): drop of the class's mean softmax probability of its true label;
            ``"accuracy"``: drop of its top-1 accuracy (coarse: steps of one image per class).
        output_selector: Which part of a tuple/dict layer output holds the units: one selector or
            ``{layer name or glob: selector}``, as in recording.
        forward_fn: How to run the model, ``forward_fn(model, inputs)`` (``None``: ``model(inputs)``).

    Returns:
        ``{unit: [(class name, drop), ...]}``, largest drop first.

    Raises:
        KeyError: If the layer is not in the model.
        ValueError: If the probe has no labels or ``measure`` is unknown.
    """
    taps = LayerTaps.from_names(model, [layer], output_selector)  # KeyError for an unknown layer
    if bool((labels < 0).any()):
        raise ValueError("the ablation check needs class labels for every probe sample")
    with evaluating(model):
        kind = layer_kind(model, layer, inputs, output_selector=output_selector, forward_fn=forward_fn)
        return ablate_units(
            model,
            taps.layers[layer],
            kind,
            list(units),
            inputs,
            labels,
            class_names=list(class_names),
            top=top,
            layer_name=layer,
            measure=measure,
            output_selector=taps.selector_for(layer),
            forward_fn=forward_fn,
        )


def ablation_agreement(
    descriptions: Sequence[str],
    hurt: Sequence[Sequence[str]],
    embed: EmbedFn,
    *,
    threshold: float = 0.5,
    class_names: Sequence[str] | None = None,
) -> AblationAgreement:
    """Whether each description names one of the classes its unit's ablation hurts most.

    Args:
        descriptions: One description per unit.
        hurt: Per unit, the names of its hurt classes (may be empty).
        embed: Sentence embedder (MiniLM in the embedded backend).
        threshold: Similarity from which a description counts as naming a class.
        class_names: All class names; when given, ``rank`` says whether the description is closer to the hurt
            classes than to the others.

    Returns:
        The :class:`AblationAgreement`.

    Raises:
        ValueError: If the two lists differ in length.
    """
    if len(descriptions) != len(hurt):
        raise ValueError(f"need one hurt-class list per description, got {len(hurt)} for {len(descriptions)}")
    classes = sorted({c for names in hurt for c in names} | set(class_names or ()))
    u = len(descriptions)
    nan = float("nan")
    similarity = torch.zeros(u)
    exact = torch.zeros(u, dtype=torch.bool)
    nearest_hurt = torch.zeros(u, dtype=torch.bool)
    rank = gap = None
    evaluated = torch.tensor([len(names) > 0 for names in hurt], dtype=torch.bool)
    if classes:
        emb = embed_texts([*descriptions, *classes], embed)
        sims = emb[:u] @ emb[u:].T  # [U, classes]
        col = {c: j for j, c in enumerate(classes)}
        for i, names in enumerate(hurt):
            if names:
                similarity[i] = sims[i, [col[c] for c in names]].max()
                exact[i] = normalize_text(descriptions[i]) in {normalize_text(c) for c in names}
        if class_names:
            rank, gap = torch.full((u,), nan), torch.full((u,), nan)
            all_cols = [col[c] for c in dict.fromkeys(class_names)]
            nearest = torch.tensor(all_cols)[sims[:, all_cols].argmax(dim=1)]
            for i, names in enumerate(hurt):
                pos = [col[c] for c in dict.fromkeys(names)]
                neg = [j for j in all_cols if j not in pos]
                nearest_hurt[i] = int(nearest[i]) in pos
                if pos and neg:
                    rank[i] = auc(sims[i, pos][None], sims[i, neg][None])[0]
                    gap[i] = sims[i, pos].mean() - sims[i, neg].mean()
    # With every class name known, a description names the class it is closest to; without them, the classes
    # it is similar enough to. The first cannot be won by a generic word that is close to every class name.
    named = nearest_hurt if class_names else similarity >= threshold
    hit = evaluated & (exact | named)
    return AblationAgreement(hit=hit, similarity=similarity, evaluated=evaluated, rank=rank, gap=gap)


__all__ = ["AblationAgreement", "Hurt", "ablation_agreement", "ablation_drops", "layer_kind"]
