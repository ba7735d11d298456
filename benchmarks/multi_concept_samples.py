"""Which samples the multi-concept stage fits and checks on: held-out simulation per choice, development split.

Runs the broad benchmark (``lightning_neurons.benchmark.run_benchmark``, randomisation check off) once per seed
and, for the conv block's round, refits the pipeline's combinations (``explanation.multi_concept.combine_units``)
on the round's own evidence with each choice of ``top_crops`` (``"fit"``: every top crop in the fit, the keep
decision on held-out reservoir images; ``"both"``: top crops split at random like the reservoir images;
``"none"``: reservoir images only) and margin, then scores each on the held-out probe as the benchmark's
``embedded_multi`` does. Prints one JSON line per seed.

    HF_HUB_OFFLINE=1 python benchmarks/multi_concept_samples.py [--seeds 0 1 2] [--split development]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: (name, ExplainConfig overrides, top_crops) of every variant.
VARIANTS = (
    ("fit", {}, "fit"),
    ("both", {}, "both"),
    ("none", {}, "none"),
    ("fit_margin0.02", {"combination_margin": 0.02}, "fit"),
    ("none_margin0.02", {"combination_margin": 0.02}, "none"),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--split", default="development", choices=["development", "held_out"])
    args = parser.parse_args(argv)

    import torch

    import lightning_neurons.benchmark.quality as quality
    import lightning_neurons.explanation.pipeline as pipeline
    from lightning_neurons.benchmark import BenchmarkConfig
    from lightning_neurons.explanation.multi_concept import combine_units

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    stash: dict[str, Any] = {}

    def capture(units: Any, evidence: Any, cfg: Any, **kwargs: Any) -> int:
        stash["last"] = (units, evidence, cfg, kwargs)  # the last explained round before scoring: the conv block
        return combine_units(units, evidence, cfg, **kwargs)

    score = quality.multi_concept_metrics
    results: dict[str, Any] = {}

    def variants(rnd: Any, layer: str, probe: Any, encoder: Any) -> dict[str, Any]:
        units, evidence, cfg, kwargs = stash["last"]
        for name, overrides, top_crops in VARIANTS:
            for u in units:
                u.combination = None
            combine_units(units, evidence, dataclasses.replace(cfg, **overrides), **{**kwargs, "top_crops": top_crops})
            metrics = score(rnd, layer, probe, encoder)
            results[name] = {k: round(metrics[k], 4) for k in ("simulation_single", "simulation", "kept")}
        for u in units:
            u.combination = None
        combine_units(units, evidence, cfg, **kwargs)
        return score(rnd, layer, probe, encoder)

    pipeline.combine_units = capture  # type: ignore[assignment]
    quality.multi_concept_metrics = variants  # type: ignore[assignment]
    for seed in args.seeds:
        quality.run_benchmark(config=BenchmarkConfig(split=args.split, seed=seed, randomisation_check=False))
        print(json.dumps({"split": args.split, "seed": seed, **results}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
