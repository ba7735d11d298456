"""Kinds of a trained and a random-weight MobileNetV2, and seed stability of descriptions and scores, offline.

Explains one MobileNetV2 block (default ``features.16``, 160 units) on crops of the broad benchmark's real photos
(both splits) with the embedded backend and the built-in general vocabulary, once with the packaged ImageNet weights
and once with random weights, each with several seeds (the seed draws the reservoir, the control crops, the
permutations and the folds). Prints one JSON object: per network the share of each kind (``UnitExplanation.kind``),
the mean score (correlation), and across seeds: the share of units of kind ``"concept"`` (at seed 0) whose
description is the same at every other seed, the share of units whose kind is the same, and the score's seed noise
(the standard deviation of a unit's score over seeds, mean and 95th percentile over units).

    HF_HUB_OFFLINE=1 python benchmarks/kinds_seeds.py [--layer features.16] [--seeds 0 1 2] [-o out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", default="features.16")
    parser.add_argument("--per-class", type=int, default=6, help="crops per benchmark class")
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--reservoir", type=int, default=128)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--selection", default=None, help="ExplainConfig.selection (default: its default)")
    parser.add_argument("--networks", nargs="+", default=["pretrained", "random"])
    parser.add_argument("-o", "--output", default=None)
    args = parser.parse_args(argv)

    import torch

    from lightning_neurons.benchmark.common import mobilenets, save_json, scene_probe
    from lightning_neurons.explanation.pipeline import explain_recording
    from lightning_neurons.explanation.settings import ExplainConfig
    from lightning_neurons.recording.recorder import collect_top_k
    from lightning_neurons.recording.samples import DataLoaderSampleSource
    from lightning_neurons.results import UNIT_KINDS

    torch.set_num_threads(1)  # the benchmark machines are shared
    probe = scene_probe(args.per_class)
    loader = probe.loader
    networks = mobilenets()
    selection = args.selection or ExplainConfig().selection
    result: dict = {"layer": args.layer, "images": len(probe.data), "seeds": args.seeds, "selection": selection}
    for name in args.networks:
        net = networks[name]
        rounds = []
        for seed in args.seeds:
            start = time.perf_counter()
            recording = collect_top_k(
                net, loader, [args.layer], args.top_k, reservoir_size=args.reservoir, seed=seed, show_progress=False
            )
            cfg = probe.config(seed=seed, selection=selection)
            source = DataLoaderSampleSource(loader)
            rnd = explain_recording(net, recording, source, probe.backend, probe.vocabulary, cfg)
            rounds.append((rnd.layer(args.layer), time.perf_counter() - start, rnd.meta["timings"]))
        first = rounds[0][0]
        n = len(first)
        kinds = {k: sum(u.kind == k for u in first) / n for k in UNIT_KINDS}
        concept = [i for i, u in enumerate(first) if u.kind == "concept"]
        same_desc = [all(r[0][i].description == first[i].description for r in rounds[1:]) for i in concept]
        same_kind = [all(r[0][i].kind == first[i].kind for r in rounds[1:]) for i in range(n)]
        scores = torch.tensor([[u.score for u in r[0]] for r in rounds], dtype=torch.float64)  # [seeds, units]
        live = ~torch.isnan(scores).any(0)
        std = scores[:, live].std(0) if len(rounds) > 1 else torch.zeros(1)
        same_all = [all(r[0][i].description == first[i].description for r in rounds[1:]) for i in range(n)]
        result[name] = {
            "units": n,
            "kinds_seed0": kinds,
            "kinds_per_seed": [{k: sum(u.kind == k for u in r[0]) / n for k in UNIT_KINDS} for r in rounds],
            "mean_score": float(scores[0, live].mean()),
            "concept_units_same_description": sum(same_desc) / len(same_desc) if same_desc else None,
            "all_units_same_description": sum(same_all) / n,
            "same_kind": sum(same_kind) / n,
            "score_seed_std_mean": float(std.mean()),
            "score_seed_std_p95": float(std.quantile(0.95)) if std.numel() > 1 else 0.0,
            "score_seed_std_max": float(std.max()),
            "seconds_per_round": [round(r[1], 1) for r in rounds],
            "timings_seed0": {k: round(v, 2) for k, v in rounds[0][2].items()},
            "examples": [(u.unit, u.kind, u.shown, round(u.score, 3), u.low_level) for u in first[:12]],
        }
        print(json.dumps({name: result[name]}, indent=1), flush=True)
    print(save_json(result, args.output))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
