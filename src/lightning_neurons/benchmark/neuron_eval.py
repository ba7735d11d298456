"""NeuronEval's sanity tests of explanation metrics, on this benchmark's units with known meaning.

NeuronEval (Oikarinen, Yan, Weng, ICML 2025) asks of a metric ``s(unit, concept)`` two necessary things, on units
whose meaning is known (a classifier's output unit ``j`` means class ``j``):

- missing labels: the true concept with a random part of its positives removed is a worse explanation, so the
  metric must score it lower than the true concept;
- extra labels: the true concept with random false positives added (a superset concept: about as many new
  positives as it had) is a worse explanation too, and must score lower.

Per unit and random draw the score change is divided by the metric's range (``[-1, 1]`` for correlation and
cosine, ``[0, 1]`` for AUPRC, F1, IoU and AUC; the observed range for MAD and soft-WPMI) and counts as a decrease
below ``-epsilon`` (NeuronEval's 0.001). A metric passes a test when at least ``pass_rate`` (0.9) of the
(unit, draw) pairs decrease.

The units: the output layer of the benchmark's SmallCNN (:func:`~lightning_neurons.benchmark.quality.train_classifier`)
trained on a split of the broad benchmark (real photos, textiles, rendered scenes), one classifier per seed. The
concepts, on a held-out probe of that split, in two forms:

- ``labels``: the ground-truth class labels, one-hot (NeuronEval's own setting);
- ``similarity``: the embedded encoder's image-text similarity of each probe image with each class name (what this
  project's score reads). Removing a positive replaces its similarity with that of a random negative image of the
  class, adding one replaces a negative's similarity with that of a random positive: on labels this is exactly
  NeuronEval's edit.

The metrics' free parameters (the active fraction ``alpha`` of the thresholded metrics) are chosen on the
development split, by NeuronEval's rule (how well the metric singles out each unit's own class, AUPRC over all
unit-class pairs), and the tests are reported on the held-out split.

Example:
    >>> out = run_neuron_eval(NeuronEvalConfig(seeds=(0,), draws=2))  # doctest: +SKIP
    >>> out["metrics"]["correlation"]["labels"]["missing_labels"]["pass"]  # doctest: +SKIP
    True
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_neurons.evaluation import candidate_metrics as M

ConceptSource = Literal["labels", "similarity"]
TestName = Literal["missing_labels", "extra_labels"]

#: The tests, in the order of the table.
TESTS: tuple[TestName, ...] = ("missing_labels", "extra_labels")

#: Concept forms the tests run on.
SOURCES: tuple[ConceptSource, ...] = ("labels", "similarity")

#: Active fractions tried for the thresholded metrics (chosen on the development split).
ALPHAS: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)


@dataclass(frozen=True)
class MetricSpec:
    """One candidate metric: how to call it and its range.

    Args:
        name: Table name.
        fn: ``fn(activations, concepts, alpha, source) -> [U, C]`` scores.
        value_range: ``(low, high)`` of the metric, or ``None`` for an unbounded metric (the observed range is used).
        tuned: Whether ``alpha`` matters (it is then chosen on the development split).
    """

    name: str
    fn: Callable[[Tensor, Tensor, float, ConceptSource, int], Tensor]
    value_range: tuple[float, float] | None
    tuned: bool


def _concept_kw(source: ConceptSource, n_classes: int) -> dict[str, Any]:
    # Labels are binary already; similarities are binarised at each concept's expected frequency.
    return (
        {"concept_threshold": 0.5}
        if source == "labels"
        else {"concept_threshold": None, "concept_alpha": 1 / n_classes}
    )


def _binary(concepts: Tensor, source: ConceptSource, n_classes: int) -> Tensor:
    kw = _concept_kw(source, n_classes)
    return M.binarize_concepts(concepts, kw["concept_threshold"], kw.get("concept_alpha", 0.1))


def pipeline_metrics() -> dict[str, MetricSpec]:
    """The explanation stage's own implementations (:mod:`lightning_neurons.explanation.metrics`, units first).

    Their AUC and AUPRC rank the samples by the unit's activation to find the concept's positives (NeuronEval's
    "inverse" direction); :func:`candidate_metrics` ranks by the concept to find the unit's active samples.

    Example:
        >>> sorted(pipeline_metrics())
        ['pipeline_auc', 'pipeline_auprc', 'pipeline_correlation', 'pipeline_cosine', 'pipeline_wpmi']
    """
    from lightning_neurons.explanation import metrics as P

    return {
        "pipeline_correlation": MetricSpec(
            "pipeline_correlation", lambda a, c, al, s, C: P.correlation(a.T, c), (-1.0, 1.0), False
        ),
        "pipeline_cosine": MetricSpec("pipeline_cosine", lambda a, c, al, s, C: P.cosine(a.T, c), (-1.0, 1.0), False),
        "pipeline_auprc": MetricSpec(
            "pipeline_auprc", lambda a, c, al, s, C: P.auprc(a.T, _binary(c, s, C)).nan_to_num(0.0), (0.0, 1.0), False
        ),
        "pipeline_auc": MetricSpec(
            "pipeline_auc", lambda a, c, al, s, C: P.auc(a.T, _binary(c, s, C)).nan_to_num(0.5), (0.0, 1.0), False
        ),
        "pipeline_wpmi": MetricSpec("pipeline_wpmi", lambda a, c, al, s, C: P.wpmi(a.T, c, fraction=al), None, True),
    }


def candidate_metrics(top_k: int = 8, reservoir: int = 48, *, pipeline: bool = True) -> dict[str, MetricSpec]:
    """Every metric of the table, by name: the reference implementations, then (``pipeline``) the pipeline's own.

    Args:
        top_k: Top samples of the top-and-random correlation (the recording's ``top_k``).
        reservoir: Uniform samples of the top-and-random correlation (the recording's reservoir).
        pipeline: Also the explanation stage's implementations (:func:`pipeline_metrics`).

    Example:
        >>> sorted(candidate_metrics(pipeline=False))[:4]
        ['auc', 'auprc', 'correlation', 'correlation_top_random']
    """
    return {
        **_reference_metrics(top_k, reservoir),
        **(pipeline_metrics() if pipeline else {}),
    }


def _reference_metrics(top_k: int, reservoir: int) -> dict[str, MetricSpec]:
    return {
        "correlation": MetricSpec("correlation", lambda a, c, al, s, C: M.correlation(a, c), (-1.0, 1.0), False),
        "correlation_top_random": MetricSpec(
            "correlation_top_random",
            lambda a, c, al, s, C: M.correlation_top_random(a, c, top_k=top_k, n_random=reservoir),
            (-1.0, 1.0),
            False,
        ),
        "cosine": MetricSpec("cosine", lambda a, c, al, s, C: M.cosine(a, c), (-1.0, 1.0), False),
        "auprc": MetricSpec("auprc", lambda a, c, al, s, C: M.auprc(a, c, alpha=al), (0.0, 1.0), True),
        "f1": MetricSpec("f1", lambda a, c, al, s, C: M.f1(a, c, alpha=al, **_concept_kw(s, C)), (0.0, 1.0), True),
        "iou": MetricSpec("iou", lambda a, c, al, s, C: M.iou(a, c, alpha=al, **_concept_kw(s, C)), (0.0, 1.0), True),
        "auc": MetricSpec("auc", lambda a, c, al, s, C: M.auc(a, c, alpha=al), (0.0, 1.0), True),
        "mad": MetricSpec("mad", lambda a, c, al, s, C: M.mad(a, c, **_concept_kw(s, C)), None, False),
        "soft_wpmi": MetricSpec(
            "soft_wpmi",
            lambda a, c, al, s, C: M.soft_wpmi(a, c, top_k=max(1, math.ceil(al * a.shape[0]))),
            None,
            True,
        ),
    }


@dataclass
class NeuronEvalConfig:
    """Settings of :func:`run_neuron_eval`.

    Args:
        seeds: One classifier (data, weights, draws) per seed; the tests pool their units.
        tune_split: Split on which ``alpha`` is chosen.
        report_split: Split on which the tests are reported.
        train_per_class: Training crops per class.
        eval_per_class: Probe crops per class (the tests' samples).
        epochs: Training epochs.
        draws: Random degradations per test.
        missing_fraction: Share of the positives removed by the missing-labels test (NeuronEval: 0.5).
        extra_fraction: False positives added by the extra-labels test, as a multiple of the positives (1.0: about
            doubles them, NeuronEval's choice).
        epsilon: Minimal normalised decrease (NeuronEval's 0.001).
        pass_rate: Share of (unit, draw) pairs that must decrease for a pass.
        activation: ``"logit"`` (what the recording sees on a linear head) or ``"softmax"`` (NeuronEval's choice
            for output layers).
        sources: Concept forms to test.
        metrics: Metric names to test (default: every candidate).
        top_k: Top samples of the top-and-random correlation.
        reservoir: Uniform samples of the top-and-random correlation.
        alphas: Active fractions tried on the tuning split.
        frequencies: Shares of the probe that a unit's class makes up in the tests: ``None`` is the whole probe
            (``1 / C``), a number subsamples the class per unit and draw (see :func:`sanity_test`). A metric passes
            a test when it passes at every frequency.
    """

    seeds: Sequence[int] = (0, 1, 2)
    tune_split: str = "development"
    report_split: str = "held_out"
    train_per_class: int = 48
    eval_per_class: int = 24
    epochs: int = 6
    draws: int = 20
    missing_fraction: float = 0.5
    extra_fraction: float = 1.0
    epsilon: float = 1e-3
    pass_rate: float = 0.9
    activation: Literal["logit", "softmax"] = "logit"
    sources: Sequence[ConceptSource] = SOURCES
    metrics: Sequence[str] | None = None
    top_k: int = 8
    reservoir: int = 48
    alphas: Sequence[float] = ALPHAS
    frequencies: Sequence[float | None] = (None, 0.02)


@dataclass
class KnownUnits:
    """A classifier's output units on a probe: activations, one-hot labels, class-name similarities.

    Args:
        activations: ``[N, C]``: unit ``j`` means class ``j``.
        labels: ``[N, C]`` one-hot ground truth (float).
        similarity: ``[N, C]`` image-text similarity of each probe image with each class name (``None`` when no
            encoder was given).
        classes: Class names.
        accuracy: The classifier's accuracy on the probe.
    """

    activations: Tensor
    labels: Tensor
    similarity: Tensor | None
    classes: list[str]
    accuracy: float

    def concepts(self, source: ConceptSource) -> Tensor:
        """The concept matrix of ``source``."""
        if source == "labels":
            return self.labels
        if self.similarity is None:
            raise ValueError("these units were read without an encoder: no similarity concepts")
        return self.similarity


def degrade(values: Tensor, positives: Tensor, test: TestName, fraction: float, generator: torch.Generator) -> Tensor:
    """A degraded copy of a concept matrix: positives removed (``missing_labels``) or false positives added.

    A removed positive takes the value of a random negative sample of the same concept; an added false positive
    (a negative chosen with probability ``fraction * positives / negatives``) takes the value of a random positive.
    On one-hot labels this sets 1 to 0 and 0 to 1, NeuronEval's edit.

    Args:
        values: ``[N, C]`` concept values (labels or similarities).
        positives: bool ``[N, C]``, the ground-truth members of each concept.
        test: ``"missing_labels"`` or ``"extra_labels"``.
        fraction: Share of positives removed, or added false positives per positive.
        generator: Random generator.

    Example:
        >>> labels = torch.tensor([[1.0], [1.0], [0.0], [0.0]])
        >>> out = degrade(labels, labels.bool(), "missing_labels", 1.0, torch.Generator().manual_seed(0))
        >>> out.squeeze(1).tolist()
        [0.0, 0.0, 0.0, 0.0]
    """
    if test not in TESTS:
        raise ValueError(f"unknown test {test!r}; choose from {list(TESTS)}")
    out = values.clone()
    n = values.shape[0]
    for c in range(values.shape[1]):
        pos = positives[:, c].nonzero().squeeze(1)
        neg = (~positives[:, c]).nonzero().squeeze(1)
        if len(pos) == 0 or len(neg) == 0:
            continue
        if test == "missing_labels":
            hit = pos[torch.rand(len(pos), generator=generator) < fraction]
            donors = neg
        else:
            p = min(1.0, fraction * len(pos) / max(1, n - len(pos)))
            hit = neg[torch.rand(len(neg), generator=generator) < p]
            donors = pos
        if len(hit):
            pick = donors[torch.randint(len(donors), (len(hit),), generator=generator)]
            out[hit, c] = values[pick, c]
    return out


def _subset(positives: Tensor, unit: int, frequency: float, generator: torch.Generator) -> Tensor:
    """Probe rows where class ``unit`` makes up ``frequency`` of the samples: every negative, a random few positives."""
    pos = positives[:, unit].nonzero().squeeze(1)
    neg = (~positives[:, unit]).nonzero().squeeze(1)
    keep = max(1, min(len(pos), round(frequency / (1 - frequency) * len(neg))))
    chosen = pos[torch.randperm(len(pos), generator=generator)[:keep]]
    return torch.cat([neg, chosen]).sort().values


def sanity_test(
    spec: MetricSpec,
    units: KnownUnits,
    source: ConceptSource,
    test: TestName,
    *,
    alpha: float,
    draws: int,
    fraction: float,
    epsilon: float,
    seed: int,
    frequency: float | None = None,
) -> dict[str, float]:
    """One metric, one concept form, one test, on one classifier's units: decreases and mean normalised change.

    Args:
        spec: The metric.
        units: The classifier's output units on the probe.
        source: Concept form.
        test: ``"missing_labels"`` or ``"extra_labels"``.
        alpha: Active fraction of a thresholded metric.
        draws: Random degradations.
        fraction: Strength of the degradation (see :func:`degrade`).
        epsilon: Minimal normalised decrease.
        seed: Seed of the draws.
        frequency: ``None``: every unit on the whole probe (its class is ``1 / C`` of it). A value: per unit and
            draw, the probe keeps every other class's sample and a random subset of the unit's class so that the
            class is that share of the probe (NeuronEval's rare concepts: AUC and MAD change little there).

    Returns:
        ``{"decrease_rate", "mean_change", "n"}`` (``n`` unit-draw pairs); ``"range"`` too for unbounded metrics.
    """
    concepts = units.concepts(source)
    positives = units.labels > 0.5
    n_classes = concepts.shape[1]
    gen = torch.Generator().manual_seed(seed)
    pairs: list[tuple[float, float]] = []  # (original, degraded) score of a unit's own class
    low, high = math.inf, -math.inf

    def score(rows: Tensor | None, values: Tensor) -> Tensor:
        nonlocal low, high
        acts = units.activations if rows is None else units.activations[rows]
        out = spec.fn(acts, values, alpha, source, n_classes)
        low, high = min(low, float(out.min())), max(high, float(out.max()))
        return out

    for _ in range(draws):
        if frequency is None:
            original = score(None, concepts).diagonal()
            degraded = score(None, degrade(concepts, positives, test, fraction, gen)).diagonal()
            pairs.extend(zip(original.tolist(), degraded.tolist()))
            continue
        for unit in range(n_classes):
            rows = _subset(positives, unit, frequency, gen)
            values, members = concepts[rows], positives[rows]
            original_u = float(score(rows, values)[unit, unit])
            degraded_u = float(score(rows, degrade(values, members, test, fraction, gen))[unit, unit])
            pairs.append((original_u, degraded_u))
    span = high - low if spec.value_range is None else spec.value_range[1] - spec.value_range[0]
    change = torch.tensor([(d - o) / max(span, 1e-12) for o, d in pairs])
    out = {
        "decrease_rate": float((change < -epsilon).float().mean()),
        "mean_change": float(change.mean()),
        "n": int(change.numel()),
    }
    if spec.value_range is None:
        out["range"] = span
    return out


def own_class_auprc(scores: Tensor) -> float:
    """NeuronEval's tuning criterion: AUPRC of all ``[U, C]`` scores at picking each unit's own class (``u == c``).

    Example:
        >>> own_class_auprc(torch.tensor([[0.9, 0.1], [0.2, 0.8]]))
        1.0
    """
    n = scores.shape[0]
    target = torch.eye(n, scores.shape[1]).flatten()[:, None]
    return float(M.auprc(target, scores.flatten()[:, None], alpha=target.mean().item()).squeeze())


def known_units(split: str, seed: int, cfg: NeuronEvalConfig, encoder: Any = None) -> KnownUnits:
    """Train the benchmark classifier on ``split`` and read its output units on a held-out probe of that split.

    ``encoder=None`` leaves the similarity concepts out (the labels need none).
    """
    from lightning_neurons.benchmark.quality import BenchmarkConfig, train_classifier
    from lightning_neurons.benchmark.scenes import SceneCrops, split_classes
    from lightning_neurons.demo.data import IMAGE_MEAN, IMAGE_STD
    from lightning_neurons.evaluation.probe import build_probe

    scenes = split_classes(split)
    bench = BenchmarkConfig(split=split, seed=seed, epochs=cfg.epochs, train_per_class=cfg.train_per_class)
    train_set = SceneCrops(scenes, cfg.train_per_class, bench.image_size, seed=seed)
    probe_set = SceneCrops(scenes, cfg.eval_per_class, bench.image_size, seed=seed + 2)
    model = train_classifier(bench, train_set)
    inputs = torch.stack([probe_set[i][0] for i in range(len(probe_set))])
    labels = torch.tensor([probe_set[i][1] for i in range(len(probe_set))])
    probe = build_probe(
        model, (inputs, labels), [bench.final_layer], encoder, image_mean=IMAGE_MEAN, image_std=IMAGE_STD
    )
    acts = probe.activations[bench.final_layer].float()
    sims = None
    if encoder is not None:
        assert probe.image_embeddings is not None
        text = torch.nn.functional.normalize(encoder.encode_texts(list(train_set.classes)).float(), dim=-1)
        sims = probe.image_embeddings.float() @ text.T
    if cfg.activation == "softmax":
        acts = acts.softmax(dim=1)
    onehot = torch.nn.functional.one_hot(labels, len(train_set.classes)).float()
    return KnownUnits(acts, onehot, sims, list(train_set.classes), float((acts.argmax(1) == labels).float().mean()))


def choose_alphas(
    specs: dict[str, MetricSpec], runs: Sequence[KnownUnits], cfg: NeuronEvalConfig
) -> dict[str, dict[str, float]]:
    """Per metric and concept form, the ``alpha`` with the best mean own-class AUPRC over ``runs`` (tuning split)."""
    chosen: dict[str, dict[str, float]] = {}
    for name, spec in specs.items():
        chosen[name] = {}
        for source in cfg.sources:
            if not spec.tuned:
                chosen[name][source] = float("nan")
                continue
            quality = {
                alpha: sum(
                    own_class_auprc(spec.fn(u.activations, u.concepts(source), alpha, source, u.labels.shape[1]))
                    for u in runs
                )
                for alpha in cfg.alphas
            }
            # Ties (a saturated criterion on a small, well-trained classifier) go to the alpha nearest the class
            # frequency: the thresholded metrics get their most natural cut-off.
            frequency = 1.0 / runs[0].labels.shape[1]
            chosen[name][source] = max(quality, key=lambda a: (round(quality[a], 9), -abs(math.log(a / frequency))))
    return chosen


def run_neuron_eval(config: NeuronEvalConfig | None = None, *, encoder: Any = None) -> dict[str, Any]:
    """Run NeuronEval's missing-labels and extra-labels tests for every candidate metric; one JSON-able dict.

    Args:
        config: Settings (default :class:`NeuronEvalConfig`).
        encoder: Image-text encoder of the similarity concepts (default: the embedded backend's).

    Returns:
        ``{"table": {metric: {source: {test: pass}}}, "metrics": {metric: {source: {"alpha", test: {"pass",
        "decrease_rate" (the lowest over the frequencies), "by_frequency": {frequency: {"decrease_rate",
        "mean_change", "n"}}}}}}, "setup": {...}}``.
    """
    cfg = config or NeuronEvalConfig()
    start = time.perf_counter()
    if encoder is None and "similarity" in cfg.sources:
        from lightning_neurons.backends import load_backend

        encoder = load_backend("embedded", device="cpu", generator=False).encoder
    specs = candidate_metrics(cfg.top_k, cfg.reservoir)
    if cfg.metrics is not None:
        unknown = sorted(set(cfg.metrics) - set(specs))
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; choose from {sorted(specs)}")
        specs = {k: v for k, v in specs.items() if k in cfg.metrics}
    tune_runs = [known_units(cfg.tune_split, s, cfg, encoder) for s in cfg.seeds]
    alphas = choose_alphas(specs, tune_runs, cfg)
    report_runs = (
        tune_runs
        if cfg.report_split == cfg.tune_split
        else [known_units(cfg.report_split, s, cfg, encoder) for s in cfg.seeds]
    )
    out: dict[str, Any] = {}
    for name, spec in specs.items():
        out[name] = {}
        for source in cfg.sources:
            alpha = alphas[name][source]
            row: dict[str, Any] = {"alpha": None if math.isnan(alpha) else alpha}
            for test in TESTS:
                fraction = cfg.missing_fraction if test == "missing_labels" else cfg.extra_fraction
                by_frequency: dict[str, dict[str, float]] = {}
                for frequency in cfg.frequencies:
                    parts = [
                        sanity_test(
                            spec,
                            units,
                            source,
                            test,
                            alpha=0.1 if math.isnan(alpha) else alpha,
                            draws=cfg.draws,
                            fraction=fraction,
                            epsilon=cfg.epsilon,
                            seed=1000 * seed + TESTS.index(test),
                            frequency=frequency,
                        )
                        for seed, units in zip(cfg.seeds, report_runs)
                    ]
                    n = sum(p["n"] for p in parts)
                    by_frequency["natural" if frequency is None else str(frequency)] = {
                        "decrease_rate": round(sum(p["decrease_rate"] * p["n"] for p in parts) / n, 4),
                        "mean_change": round(sum(p["mean_change"] * p["n"] for p in parts) / n, 5),
                        "n": n,
                    }
                row[test] = {
                    "pass": all(f["decrease_rate"] >= cfg.pass_rate for f in by_frequency.values()),
                    "decrease_rate": min(f["decrease_rate"] for f in by_frequency.values()),
                    "by_frequency": by_frequency,
                }
            out[name][source] = row
    table = {name: {s: {t: out[name][s][t]["pass"] for t in TESTS} for s in cfg.sources} for name in out}
    setup = {
        **{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()},
        "units": {
            split: sum(u.activations.shape[1] for u in runs)
            for split, runs in ((cfg.tune_split, tune_runs), (cfg.report_split, report_runs))
        },
        "probe_samples": report_runs[0].activations.shape[0],
        "probe_accuracy": [round(u.accuracy, 4) for u in report_runs],
        "encoder": None if encoder is None else getattr(encoder, "name", type(encoder).__name__),
        "seconds": round(time.perf_counter() - start, 1),
    }
    return {"table": table, "metrics": out, "setup": setup}


__all__ = [
    "ALPHAS",
    "SOURCES",
    "TESTS",
    "KnownUnits",
    "MetricSpec",
    "NeuronEvalConfig",
    "candidate_metrics",
    "choose_alphas",
    "degrade",
    "known_units",
    "own_class_auprc",
    "pipeline_metrics",
    "run_neuron_eval",
    "sanity_test",
]
