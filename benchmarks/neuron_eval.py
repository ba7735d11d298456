"""NeuronEval's missing-labels and extra-labels tests of every candidate explanation metric, on known units.

The units are the output units of the benchmark's SmallCNN (unit ``j`` means class ``j``), trained per seed on a split
of the broad benchmark (real photos, textiles, rendered scenes); the concepts are the ground-truth labels
(NeuronEval's setting) and the embedded encoder's image-text similarity of the class names (what this project's
score reads), on a held-out probe. Thresholds are chosen on the development split; the tests are reported on the
held-out split (:mod:`lightning_neurons.benchmark.neuron_eval` documents the protocol). Prints one JSON object and
writes benchmarks/results/neuron_eval.json.

    HF_HUB_OFFLINE=1 python benchmarks/neuron_eval.py [--seeds 0 1 2] [--draws 20] [--threads 1]
        [--activation logit|softmax] [--frequencies natural 0.02] [--sources labels similarity]
        [--metrics correlation ...] [--top-k 8] [--reservoir 48] [-o out.json]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parent / "results" / "neuron_eval.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="classifiers (default 0 1 2)")
    parser.add_argument("--draws", type=int, default=20, help="random degradations per test (default 20)")
    parser.add_argument("--epochs", type=int, default=6, help="training epochs of each classifier")
    parser.add_argument("--eval-per-class", type=int, default=24, help="probe crops per class")
    parser.add_argument("--activation", choices=["logit", "softmax"], default="logit", help="unit values")
    parser.add_argument(
        "--frequencies",
        nargs="+",
        default=["natural", "0.02"],
        help="share of the probe a unit's class makes up ('natural' = the whole probe, 1/C)",
    )
    parser.add_argument("--sources", nargs="+", choices=["labels", "similarity"], default=["labels", "similarity"])
    parser.add_argument("--metrics", nargs="+", default=None, help="metric names (default: every candidate)")
    parser.add_argument("--top-k", type=int, default=8, help="top samples of the top-and-random correlation")
    parser.add_argument("--reservoir", type=int, default=48, help="uniform samples of the top-and-random correlation")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("-o", "--output", default=str(RESULTS), help="JSON file to write (default: the results)")
    args = parser.parse_args(argv)

    import torch

    from lightning_neurons.benchmark.common import machine, save_json
    from lightning_neurons.benchmark.neuron_eval import NeuronEvalConfig, run_neuron_eval

    torch.set_num_threads(args.threads)
    config = NeuronEvalConfig(
        seeds=tuple(args.seeds),
        draws=args.draws,
        epochs=args.epochs,
        eval_per_class=args.eval_per_class,
        activation=args.activation,
        sources=tuple(args.sources),
        metrics=None if args.metrics is None else tuple(args.metrics),
        top_k=args.top_k,
        reservoir=args.reservoir,
        frequencies=tuple(None if f == "natural" else float(f) for f in args.frequencies),
    )
    out = run_neuron_eval(config)
    out["setup"]["machine"] = machine(args.threads)
    print(save_json(out, args.output))
    print(_table(out), file=sys.stderr)
    return 0


def _table(out: dict) -> str:
    """A Markdown table: per metric and concept form, each test's pass/fail with its lowest decrease rate."""
    sources = list(next(iter(out["metrics"].values())))
    head = "| metric | " + " | ".join(f"{s}: missing | {s}: extra" for s in sources) + " |"
    lines = [head, "|" + " --- |" * (1 + 2 * len(sources))]
    for name, row in out["metrics"].items():
        cells = []
        for s in sources:
            for test in ("missing_labels", "extra_labels"):
                r = row[s][test]
                cells.append(f"{'pass' if r['pass'] else 'FAIL'} ({r['decrease_rate']:.2f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
