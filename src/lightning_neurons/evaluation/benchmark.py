"""Deprecated location of the offline quality benchmark: use :mod:`lightning_neurons.benchmark`.

The benchmark trains classifiers (an experiment, not library API), so it moved to its own subpackage. This
module re-exports it with a :class:`DeprecationWarning` for one release.

Example:
    >>> from lightning_neurons.benchmark import run_benchmark  # the new spelling
"""

from __future__ import annotations

import warnings

from lightning_neurons.benchmark.quality import (  # noqa: F401  (re-exported)
    BASELINES_TO_BEAT,
    HEADLINE_METRICS,
    METHODS,
    BenchmarkConfig,
    MemoEncoder,
    accuracy,
    run_benchmark,
    run_benchmark_seeds,
    train_classifier,
)

warnings.warn(
    "lightning_neurons.evaluation.benchmark moved to lightning_neurons.benchmark (it is an experiment, not library "
    "API); import run_benchmark, run_benchmark_seeds and BenchmarkConfig from there",
    DeprecationWarning,
    stacklevel=2,
)

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
