"""The randomisation table: the share of each unit kind for trained and random-weight networks, per encoder.

Explains the same probe images with a trained network and the same architecture with random weights (the
benchmark's SmallCNN; the packaged ImageNet MobileNetV2), through the pipeline users run, with two real offline
image-text encoders (the embedded ConSE pack in its class-space form and classic text-space ConSE), and prints one
JSON object: per network and encoder the share of units of each ``UnitExplanation.kind`` for both networks, and
whether the random network stays at or below 10% "concept" while the trained one has more
(:mod:`lightning_neurons.benchmark.randomisation` documents the setup). Writes benchmarks/results/randomisation.json.

    HF_HUB_OFFLINE=1 python benchmarks/randomisation.py [--split held_out] [--networks smallcnn mobilenet_v2]
        [--encoders conse_classes conse_text] [--seed 0] [--threads 1] [-o out.json]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parent / "results" / "randomisation.json"


def main(argv: list[str] | None = None) -> int:
    from lightning_neurons.benchmark.randomisation import ENCODERS, NETWORKS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=["development", "held_out"], default="held_out")
    parser.add_argument("--networks", nargs="+", choices=list(NETWORKS), default=list(NETWORKS))
    parser.add_argument("--encoders", nargs="+", choices=list(ENCODERS), default=list(ENCODERS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--probe-per-class", type=int, default=16, help="probe crops per class")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("-o", "--output", default=str(RESULTS), help="JSON file to write (default: the results)")
    args = parser.parse_args(argv)

    import torch

    from lightning_neurons.benchmark.common import machine, save_json
    from lightning_neurons.benchmark.randomisation import RandomisationConfig, run_randomisation

    torch.set_num_threads(args.threads)
    config = RandomisationConfig(
        split=args.split,
        networks=tuple(args.networks),
        encoders=tuple(args.encoders),
        seed=args.seed,
        probe_per_class=args.probe_per_class,
    )
    out = run_randomisation(config)
    out["setup"]["machine"] = machine(args.threads)
    print(save_json(out, args.output))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
