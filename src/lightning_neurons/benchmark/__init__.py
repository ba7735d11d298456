"""The offline quality benchmark: an experiment built on the library, not part of its API.

It trains small classifiers on bundled photos and rendered scenes, explains them with the embedded backend and
scores the explanations against baselines with :mod:`lightning_neurons.evaluation`. ``benchmarks/quality.py``
and ``lightning-neurons evaluate`` (without a run) call it.

- :mod:`~lightning_neurons.benchmark.quality`: :func:`run_benchmark` (one seed), :func:`run_benchmark_seeds`.

Example:
    >>> from lightning_neurons.benchmark import BenchmarkConfig, run_benchmark_seeds
    >>> out = run_benchmark_seeds([0], config=BenchmarkConfig(epochs=1))  # doctest: +SKIP
"""

from lightning_neurons.benchmark.quality import (
    BASELINES_TO_BEAT,
    HEADLINE_METRICS,
    METHODS,
    BenchmarkConfig,
    MemoEncoder,
    run_benchmark,
    run_benchmark_seeds,
)

__all__ = [
    "BASELINES_TO_BEAT",
    "HEADLINE_METRICS",
    "METHODS",
    "BenchmarkConfig",
    "MemoEncoder",
    "run_benchmark",
    "run_benchmark_seeds",
]
