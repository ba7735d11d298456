"""Explanation quality: the metrics the published methods report, with baselines that show what they are worth.

- Final-layer protocol (CLIP-Dissect): :func:`final_layer_accuracy`, :func:`final_layer_similarity`,
  :func:`final_layer_class_rank`.
- Simulation (Linear Explanations): :func:`simulation_scores`.
- Contrast (CoSy's AUC and MAD, concept images retrieved from a held-out probe): :func:`contrast_scores`.
- Ablation check (the paper's): :func:`ablation_drops`, :func:`ablation_agreement`.
- NeuronEval's candidate metrics (samples-first reference implementations): :mod:`.candidate_metrics`.
- Baselines: :func:`random_baseline`, :func:`constant_baseline`, :func:`label_baseline`.
- All of it on one round: :func:`evaluate_round`; TensorBoard: :func:`log_evaluation`.
- The published protocols on your own model and ImageFolder: :func:`run_protocol`.
- The offline benchmark behind ``lightning-neurons evaluate`` and ``benchmarks/quality.py`` moved to
  :mod:`lightning_neurons.benchmark` (the old names here still work, with a DeprecationWarning).

Example:
    >>> from lightning_neurons.evaluation import evaluate_round, log_evaluation
    >>> metrics = evaluate_round(model, rnd, (images, labels), backend, class_names=names)  # doctest: +SKIP
    >>> log_evaluation(trainer.logger.experiment, {"embedded": metrics}, epoch=trainer.current_epoch)  # doctest: +SKIP
"""

from typing import Any

from lightning_neurons.evaluation.ablation_check import AblationAgreement, ablation_agreement, ablation_drops
from lightning_neurons.evaluation.baselines import (
    constant_baseline,
    generic_concepts,
    label_baseline,
    random_baseline,
)
from lightning_neurons.evaluation.contrast import ContrastResult, contrast_scores
from lightning_neurons.evaluation.final_layer import (
    embed_texts,
    final_layer_accuracy,
    final_layer_class_rank,
    final_layer_similarity,
    text_similarity,
)
from lightning_neurons.evaluation.harness import (
    EvaluationConfig,
    evaluate_round,
    explained_sample_ids,
    flatten_metrics,
    log_evaluation,
    probe_for,
)
from lightning_neurons.evaluation.probe import Probe, build_probe, held_out_probe, layer_activations
from lightning_neurons.evaluation.protocols import run_protocol
from lightning_neurons.evaluation.simulation import simulation_scores
from lightning_neurons.evaluation.stats import auc, mad, pearson

_MOVED_TO_BENCHMARK = ("HEADLINE_METRICS", "BenchmarkConfig", "run_benchmark", "run_benchmark_seeds")


def __getattr__(name: str) -> Any:
    """The benchmark's old names, served from :mod:`lightning_neurons.benchmark` with a DeprecationWarning."""
    if name in _MOVED_TO_BENCHMARK:
        import warnings

        from lightning_neurons.benchmark import quality

        warnings.warn(
            f"lightning_neurons.evaluation.{name} moved to lightning_neurons.benchmark.{name}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(quality, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AblationAgreement",
    "ContrastResult",
    "EvaluationConfig",
    "Probe",
    "ablation_agreement",
    "ablation_drops",
    "auc",
    "build_probe",
    "constant_baseline",
    "contrast_scores",
    "evaluate_round",
    "explained_sample_ids",
    "final_layer_accuracy",
    "final_layer_class_rank",
    "final_layer_similarity",
    "flatten_metrics",
    "generic_concepts",
    "held_out_probe",
    "label_baseline",
    "layer_activations",
    "log_evaluation",
    "probe_for",
    "mad",
    "pearson",
    "random_baseline",
    "run_protocol",
    "simulation_scores",
    "embed_texts",
    "text_similarity",
]
