"""The offline quality benchmark's package: its old import paths, its data splits, its encoder ceiling."""

from __future__ import annotations

import importlib
import sys

import pytest


def test_old_benchmark_paths_warn_and_serve_the_moved_names() -> None:
    import lightning_neurons.benchmark as benchmark
    import lightning_neurons.evaluation as evaluation

    with pytest.warns(DeprecationWarning, match="moved to lightning_neurons.benchmark"):
        assert evaluation.run_benchmark_seeds is benchmark.run_benchmark_seeds
    with pytest.warns(DeprecationWarning, match="moved to lightning_neurons.benchmark"):
        from lightning_neurons.evaluation import BenchmarkConfig
    assert BenchmarkConfig is benchmark.BenchmarkConfig
    sys.modules.pop("lightning_neurons.evaluation.benchmark", None)
    with pytest.warns(DeprecationWarning, match="moved to lightning_neurons.benchmark"):
        old = importlib.import_module("lightning_neurons.evaluation.benchmark")
    assert old.run_benchmark is benchmark.run_benchmark
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        evaluation.nothing  # noqa: B018
