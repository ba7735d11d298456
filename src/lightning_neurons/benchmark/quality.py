"""The offline quality benchmark: train a small classifier, explain it, score the method against baselines.

Everything runs on data and models shipped with the installed packages (no network):

1. A :class:`~lightning_neurons.demo.SmallCNN` is trained on :class:`~lightning_neurons.demo.PhotoPatches`
   (random crops of 12 real photos). Three disjoint splits come from three crop seeds: training, the
   explaining probe (top-k samples and control crops) and the held-out evaluation probe (every metric).
2. The embedded backend explains the output layer twice (class names as vocabulary, for top-1/top-5; the
   general vocabulary alone, for the class-name similarity: CLIP-Dissect's protocol does not hand the class
   names over) and a conv block with what users get by default (the callback's ``["general", "classes"]``).
3. The same rounds are re-described by the three baselines (random, constant, label) and every round is
   scored with :func:`~lightning_neurons.evaluation.evaluate_round` on the held-out probe. The random and
   constant baselines draw from the same vocabulary as the method on each round. The constant description is
   the concept with the highest mean image-text similarity over the held-out probe images
   (:func:`~lightning_neurons.evaluation.generic_concepts`): it is chosen without looking at any unit, and it
   is the strongest single description in the encoder's space (on the held-out images, which no method sees),
   so it errs in the baseline's favour.

Example:
    >>> result = run_benchmark()  # doctest: +SKIP
    >>> result["embedded"]["simulation"] > result["random"]["simulation"]  # doctest: +SKIP
    True
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_neurons.backends.base import Backend, ImageTextEncoder
from lightning_neurons.evaluation.baselines import (
    constant_baseline,
    generic_concepts,
    label_baseline,
    random_baseline,
)
from lightning_neurons.evaluation.final_layer import final_layer_accuracy
from lightning_neurons.evaluation.harness import DIAGNOSTIC_METRICS, LAYER_METRICS, EvaluationConfig, evaluate_round
from lightning_neurons.evaluation.probe import build_probe
from lightning_neurons.evaluation.simulation import simulation_scores
from lightning_neurons.explanation.multi_concept import combination_embedding, format_combination
from lightning_neurons.results import UNIT_KINDS, ExplanationRound

#: Metrics on which the method must beat the random and constant baselines (higher is better for all).
HEADLINE_METRICS = (
    "final_top1",
    "final_top5",
    "final_phrase_top1",
    "final_phrase_top5",
    "final_class_similarity",
    "final_class_rank",
    *(m for m in LAYER_METRICS if m not in DIAGNOSTIC_METRICS),
)


#: Every method the benchmark scores, the explanation method first.
METHODS = ("embedded", "random", "constant", "label")

#: Baselines the method must beat on every headline metric (the label baseline is a reference, not a bar).
BASELINES_TO_BEAT = ("random", "constant")


@dataclass
class BenchmarkConfig:
    """Settings of :func:`run_benchmark` (defaults keep the whole run to a few CPU minutes).

    Args:
        classes: PhotoPatches classes (default: all 12); with ``split``, the split's classes to keep (default all).
        split: ``None`` (the 12-photo PhotoPatches benchmark) or a split of the broad benchmark,
            ``"development"`` or ``"held_out"`` (:mod:`lightning_neurons.benchmark.scenes`): its classes have
            phrases too, so the final layer is also explained with the phrases as vocabulary
            (``final_phrase_top1`` / ``final_phrase_top5``).
        train_per_class: Training crops per class.
        probe_per_class: Explaining-probe crops per class (where the top-k samples come from).
        eval_per_class: Held-out evaluation crops per class (where every metric is measured).
        image_size: Side of the images.
        width: SmallCNN width (channels of the first block).
        epochs: Training epochs.
        lr: Adam learning rate.
        top_k: Top samples per unit.
        conv_layer: The conv block explained for simulation, contrast and ablation.
        final_layer: The classifier's output layer.
        correction: Concept-score correction of the explanation stage (``"control"`` or ``"soft_wpmi"``).
        crop_size: Side of the crops given to the encoder (``None``: the encoder's own side, as the callback cuts
            them; 96 keeps the figures comparable with the earlier runs).
        dedupe_iou: Boxes of a sample overlapping more than this become one crop (``None``: ``ExplainConfig``'s).
        reservoir_size: Random control samples of the recording.
        seed: Seed of the crops, the weights and the baselines.
        ablation_measure: Hurt measure of the ablation check (``"probability"``: drop of the mean true-class
            probability, the default; ``"accuracy"``: drop of per-class accuracy, steps of ``1/eval_per_class``).
        backend_kwargs: Keyword arguments of ``load_backend("embedded", ...)``.
        multi_concept: Also fit multi-concept explanations of the conv block (``embedded_multi`` in the result).
        randomisation_check: Also explain the same network with random weights (``sanity`` in the result).
    """

    classes: list[str] | None = None
    split: str | None = None
    train_per_class: int = 48
    probe_per_class: int = 16
    eval_per_class: int = 16
    image_size: int = 64
    width: int = 8
    epochs: int = 6
    lr: float = 3e-3
    top_k: int = 8
    conv_layer: str = "features.block3"
    final_layer: str = "head"
    correction: str = "control"
    crop_size: int | None = 96
    dedupe_iou: float | None = None
    reservoir_size: int = 48
    seed: int = 0
    ablation_measure: str = "probability"
    backend_kwargs: dict[str, Any] = field(default_factory=dict)
    multi_concept: bool = True
    randomisation_check: bool = True


class MemoEncoder:
    """Wraps an image-text encoder and embeds each distinct image (and text) only once.

    The benchmark explains the output layer with two vocabularies: the crops are the same both times, and
    the encoder is by far the slowest part on a CPU.

    Args:
        encoder: The wrapped encoder.
    """

    def __init__(self, encoder: ImageTextEncoder) -> None:
        self.encoder = encoder
        self.name = encoder.name
        self.cacheable = bool(getattr(encoder, "cacheable", True))
        self._images: dict[bytes, Tensor] = {}
        self._texts: dict[str, Tensor] = {}

    @property
    def image_size(self) -> Any:
        """The wrapped encoder's input side, where it says (crops are cut at it: ``ExplainConfig.for_encoder``)."""
        return getattr(self.encoder, "image_size", None)

    def encode_images(self, images: Tensor) -> Tensor:
        """Embed images, reusing the embedding of any image seen before."""
        keys = [
            hashlib.blake2b(img.detach().cpu().contiguous().numpy().tobytes(), digest_size=16).digest()
            for img in images
        ]
        todo = [i for i, k in enumerate(keys) if k not in self._images]
        if todo:
            new = self.encoder.encode_images(images[todo])
            for i, emb in zip(todo, new):
                self._images[keys[i]] = emb
        return torch.stack([self._images[k] for k in keys])

    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        """Embed texts, reusing the embedding of any text seen before."""
        todo = list(dict.fromkeys(t for t in texts if t not in self._texts))
        if todo:
            for t, emb in zip(todo, self.encoder.encode_texts(todo)):
                self._texts[t] = emb
        return torch.stack([self._texts[t] for t in texts])


def train_classifier(cfg: BenchmarkConfig, train_set: Any) -> nn.Module:
    """Train a SmallCNN with a plain loop (quiet and deterministic on the CPU); returns it in eval mode."""
    from lightning_neurons.demo import SmallCNN

    torch.manual_seed(cfg.seed)
    model = SmallCNN(num_classes=len(train_set.classes), width=cfg.width, lr=cfg.lr)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    loader = DataLoader(train_set, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(cfg.seed))
    model.train()
    for _ in range(cfg.epochs):
        for images, labels in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, inputs: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``(inputs, labels)``."""
    return float((model(inputs).argmax(dim=1) == labels).float().mean())


def run_benchmark(
    run_dir: str | Path | None = None, *, config: BenchmarkConfig | None = None, backend: Backend | None = None
) -> dict[str, Any]:
    """Run the whole offline harness and return one JSON-able dictionary with an entry per method.

    Args:
        run_dir: Must be ``None``: a saved run is evaluated by :func:`lightning_neurons.posthoc.evaluate_run`.
        config: Benchmark settings (default :class:`BenchmarkConfig`).
        backend: A loaded backend to use instead of ``load_backend("embedded")``.

    Returns:
        ``{"embedded": {...}, "random": {...}, "constant": {...}, "label": {...}, "checks": {...},
        "setup": {...}}``: per method the metrics of :data:`HEADLINE_METRICS` plus per-layer details;
        ``checks`` says, per metric, whether the method beats the random and the constant baseline.

    Raises:
        ValueError: If ``run_dir`` is given.

    Example:
        >>> out = run_benchmark(config=BenchmarkConfig(epochs=1))  # doctest: +SKIP
        >>> sorted(out)  # doctest: +SKIP
        ['checks', 'constant', 'embedded', 'label', 'random', 'setup']
    """
    if run_dir is not None:
        raise ValueError(
            "run_benchmark is the built-in benchmark and takes no run directory; evaluate a `lightning-neurons fit` "
            "run with `lightning-neurons evaluate RUN_DIR` (lightning_neurons.posthoc.evaluate_run), any checkpoint "
            "with `lightning-neurons explain --checkpoint CKPT ... --evaluate`, or your own round with "
            "lightning_neurons.evaluation.evaluate_round(model, round, probe, backend, ...)"
        )
    from lightning_neurons.benchmark.scenes import SceneCrops, split_classes
    from lightning_neurons.concepts.vocabulary import Vocabulary
    from lightning_neurons.demo.data import IMAGE_MEAN, IMAGE_STD, PhotoPatches
    from lightning_neurons.explanation.pipeline import ExplainConfig, explain_recording
    from lightning_neurons.recording.recorder import collect_top_k
    from lightning_neurons.recording.samples import DataLoaderSampleSource

    cfg = config or BenchmarkConfig()
    timings: dict[str, float] = {}
    start = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal start
        now = time.perf_counter()
        timings[name] = round(now - start, 1)
        start = now

    def split(per_class: int, offset: int) -> PhotoPatches | SceneCrops:
        if cfg.split is not None:
            scenes = [c for c in split_classes(cfg.split) if cfg.classes is None or c.name in cfg.classes]
            return SceneCrops(scenes, per_class, cfg.image_size, seed=cfg.seed + offset)
        return PhotoPatches(cfg.classes, per_class, cfg.image_size, seed=cfg.seed + offset)

    train_set, probe_set, eval_set = (
        split(cfg.train_per_class, 0),
        split(cfg.probe_per_class, 1),
        split(cfg.eval_per_class, 2),
    )
    class_names = list(train_set.classes)
    phrases: list[str] | None = list(train_set.phrases) if isinstance(train_set, SceneCrops) else None
    model = train_classifier(cfg, train_set)
    eval_inputs = torch.stack([eval_set[i][0] for i in range(len(eval_set))])
    eval_labels = torch.tensor([eval_set[i][1] for i in range(len(eval_set))])
    lap("train")

    loaded = backend or _embedded_backend(cfg)
    backend = dataclasses.replace(loaded, encoder=MemoEncoder(loaded.encoder))
    # The general vocabulary alone for the output layer: the final-layer similarity asks for class names that are
    # not handed over. Hidden layers get the product default (the callback's ["general", "classes"]).
    basis = loaded.basis_concepts
    general = Vocabulary(["general"], exclude_general=basis, show_progress=False)
    default = Vocabulary(["general", "classes"], class_names=class_names, exclude_general=basis, show_progress=False)
    lap("load_backend")

    loader = DataLoader(probe_set, batch_size=64)
    layers = [cfg.final_layer, cfg.conv_layer]
    recording = collect_top_k(
        model, loader, layers, cfg.top_k, reservoir_size=cfg.reservoir_size, seed=cfg.seed, show_progress=False
    )
    source = DataLoaderSampleSource(loader)
    explain_cfg = ExplainConfig(
        correction=cfg.correction,  # type: ignore[arg-type]
        crop_size=cfg.crop_size,
        dedupe_iou=ExplainConfig.dedupe_iou if cfg.dedupe_iou is None else cfg.dedupe_iou,
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
        seed=cfg.seed,
        show_progress=False,
        preview_units={},
        multi_concept=cfg.multi_concept,
    )
    head_recording = type(recording)(
        **{**recording.__dict__, "layers": {cfg.final_layer: recording.layers[cfg.final_layer]}}
    )
    class_round = explain_recording(
        model, head_recording, source, backend, class_names, explain_cfg, class_names=class_names
    )
    phrase_round = None
    if phrases is not None:
        phrase_round = explain_recording(model, head_recording, source, backend, phrases, explain_cfg)
    lap("explain_class_vocabulary")
    general_round = explain_recording(
        model, head_recording, source, backend, general, explain_cfg, class_names=class_names
    )
    lap("explain_general_vocabulary")
    conv_recording = type(recording)(
        **{**recording.__dict__, "layers": {cfg.conv_layer: recording.layers[cfg.conv_layer]}}
    )
    conv_round = explain_recording(
        model, conv_recording, source, backend, default, explain_cfg, class_names=class_names
    )
    lap("explain_default_vocabulary")

    eval_cfg = EvaluationConfig(
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
        seed=cfg.seed,
        ablation_measure=cfg.ablation_measure,  # type: ignore[arg-type]
    )
    probe = build_probe(
        model,
        (eval_inputs, eval_labels),
        [cfg.conv_layer],
        backend.encoder,
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
    )
    lap("encode_probe")
    multi: dict[str, Any] | None = None
    sanity: dict[str, Any] | None = None
    if cfg.multi_concept:
        # The combinations the pipeline itself fitted (explain_recording's multi_concept stage, the users' code
        # path), scored on the held-out probe.
        multi = multi_concept_metrics(conv_round, cfg.conv_layer, probe, backend.encoder)
        lap("multi_concept")
    if cfg.randomisation_check:
        untrained = train_classifier(dataclasses.replace(cfg, epochs=0), train_set)
        random_recording = collect_top_k(
            untrained,
            loader,
            [cfg.conv_layer],
            cfg.top_k,
            reservoir_size=cfg.reservoir_size,
            seed=cfg.seed,
            show_progress=False,
        )
        random_round = explain_recording(
            untrained, random_recording, source, backend, default, explain_cfg, class_names=class_names
        )
        random_probe = build_probe(
            untrained, (eval_inputs, eval_labels), [cfg.conv_layer], image_mean=IMAGE_MEAN, image_std=IMAGE_STD
        )
        random_probe.image_embeddings = probe.image_embeddings
        # The same rounds without the frequency penalty (the crops are memoised: only the scoring is redone), for
        # the diversity before and after it.
        plain_cfg = dataclasses.replace(explain_cfg, frequency_penalty=0.0)
        unpenalised = {
            name: explain_recording(net, rec, source, backend, default, plain_cfg, class_names=class_names)
            for name, net, rec in (("trained", model, conv_recording), ("random", untrained, random_recording))
        }
        sanity = randomisation_check(
            conv_round,
            random_round,
            cfg.conv_layer,
            probe,
            random_probe,
            backend.encoder,
            unpenalised=(unpenalised["trained"], unpenalised["random"]),
        )
        lap("randomisation_check")

    general_texts = list(general.concepts)
    default_texts = list(default.concepts)
    assert probe.image_embeddings is not None  # build_probe was given the encoder
    generic_general = generic_concepts(backend.encoder, general_texts, probe.image_embeddings, n=5)
    generic_default = generic_concepts(backend.encoder, default_texts, probe.image_embeddings, n=5)
    generic_classes = generic_concepts(backend.encoder, class_names, probe.image_embeddings, n=5)
    generic_phrases = generic_concepts(backend.encoder, phrases, probe.image_embeddings, n=5) if phrases else []
    ceiling = {"names": zero_shot_accuracy(backend.encoder, probe.image_embeddings, eval_labels, class_names)}
    if phrases is not None:
        ceiling["phrases"] = zero_shot_accuracy(backend.encoder, probe.image_embeddings, eval_labels, phrases)

    def merged(head: ExplanationRound, conv: ExplanationRound) -> ExplanationRound:
        units = [*head.layer(cfg.final_layer), *conv.layer(cfg.conv_layer)]
        return ExplanationRound(epoch=head.epoch, units=units, meta=dict(head.meta))

    def by_phrase(make: Callable[[ExplanationRound], ExplanationRound]) -> ExplanationRound | None:
        return None if phrase_round is None else make(phrase_round)

    assert phrases is not None or phrase_round is None
    phrase_texts = phrases or []
    rounds: dict[str, tuple[ExplanationRound, ExplanationRound, ExplanationRound | None]] = {
        "embedded": (class_round, merged(general_round, conv_round), phrase_round),
        "random": (
            random_baseline(class_round, class_names, seed=cfg.seed),
            merged(
                random_baseline(general_round, general_texts, seed=cfg.seed),
                random_baseline(conv_round, default_texts, seed=cfg.seed),
            ),
            by_phrase(lambda r: random_baseline(r, phrase_texts, seed=cfg.seed)),
        ),
        "constant": (
            constant_baseline(class_round, generic_classes[0], generic_classes[1:]),
            merged(
                constant_baseline(general_round, generic_general[0], generic_general[1:]),
                constant_baseline(conv_round, generic_default[0], generic_default[1:]),
            ),
            by_phrase(lambda r: constant_baseline(r, generic_phrases[0], generic_phrases[1:])),
        ),
        "label": (
            label_baseline(class_round, recording.labels, class_names),
            merged(
                label_baseline(general_round, recording.labels, class_names),
                label_baseline(conv_round, recording.labels, class_names),
            ),
            by_phrase(lambda r: label_baseline(r, recording.labels, phrase_texts)),
        ),
    }
    result: dict[str, Any] = {}
    for method, (by_class, by_general, by_phrases) in rounds.items():
        metrics = evaluate_round(
            model,
            by_general,
            probe,
            backend,
            [cfg.conv_layer],
            class_names,
            final_layer=cfg.final_layer,
            config=eval_cfg,
        )
        metrics.update(
            {f"final_{k}": v for k, v in final_layer_accuracy(by_class, cfg.final_layer, class_names).items()}
        )
        if by_phrases is not None:
            accuracies = final_layer_accuracy(by_phrases, cfg.final_layer, phrase_texts)
            metrics.update({f"final_phrase_{k}": v for k, v in accuracies.items()})
        head = by_general.layer(cfg.final_layer)
        metrics["examples"] = {
            "head": {class_names[u.unit]: u.description for u in head[:6]},
            cfg.conv_layer: [u.description for u in by_general.layer(cfg.conv_layer)[:6]],
        }
        result[method] = {
            k: metrics[k] for k in (*HEADLINE_METRICS, *DIAGNOSTIC_METRICS, "layers", "examples") if k in metrics
        }
    lap("evaluate")

    result["encoder_ceiling"] = ceiling
    if multi is not None:
        result["embedded_multi"] = multi
    if sanity is not None:
        result["sanity"] = sanity
    result["checks"] = _checks(result)
    result["setup"] = {
        **{k: v for k, v in asdict(cfg).items() if k != "backend_kwargs"},
        "classes": class_names,
        "eval_accuracy": accuracy(model, eval_inputs, eval_labels),
        "probe_samples": len(probe_set),
        "eval_samples": len(eval_set),
        "general_vocabulary": len(general_texts),
        "default_vocabulary": len(default_texts),
        "constant_descriptions": {
            "class_vocabulary": generic_classes[0],
            "general_vocabulary": generic_general[0],
            "default_vocabulary": generic_default[0],
        },
        "backend": loaded.name,
        "timings_s": timings,
    }
    return _rounded(result)


def _layer_simulation(
    round: ExplanationRound, layer: str, probe: Any, encoder: ImageTextEncoder, overrides: dict[int, Tensor]
) -> float:
    """Mean simulation of a layer's units on ``probe``; ``overrides`` replaces some units' description embedding."""
    units = round.layer(layer)
    texts = encoder.encode_texts([u.description for u in units])
    for row, unit in enumerate(units):
        if unit.unit in overrides:
            texts[row] = overrides[unit.unit]
    acts = probe.activations[layer][:, [u.unit for u in units]]
    return float(simulation_scores(acts, probe.image_embeddings, texts).mean())


def multi_concept_metrics(
    round: ExplanationRound, layer: str, eval_probe: Any, encoder: ImageTextEncoder
) -> dict[str, Any]:
    """Held-out simulation of a layer with its single descriptions and with the pipeline's combinations.

    The combinations are the ones ``explain_recording`` fitted (``ExplainConfig.multi_concept``: each unit's top
    crops and the reservoir images, kept where they beat the description on held-out samples); here each kept
    combination's text embedding ``sum_j w_j * e_j`` replaces the unit's description embedding.

    Returns:
        ``{"simulation_single", "simulation", "kept", "examples"}``: mean held-out simulation with the single
        descriptions and with the kept combinations in their place, the share of units whose combination was
        kept, and a few combinations as text.
    """
    units = round.layer(layer)
    overrides: dict[int, Tensor] = {}
    for unit in units:
        if unit.combination:
            texts = [a.text for a in unit.combination]
            overrides[unit.unit] = combination_embedding(
                [(i, a.score) for i, a in enumerate(unit.combination)], encoder.encode_texts(texts)
            )
    examples = {str(u.unit): format_combination(u.combination) for u in units if u.combination}
    return {
        "simulation_single": _layer_simulation(round, layer, eval_probe, encoder, {}),
        "simulation": _layer_simulation(round, layer, eval_probe, encoder, overrides),
        "kept": len(overrides) / max(1, len(units)),
        "examples": dict(list(examples.items())[:6]),
    }


def randomisation_check(
    trained: ExplanationRound,
    untrained: ExplanationRound,
    layer: str,
    probe: Any,
    random_probe: Any,
    encoder: ImageTextEncoder,
    *,
    unpenalised: tuple[ExplanationRound, ExplanationRound] | None = None,
    quantile: float = 0.9,
) -> dict[str, Any]:
    """The model-randomisation check and the diversity of the descriptions, for one layer.

    The same network with random weights is explained like the trained one. Per network: the share of the layer's
    units of each kind (``<network>_<kind>_share``; a random network should have almost no ``concept``), the mean
    explanation score, the mean confidence (``None`` unless ``confidence_samples > 0``)
    (``UnitExplanation.confidence``, 0.5 = chance) and the share of units above the rounds' confidence threshold
    (``round.meta["confidence_threshold"]``: the others are shown as "no clear concept"), the held-out simulation
    (a random network should sit near 0), distinct descriptions and the share of the most frequent one, after
    and, with ``unpenalised`` (the same rounds explained with ``frequency_penalty=0``), before the frequency
    penalty. ``random_confidence_q90`` is the ``quantile`` of the random network's confidences.

    Example:
        >>> sanity = randomisation_check(trained, untrained, "layer3", probe, random_probe, encoder)  # doctest: +SKIP
        >>> sanity["trained_confident"] > sanity["random_confident"]  # doctest: +SKIP
        True
    """
    threshold = trained.meta.get("confidence_threshold")
    out: dict[str, Any] = {"threshold": float("nan") if threshold is None else float(threshold)}
    for name, rnd, sim_probe in (("trained", trained, probe), ("random", untrained, random_probe)):
        units = [u for u in rnd.layer(layer) if u.description]
        conf = torch.tensor([float("nan") if u.confidence is None else u.confidence for u in units])
        diversity = description_diversity(units)
        out[f"{name}_score"] = sum(u.score for u in units) / max(1, len(units))
        layer_units = rnd.layer(layer)
        for kind in UNIT_KINDS:  # what each network's units amount to (the randomisation check of the kinds)
            share = sum(u.kind == kind for u in layer_units) / max(1, len(layer_units))
            out[f"{name}_{kind}_share"] = float(share)
        out[f"{name}_confidence"] = float(conf.nanmean()) if len(units) else float("nan")
        # Without a threshold (confidence is off by default) no unit is "above" it: NaN, not a silent 100%.
        confident = float((conf > threshold).float().mean()) if threshold is not None and len(units) else float("nan")
        out[f"{name}_confident"] = confident
        out[f"{name}_simulation"] = _layer_simulation(rnd, layer, sim_probe, encoder, {})
        out[f"{name}_distinct"] = float(diversity["distinct"])
        out[f"{name}_top_share"] = float(diversity["top_share"])
        out[f"{name}_top_description"] = diversity["top"]
        if name == "random" and len(units):
            out["random_confidence_q90"] = float(conf.nan_to_num(0.5).quantile(quantile))
    if unpenalised is not None:
        for name, rnd in zip(("trained", "random"), unpenalised):
            diversity = description_diversity([u for u in rnd.layer(layer) if u.description])
            out[f"{name}_distinct_unpenalised"] = float(diversity["distinct"])
            out[f"{name}_top_share_unpenalised"] = float(diversity["top_share"])
        out["trained_simulation_unpenalised"] = _layer_simulation(unpenalised[0], layer, probe, encoder, {})
    return out


def description_diversity(units: Sequence[Any]) -> dict[str, Any]:
    """Distinct descriptions, the share of the most frequent one and that description.

    Example:
        >>> from lightning_neurons.results import UnitExplanation
        >>> description_diversity([UnitExplanation("l", i, None, d, 0.5) for i, d in enumerate("aab")])
        {'units': 3, 'distinct': 2, 'top_share': 0.6667, 'top': 'a'}
    """
    counts = Counter(u.description for u in units)
    top, count = counts.most_common(1)[0] if counts else ("", 0)
    return {"units": len(units), "distinct": len(counts), "top_share": round(count / max(1, len(units)), 4), "top": top}


def zero_shot_accuracy(
    encoder: ImageTextEncoder, image_embeddings: Tensor, labels: Tensor, texts: Sequence[str]
) -> float:
    """Per-crop zero-shot accuracy of the encoder: the share of images whose nearest text is their class's.

    This is the ceiling of every explanation made with that encoder: a unit's description can only be as right
    as the encoder's reading of the crops it is read from.

    Example:
        >>> zero_shot_accuracy(encoder, probe.image_embeddings, labels, ["cat", "moon"])  # doctest: +SKIP
        0.62
    """
    texts_emb = encoder.encode_texts(list(texts)).to(image_embeddings)
    return float(((image_embeddings @ texts_emb.T).argmax(dim=1) == labels.to(image_embeddings.device)).float().mean())


def run_benchmark_seeds(
    seeds: Sequence[int] = (0, 1, 2),
    *,
    config: BenchmarkConfig | None = None,
    backend: Backend | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Run :func:`run_benchmark` once per seed (data, weights, baselines) and average the metrics.

    One seed trains one small classifier on 12 photos and explains 12 output units: a few units decide a metric,
    so single-seed comparisons are noisy. The checks say whether the method beats each baseline on the mean over
    seeds (``checks``) and on every seed (``checks_every_seed``).

    Args:
        seeds: Seeds to run (each replaces ``config.seed``).
        config: Settings shared by every seed (default :class:`BenchmarkConfig`).
        backend: A loaded backend to use instead of ``load_backend("embedded")`` (loaded once otherwise).
        show_progress: A progress bar over the seeds (about half a minute each on two CPU cores).

    Returns:
        ``{"seeds", "embedded", "random", "constant", "label", "checks", "checks_every_seed", "per_seed",
        "setup"}``: per method the mean of each metric of :data:`HEADLINE_METRICS` and
        :data:`~lightning_neurons.evaluation.harness.DIAGNOSTIC_METRICS` over the seeds; ``per_seed`` holds each
        seed's own :func:`run_benchmark` result.

    Raises:
        ValueError: If ``seeds`` is empty.

    Example:
        >>> out = run_benchmark_seeds([0, 1])  # doctest: +SKIP
        >>> out["checks"]["simulation"]  # doctest: +SKIP
        {'random': True, 'constant': True}
    """
    seeds = list(dict.fromkeys(int(s) for s in seeds))
    if not seeds:
        raise ValueError("run_benchmark_seeds needs at least one seed")
    base = config or BenchmarkConfig()
    backend = backend or _embedded_backend(base)  # loaded once for every seed
    from tqdm.auto import tqdm

    per_seed = {
        str(seed): run_benchmark(config=dataclasses.replace(base, seed=seed), backend=backend)
        for seed in tqdm(seeds, desc="quality benchmark", unit="seed", disable=not show_progress)
    }
    runs = list(per_seed.values())
    metrics = (*HEADLINE_METRICS, *DIAGNOSTIC_METRICS)
    result: dict[str, Any] = {"seeds": seeds}
    for method in METHODS:
        result[method] = {
            m: sum(run[method][m] for run in runs) / len(runs) for m in metrics if all(m in run[method] for run in runs)
        }
    for part, keys in (("encoder_ceiling", None), ("embedded_multi", ("simulation_single", "simulation", "kept"))):
        if part not in runs[0]:
            continue
        result[part] = {key: sum(run[part][key] for run in runs) / len(runs) for key in (keys or runs[0][part])}
    if "sanity" in runs[0]:
        numeric = [k for k, v in runs[0]["sanity"].items() if isinstance(v, float)]
        result["sanity"] = {key: sum(run["sanity"][key] for run in runs) / len(runs) for key in numeric}
    result["checks"] = _checks(result)
    result["checks_every_seed"] = {
        metric: {
            base_: None
            if any(run["checks"][metric][base_] is None for run in runs)
            else all(run["checks"][metric][base_] for run in runs)
            for base_ in BASELINES_TO_BEAT
        }
        for metric in runs[0]["checks"]
    }
    result["per_seed"] = per_seed
    first = runs[0]["setup"]
    result["setup"] = {
        **{k: v for k, v in first.items() if k not in ("seed", "eval_accuracy", "timings_s")},
        "eval_accuracy": [run["setup"]["eval_accuracy"] for run in runs],
        "total_s_per_seed": [round(sum(run["setup"]["timings_s"].values()), 1) for run in runs],
    }
    return _rounded(result)


def _checks(result: dict[str, Any]) -> dict[str, dict[str, bool | None]]:
    """Per headline metric, whether the method beats each baseline (``None`` where a value is missing)."""
    return {
        metric: {base: _beats(result["embedded"].get(metric), result[base].get(metric)) for base in BASELINES_TO_BEAT}
        for metric in HEADLINE_METRICS
        if metric in result["embedded"]
    }


def _embedded_backend(cfg: BenchmarkConfig) -> Backend:
    """The benchmark's backend: the offline pack on the CPU, without the text generator it does not use."""
    from lightning_neurons.backends import load_backend

    return load_backend("embedded", device="cpu", **{"generator": False, **cfg.backend_kwargs})


def _rounded(obj: Any, digits: int = 4) -> Any:
    """Round floats for a readable JSON (metrics are averages over a few hundred samples at most)."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: _rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rounded(v, digits) for v in obj]
    return obj


def _beats(method: float | None, baseline: float | None) -> bool | None:
    if method is None or baseline is None:
        return None
    return bool(method > baseline)


__all__ = [
    "BASELINES_TO_BEAT",
    "HEADLINE_METRICS",
    "METHODS",
    "BenchmarkConfig",
    "MemoEncoder",
    "accuracy",
    "run_benchmark",
    "run_benchmark_seeds",
    "train_classifier",
]
