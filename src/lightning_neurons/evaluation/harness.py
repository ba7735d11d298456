"""Evaluate a round of explanations on a held-out probe: every metric, per layer, as one plain dictionary.

:func:`evaluate_round` runs the probe through the model and the image encoder once (or reuses a
:class:`~lightning_neurons.evaluation.probe.Probe`), then computes per explained layer:

- ``simulation``: mean Pearson correlation between activation and description-image similarity.
- ``contrast_auc`` / ``contrast_mad``: CoSy-style separation of the description's images from control images.
- ``ablation_hit_rate`` / ``ablation_rank`` / ``ablation_similarity``: agreement of the description with the
  classes the unit's ablation hurts most (when labels and class names are known).

and, for the output layer of a classifier (``final_layer``), ``final_top1`` / ``final_top5`` and
``final_class_similarity`` (CLIP-Dissect's final-layer protocol), plus ``final_class_rank``. Top-level
metrics are the means of the per-layer means. :func:`log_evaluation` writes such dictionaries to TensorBoard.

Example:
    >>> metrics = evaluate_round(model, rnd, (images, labels), backend, class_names=names)  # doctest: +SKIP
    >>> log_evaluation(writer, {"embedded": metrics}, epoch=3)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from lightning_neurons.backends.base import Backend
from lightning_neurons.evaluation.ablation_check import ablation_agreement, ablation_drops
from lightning_neurons.evaluation.contrast import contrast_scores
from lightning_neurons.evaluation.final_layer import (
    embed_texts,
    final_layer_accuracy,
    final_layer_class_rank,
    final_layer_similarity,
)
from lightning_neurons.evaluation.probe import Probe, ProbeData, build_probe, encode_probe_images, layer_activations
from lightning_neurons.evaluation.simulation import simulation_scores
from lightning_neurons.explanation.ablation import HurtMeasure
from lightning_neurons.recording.hooks import ForwardFn, SelectorSpec
from lightning_neurons.recording.samples import InputKey
from lightning_neurons.recording.types import Reduction
from lightning_neurons.recording.units import TokenMode
from lightning_neurons.results import ExplanationRound

#: Metrics averaged over the units of each explained layer.
LAYER_METRICS = (
    "simulation",
    "contrast_auc",
    "contrast_mad",
    "ablation_hit_rate",
    "ablation_rank",
    "ablation_similarity_gap",
    "ablation_similarity",
)

#: Reported but not a quality measure: raw similarity to the hurt class names, which a generic word close to every
#: class name wins (the constant baseline shows it); ``ablation_similarity_gap`` is its centred version.
DIAGNOSTIC_METRICS = ("ablation_similarity",)


@dataclass
class EvaluationConfig:
    """Settings of the evaluation.

    Args:
        image_mean: Per-channel mean the model inputs were normalised with (``None``: per-image min-max).
        image_std: Per-channel standard deviation of that normalisation.
        reduction: Per-sample reduction of a unit's map, as in recording (``"max"`` or ``"mean"``).
        token_mode: Class-token handling for token outputs.
        output_selector: Which part of a tuple/dict layer output holds the units: one selector or
            ``{layer name or glob: index | key | callable}``, as in recording.
        forward_fn: How to run the model on probe inputs, ``forward_fn(model, inputs)`` (``None``:
            ``model(inputs)``); its output (or its ``logits``) are the class scores of the ablation check.
        input_key: Index/key of the inputs in a batch (``None``: guess).
        target_key: Index/key of the labels in a batch (``None``: guess).
        concept_fraction: Fraction of the probe used as each description's concept images (contrast).
        num_control: Control images per unit (contrast); ``None`` = every other probe image.
        ablation: Run the ablation check (needs labels and class names).
        ablation_top: Hurt classes kept per unit.
        ablation_measure: How a class's hurt is measured: ``"probability"`` (default), the drop of its mean
            true-class softmax probability, continuous and stable on small probes; ``"accuracy"``, the drop of its
            top-1 accuracy, which moves in steps of one image per class and is mostly noise on a small probe.
        ablation_threshold: MiniLM similarity from which a description names a hurt class.
        ks: Top-k accuracies of the final-layer protocol.
        seed: Seed of the control draw.
        min_probe_samples: Below this many held-out samples :func:`evaluate_round` warns that its numbers are
            noise-dominated (it still computes them).
        max_probe_samples: The callback's evaluation (``evaluate=True``) uses at most this many held-out validation
            samples, a seeded random subset (the probe is held in memory; ``None``: all).
    """

    image_mean: tuple[float, ...] | None = None
    image_std: tuple[float, ...] | None = None
    reduction: Reduction = "max"
    token_mode: TokenMode = "auto"
    output_selector: SelectorSpec = None
    forward_fn: ForwardFn | None = None
    input_key: InputKey = None
    target_key: InputKey = None
    concept_fraction: float = 0.1
    num_control: int | None = None
    ablation: bool = True
    ablation_top: int = 3
    ablation_measure: HurtMeasure = "probability"
    ablation_threshold: float = 0.5
    ks: tuple[int, ...] = (1, 5)
    seed: int = 0
    min_probe_samples: int = 50
    max_probe_samples: int | None = 2000

    def __post_init__(self) -> None:
        if not 0 < self.concept_fraction < 1:
            raise ValueError(f"concept_fraction must be in (0, 1), got {self.concept_fraction}")
        if self.ablation_top < 1 or not self.ks or min(self.ks) < 1:
            raise ValueError("ablation_top and every k in ks must be >= 1")
        if self.ablation_measure not in ("probability", "accuracy"):
            raise ValueError(f"ablation_measure must be 'probability' or 'accuracy', got {self.ablation_measure!r}")


def evaluate_round(
    model: nn.Module,
    round: ExplanationRound,
    probe: Probe | ProbeData,
    backend: Backend,
    layers: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
    *,
    final_layer: str | None = None,
    unit_classes: Sequence[int] | None = None,
    config: EvaluationConfig | None = None,
    exclude_ids: Iterable[int] | None = None,
) -> dict[str, Any]:
    """Every quality metric of a round of explanations, measured on held-out probe samples.

    Args:
        model: The explained network.
        round: Its explanations (from the pipeline or a baseline).
        probe: Held-out samples: ``(inputs, labels)``, a dataloader, or a :class:`Probe` already built for
            this model and encoder (reuse one to evaluate several methods on the same samples at the cost of one).
        backend: Foundation models: ``backend.encoder`` embeds images and descriptions,
            ``backend.encode_descriptions`` (MiniLM in the embedded backend) compares texts.
        layers: Layers for simulation, contrast and ablation; default: every layer of the round except
            ``final_layer``.
        class_names: Class names, indexed by class (ablation check and final-layer protocol).
        final_layer: The classifier's output layer, for the final-layer protocol.
        unit_classes: Class of each output unit (default: unit ``j`` is class ``j``).
        config: Settings (default :class:`EvaluationConfig`).
        exclude_ids: Probe positions to leave out when ``probe`` is not already a :class:`Probe` (e.g. the
            samples the explanations were made from, when the same loader serves both).

    Returns:
        ``{"simulation": ..., "contrast_auc": ..., "contrast_mad": ..., "ablation_hit_rate": ...,
        "ablation_rank": ..., "ablation_similarity": ..., "final_top1": ..., "final_top5": ...,
        "final_class_similarity": ..., "final_class_rank": ..., "probe_samples": N,
        "layers": {layer: {...per-layer means, "units"}}}``; keys whose inputs are missing
        (no final layer, no labels) are left out.

    Raises:
        ValueError: If a requested layer has no explanations in the round.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_neurons.backends.base import Backend
        >>> from lightning_neurons.results import ExplanationRound, UnitExplanation
        >>> class Enc:  # a toy encoder: image embedding = mean colour, text embedding = a fixed colour
        ...     name = "toy"
        ...     def encode_images(self, x): return nn.functional.normalize(x.mean((2, 3)), dim=1)
        ...     def encode_texts(self, t): return torch.eye(3)[[colours.index(s) for s in t]]
        >>> model = nn.Sequential(nn.Identity())  # unit c = intensity of channel c
        >>> colours = ["red", "green", "blue"]
        >>> rnd = ExplanationRound(0, [UnitExplanation("0", c, 0, d, 1.0) for c, d in enumerate(colours)])
        >>> images = torch.rand(60, 3, 1, 1).expand(-1, -1, 4, 4)  # flat colours of random intensity
        >>> out = evaluate_round(model, rnd, (images, torch.zeros(60).long()), Backend("toy", Enc()),
        ...                      config=EvaluationConfig(ablation=False))
        >>> out["simulation"] > 0.5, out["layers"]["0"]["units"]
        (True, 3)
    """
    cfg = config or EvaluationConfig()
    layers = list(layers) if layers is not None else [name for name in round.layers if name != final_layer]
    for name in [*layers, *([final_layer] if final_layer else [])]:
        if not round.layer(name):
            raise ValueError(f"layer {name!r} has no explanations in this round (layers: {round.layers})")
    if not isinstance(probe, Probe):
        probe = probe_for(model, probe, layers, backend, cfg, exclude_ids=exclude_ids)
    if len(probe) < cfg.min_probe_samples:
        warnings.warn(
            f"evaluating on only {len(probe)} held-out probe samples (fewer than {cfg.min_probe_samples}): each "
            "contrast concept set is a handful of images and every metric is noisy. Evaluate on a larger probe, "
            "e.g. a validation set with many more samples than top_k times the explained units.",
            UserWarning,
            stacklevel=2,
        )
    _complete_probe(model, probe, layers, backend, cfg)

    per_layer = {name: _layer_metrics(model, round, probe, backend, name, class_names, cfg) for name in layers}
    result: dict[str, Any] = {}
    for metric in LAYER_METRICS:
        values = [m[metric] for m in per_layer.values() if metric in m and math.isfinite(m[metric])]
        if values:
            result[metric] = sum(values) / len(values)
    if final_layer is not None and class_names is not None:
        acc = final_layer_accuracy(round, final_layer, class_names, ks=cfg.ks, unit_classes=unit_classes)
        result.update({f"final_{k}": v for k, v in acc.items()})
        sims = final_layer_similarity(
            round, final_layer, class_names, backend.encode_descriptions, unit_classes=unit_classes
        )
        result["final_class_similarity"] = float(sims.mean())
        ranks = final_layer_class_rank(
            round, final_layer, class_names, backend.encode_descriptions, unit_classes=unit_classes
        )
        result["final_class_rank"] = float(ranks.mean())
    result["probe_samples"] = len(probe)
    result["layers"] = per_layer
    return result


def probe_for(
    model: nn.Module,
    data: ProbeData,
    layers: Sequence[str],
    backend: Backend,
    config: EvaluationConfig | None = None,
    *,
    exclude_ids: Iterable[int] | None = None,
) -> Probe:
    """A :class:`Probe` built with an evaluation's settings, to share between several :func:`evaluate_round` calls.

    Args:
        model: The explained network.
        data: Held-out samples: ``(inputs, labels)`` or a dataloader.
        layers: Layers whose activations are needed.
        backend: Its ``encoder`` embeds the probe images.
        config: Settings (normalisation, reduction, batch keys); default :class:`EvaluationConfig`.
        exclude_ids: Probe positions to leave out (e.g. :func:`explained_sample_ids` of the round).

    Example:
        >>> probe = probe_for(model, loader, ["layer3"], backend, exclude_ids=explained)  # doctest: +SKIP
        >>> metrics = {name: evaluate_round(model, r, probe, backend) for name, r in rounds.items()}  # doctest: +SKIP
    """
    cfg = config or EvaluationConfig()
    return build_probe(
        model,
        data,
        layers,
        backend.encoder,
        image_mean=cfg.image_mean,
        image_std=cfg.image_std,
        reduction=cfg.reduction,
        token_mode=cfg.token_mode,
        input_key=cfg.input_key,
        target_key=cfg.target_key,
        exclude_ids=exclude_ids,
        output_selector=cfg.output_selector,
        forward_fn=cfg.forward_fn,
    )


def _complete_probe(
    model: nn.Module, probe: Probe, layers: Sequence[str], backend: Backend, cfg: EvaluationConfig
) -> None:
    """Add what a reused probe lacks (activations of new layers, image embeddings)."""
    missing = [name for name in layers if name not in probe.activations]
    if missing:
        probe.activations.update(
            layer_activations(
                model,
                probe.inputs,
                missing,
                reduction=cfg.reduction,
                token_mode=cfg.token_mode,
                output_selector=cfg.output_selector,
                forward_fn=cfg.forward_fn,
            )
        )
    if probe.image_embeddings is None and layers:
        probe.image_embeddings = encode_probe_images(backend.encoder, probe.inputs, cfg.image_mean, cfg.image_std)


def _layer_metrics(
    model: nn.Module,
    round: ExplanationRound,
    probe: Probe,
    backend: Backend,
    layer: str,
    class_names: Sequence[str] | None,
    cfg: EvaluationConfig,
) -> dict[str, float]:
    units = round.layer(layer)
    index = torch.tensor([u.unit for u in units])
    acts = probe.activations[layer][:, index]  # [N, U] of the explained units
    assert probe.image_embeddings is not None
    descriptions = [u.description for u in units]
    text = embed_texts(descriptions, backend.encoder.encode_texts)  # each distinct description encoded once
    sims = probe.image_embeddings.float() @ text.T
    contrast = contrast_scores(
        acts, sims, concept_fraction=cfg.concept_fraction, num_control=cfg.num_control, seed=cfg.seed
    )
    out: dict[str, float] = {
        "units": len(units),
        "simulation": float(simulation_scores(acts, probe.image_embeddings, text).mean()),
        "contrast_auc": float(contrast.auc.mean()),
        "contrast_mad": float(contrast.mad.mean()),
    }
    labelled = bool((probe.labels >= 0).all())
    if cfg.ablation and class_names is not None and labelled:
        if probe.ablation_measure != cfg.ablation_measure:  # drops cached under another measure are not reusable
            probe.ablation.clear()
            probe.ablation_measure = cfg.ablation_measure
        drops = probe.ablation.setdefault(layer, {})
        todo = [u.unit for u in units if u.unit not in drops]
        if todo:
            drops.update(
                ablation_drops(
                    model,
                    layer,
                    todo,
                    probe.inputs,
                    probe.labels,
                    class_names,
                    top=cfg.ablation_top,
                    measure=cfg.ablation_measure,
                    output_selector=cfg.output_selector,
                    forward_fn=cfg.forward_fn,
                )
            )
        hurt = [[name for name, _ in drops[u.unit]] for u in units]
        agreement = ablation_agreement(
            descriptions, hurt, backend.encode_descriptions, threshold=cfg.ablation_threshold, class_names=class_names
        )
        out.update(agreement.summary())
    return out


def explained_sample_ids(round: ExplanationRound) -> set[int]:
    """Every probe-sample id in any unit's top-k set of ``round``.

    Pass it as ``exclude_ids`` when the explanations and the evaluation use the same probe loader, so that
    the metrics are measured on samples the explanations were not made from.

    Example:
        >>> from lightning_neurons.results import UnitExplanation
        >>> rnd = ExplanationRound(0, [UnitExplanation("l", 0, 0, "x", 1.0, top_sample_ids=[4, 2, -1])])
        >>> sorted(explained_sample_ids(rnd))
        [2, 4]
    """
    return {int(i) for u in round for i in u.top_sample_ids if int(i) >= 0}


class ScalarWriter(Protocol):
    """Anything with TensorBoard's ``add_scalar`` (``SummaryWriter``, Lightning's ``logger.experiment``)."""

    def add_scalar(self, tag: str, scalar_value: float, global_step: int | None = None) -> Any: ...


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Flatten nested metric dictionaries into ``{"a/b/c": value}``, keeping only finite numbers.

    Example:
        >>> flatten_metrics({"embedded": {"simulation": 0.2, "layers": {"l1": {"units": 8}}, "x": "text"}})
        {'embedded/simulation': 0.2, 'embedded/layers/l1/units': 8.0}
    """
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        tag = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, tag))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value)):
            flat[tag] = float(value)
    return flat


def log_evaluation(writer: ScalarWriter, metrics: Mapping[str, Any], epoch: int, *, prefix: str = "evaluation") -> int:
    """Write evaluation results as scalars ``evaluation/<method>/<metric>`` (nested keys joined by ``/``).

    Args:
        writer: A TensorBoard ``SummaryWriter`` (or anything with ``add_scalar``).
        metrics: ``{method: evaluate_round(...) result}``, e.g. ``{"embedded": ..., "random": ...}``.
        epoch: The global step (the callback logs everything with ``global_step = epoch``).
        prefix: Top-level tag.

    Returns:
        The number of scalars written.

    Example:
        >>> class Writer:
        ...     def __init__(self): self.tags = []
        ...     def add_scalar(self, tag, value, global_step=None): self.tags.append((tag, value, global_step))
        >>> w = Writer()
        >>> log_evaluation(w, {"embedded": {"simulation": 0.25}}, epoch=2), w.tags
        (1, [('evaluation/embedded/simulation', 0.25, 2)])
    """
    flat = flatten_metrics(metrics, prefix)
    for tag, value in flat.items():
        writer.add_scalar(tag, value, global_step=epoch)
    return len(flat)


__all__ = [
    "EvaluationConfig",
    "ScalarWriter",
    "evaluate_round",
    "explained_sample_ids",
    "flatten_metrics",
    "log_evaluation",
    "probe_for",
]
