"""Explanation-quality benchmark, offline: the embedded backend against random, constant and label baselines.

Trains a SmallCNN on PhotoPatches (12 classes of crops of real photos) on the CPU, explains its output layer
(final-layer protocol, class-name and general vocabularies) and a conv block (simulation, contrast, ablation)
with the embedded backend (MobileNetV2 ConSE + MiniLM), re-describes the same units with the three baselines,
scores everything on a held-out probe split, once per seed (data, weights, baselines; default 0 1 2), and prints
one JSON object: per method the mean of every metric over the seeds, whether the method beats the random and
constant baselines on the mean (``checks``) and on every seed (``checks_every_seed``), and each seed's own result.

    HF_HUB_OFFLINE=1 python benchmarks/quality.py [--seeds 0 1 2] [--epochs 6] [--correction control|soft_wpmi]
        [--ablation-measure probability|accuracy] [-o out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: BenchmarkConfig)")
    parser.add_argument("--correction", choices=["control", "soft_wpmi"], default=None, help="concept correction")
    parser.add_argument("--conv-layer", default=None, help="conv block for simulation/contrast/ablation")
    parser.add_argument(
        "--ablation-measure",
        choices=["probability", "accuracy"],
        default=None,
        help="hurt measure of the ablation check (default probability: drop of mean true-class probability)",
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of data, weights and baselines (default 0 1 2)"
    )
    parser.add_argument(
        "--conse-temperature", type=float, default=None, help="ConSE softmax temperature of the embedded backend"
    )
    parser.add_argument("-o", "--output", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)

    import torch

    from lightning_neurons.benchmark import BenchmarkConfig, run_benchmark_seeds

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    overrides = {
        "epochs": args.epochs,
        "correction": args.correction,
        "conv_layer": args.conv_layer,
        "ablation_measure": args.ablation_measure,
    }
    config = BenchmarkConfig(**{k: v for k, v in overrides.items() if v is not None})
    if args.conse_temperature is not None:
        config.backend_kwargs["temperature"] = args.conse_temperature
    start = time.perf_counter()
    result = run_benchmark_seeds(args.seeds, config=config)
    result["setup"]["total_s"] = round(time.perf_counter() - start, 1)
    text = json.dumps(result, indent=1)
    if args.output:
        Path(args.output).write_text(text)
    print(text)
    for key, where in (("checks", "on the mean over seeds"), ("checks_every_seed", "on every seed")):
        failed = [m for m, c in result[key].items() if not all(v for v in c.values() if v is not None)]
        if failed:
            print(f"embedded does not beat both baselines {where} on: {', '.join(failed)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
