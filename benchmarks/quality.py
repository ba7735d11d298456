"""Explanation-quality benchmark, offline: the embedded backend against random, constant and label baselines.

Per split of the broad benchmark (``development``: the defaults were chosen on it; ``held_out``: other photos,
textiles and rendered scenes, each class with a one-word name and a phrase; ``photo12``: the original 12-photo
benchmark), trains a SmallCNN on crops of that split's images on the CPU, explains its output layer
(final-layer protocol, class-name and general vocabularies) and a conv block (simulation, contrast, ablation)
with the embedded backend (MobileNetV2 ConSE + MiniLM), re-describes the same units with the three baselines,
scores everything on a held-out probe split, once per seed (data, weights, baselines; default 0 1 2), and prints
one JSON object: per method the mean of every metric over the seeds, whether the method beats the random and
constant baselines on the mean (``checks``) and on every seed (``checks_every_seed``), and each seed's own result.
It also prints, per split, a table: the method with single and multi-concept explanations, the encoder's
per-crop zero-shot accuracy (the ceiling of every method), the baselines, and the model-randomisation check.

    HF_HUB_OFFLINE=1 python benchmarks/quality.py [--splits development held_out] [--seeds 0 1 2] [--epochs 6]
        [--threads N] [--image-size PX] [--encoder-image-size PX] [--encoder-precision auto|float32|bfloat16]
        [--correction control|soft_wpmi]
        [--ablation-measure probability|accuracy] [--previous-defaults] [--quick] [-o out.json]

``--quick`` is the check people run often (under 5 minutes on 2 CPU cores): the development split, seed 0, a
smaller network trained 3 epochs on fewer crops (``QUICK``); ``--splits``/``--seeds``/``--epochs`` still override
it. Its figures are noisier than the full run's and are not the README's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: BenchmarkConfig fields of ``--quick`` (with the development split and seed 0).
QUICK = {"epochs": 3, "train_per_class": 24, "probe_per_class": 8, "eval_per_class": 8, "reservoir_size": 24}


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
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="seeds of data, weights and baselines (default 0 1 2; 0 with --quick)",
    )
    parser.add_argument(
        "--conse-temperature", type=float, default=None, help="ConSE softmax temperature of the embedded backend"
    )
    parser.add_argument(
        "--image-size", type=int, default=None, help="side of the benchmark's images (default: BenchmarkConfig, 64)"
    )
    parser.add_argument(
        "--encoder-image-size",
        type=int,
        default=None,
        help="side the embedded backend resizes crops to (default: its own, 224)",
    )
    parser.add_argument(
        "--crop-size",
        type=lambda v: None if v == "encoder" else int(v),
        default=96,
        help="side the crops are cut at (default 96; 'encoder': the encoder's own side, as the callback cuts them)",
    )
    parser.add_argument(
        "--dedupe-iou",
        type=float,
        default=None,
        help="boxes of a sample overlapping more than this become one crop (default: ExplainConfig's)",
    )
    parser.add_argument(
        "--encoder-precision",
        choices=["auto", "float32", "bfloat16"],
        default=None,
        help="number format of the embedded backend's classifier (default: its own, auto)",
    )
    parser.add_argument(
        "--splits",
        nargs="+",
        choices=["development", "held_out", "photo12"],
        default=None,
        help="benchmark splits (default: development held_out; development with --quick)",
    )
    parser.add_argument(
        "--previous-defaults",
        action="store_true",
        help="the embedded backend with the defaults before the broad benchmark (bare texts, template_weight=0)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: up to 4; 1 when splits run side by side)"
    )
    parser.add_argument("--quick", action="store_true", help="a reduced run for frequent checks (< 5 min, 2 cores)")
    parser.add_argument("-o", "--output", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.splits is None:
        args.splits = ["development"] if args.quick else ["development", "held_out"]
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1, 2]

    import torch

    from lightning_neurons.benchmark import BenchmarkConfig, run_benchmark_seeds

    torch.set_num_threads(args.threads or max(1, min(4, os.cpu_count() or 1)))
    overrides = {
        **(QUICK if args.quick else {}),
        "epochs": args.epochs if args.epochs is not None else (QUICK["epochs"] if args.quick else None),
        "correction": args.correction,
        "conv_layer": args.conv_layer,
        "ablation_measure": args.ablation_measure,
        "image_size": args.image_size,
        "dedupe_iou": args.dedupe_iou,
    }
    backend_kwargs = {"template_weight": 0.0} if args.previous_defaults else {}
    if args.conse_temperature is not None:
        backend_kwargs["temperature"] = args.conse_temperature
    if args.encoder_image_size is not None:
        backend_kwargs["image_size"] = args.encoder_image_size
    if args.encoder_precision is not None:
        backend_kwargs["precision"] = args.encoder_precision
    start = time.perf_counter()
    result: dict = {}
    for split in args.splits:
        config = BenchmarkConfig(
            split=None if split == "photo12" else split,
            backend_kwargs=dict(backend_kwargs),
            crop_size=args.crop_size,  # passed even as None: that means the encoder's own side
            **{k: v for k, v in overrides.items() if v is not None},
        )
        result[split] = run_benchmark_seeds(args.seeds, config=config)
    result["total_s"] = round(time.perf_counter() - start, 1)
    result["quick"] = bool(args.quick)
    text = json.dumps(result, indent=1)
    if args.output:
        Path(args.output).write_text(text)
    print(text)
    for split in args.splits:
        print("\n".join(summary_table(split, result[split])), file=sys.stderr)  # stdout holds the JSON alone
        for key, where in (("checks", "on the mean over seeds"), ("checks_every_seed", "on every seed")):
            failed = [m for m, c in result[split][key].items() if not all(v for v in c.values() if v is not None)]
            if failed:
                print(
                    f"{split}: embedded does not beat both baselines {where} on: {', '.join(failed)}", file=sys.stderr
                )
    return 0


COLUMNS = (
    "final_top1",
    "final_phrase_top1",
    "final_class_similarity",
    "simulation",
    "contrast_auc",
    "ablation_hit_rate",
)


def summary_table(split: str, out: dict) -> list[str]:
    """A Markdown table of one split: method rows (single and multi-concept), the encoder ceiling, the baselines."""

    def cell(value: object) -> str:
        return f"{value:.3f}" if isinstance(value, float) else "-"

    lines = [f"\n{split} (mean over seeds {out['seeds']}):", "| method | " + " | ".join(COLUMNS) + " |"]
    lines.append("| --- " * (len(COLUMNS) + 1) + "|")
    multi = dict(out["embedded"], simulation=out["embedded_multi"]["simulation"])
    rows = {"embedded": out["embedded"], "embedded, multi-concept": multi}
    rows.update({method: out[method] for method in ("random", "constant", "label")})
    for name, metrics in rows.items():
        lines.append(f"| {name} | " + " | ".join(cell(metrics.get(c)) for c in COLUMNS) + " |")
    ceiling = out["encoder_ceiling"]
    lines.append(
        f"encoder per-crop zero-shot accuracy (ceiling): names {ceiling['names']:.3f}"
        + (f", phrases {ceiling['phrases']:.3f}" if "phrases" in ceiling else "")
        + f"; multi-concept combinations kept for {out['embedded_multi']['kept']:.0%} of the units"
    )
    sanity = out["sanity"]
    confidence = (
        f"; confidence trained {sanity['trained_confidence']:.3f} / random {sanity['random_confidence']:.3f} "
        f"(0.5 = chance), above the threshold ({sanity['threshold']:.2f}): trained {sanity['trained_confident']:.0%}"
        f" / random {sanity['random_confident']:.0%}"
        if sanity["threshold"] == sanity["threshold"]  # not NaN: a confidence threshold was set
        else ""
    )
    lines.append(
        f"randomisation check: concept units trained {sanity['trained_concept_share']:.0%} / random weights "
        f"{sanity['random_concept_share']:.0%}; explanation score trained {sanity['trained_score']:.3f} / random "
        f"{sanity['random_score']:.3f}; held-out simulation {sanity['trained_simulation']:.3f} / "
        f"{sanity['random_simulation']:.3f}{confidence}; distinct descriptions / top share, trained "
        f"{sanity['trained_distinct']:.0f} / {sanity['trained_top_share']:.0%}, random "
        f"{sanity['random_distinct']:.0f} / {sanity['random_top_share']:.0%}"
        + (
            f" (without the frequency penalty: trained {sanity['trained_distinct_unpenalised']:.0f} / "
            f"{sanity['trained_top_share_unpenalised']:.0%}, random {sanity['random_distinct_unpenalised']:.0f} / "
            f"{sanity['random_top_share_unpenalised']:.0%})"
            if "trained_distinct_unpenalised" in sanity
            else ""
        )
    )
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
