"""Experiment harness for the confidence score and the frequency penalty (issue 14, "sanity and diversity").

Caches, per split and seed, a trained and a random-weight SmallCNN explained like the broad benchmark's conv block
(the pipeline's crop and control embeddings, the crop index, the concept embeddings and the held-out probe), then
re-scores only the score stage under several settings and prints one JSON object: per setting the trained and the
random network's mean confidence, the share of units above the threshold, distinct descriptions, top share and
the trained network's simulation on the held-out probe.

    HF_HUB_OFFLINE=1 python benchmarks/sanity_experiment.py --split development [--cache /tmp/sanity] [-o out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def _cache(split: str, seed: int, cache: Path) -> dict[str, Any]:
    path = cache / f"{split}_{seed}.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    from torch.utils.data import DataLoader

    from lightning_neurons.backends import load_backend
    from lightning_neurons.benchmark.quality import BenchmarkConfig, train_classifier
    from lightning_neurons.benchmark.scenes import SceneCrops, split_classes
    from lightning_neurons.concepts.vocabulary import Vocabulary
    from lightning_neurons.demo.data import IMAGE_MEAN, IMAGE_STD
    from lightning_neurons.evaluation.probe import build_probe
    from lightning_neurons.explanation.crops import embed_crops, find_regions
    from lightning_neurons.explanation.forward import RoundSamples, forward_samples
    from lightning_neurons.explanation.settings import ExplainConfig
    from lightning_neurons.explanation.units import concept_set
    from lightning_neurons.recording.recorder import collect_top_k
    from lightning_neurons.recording.samples import DataLoaderSampleSource

    cfg = BenchmarkConfig(split=split, seed=seed)
    scenes = split_classes(split)
    train_set, probe_set, eval_set = (
        SceneCrops(scenes, n, cfg.image_size, seed=seed + off)
        for n, off in ((cfg.train_per_class, 0), (cfg.probe_per_class, 1), (cfg.eval_per_class, 2))
    )
    backend = load_backend("embedded", device="cpu", generator=False)
    vocab = Vocabulary(
        ["general", "classes"], class_names=list(train_set.classes), exclude_general=backend.basis_concepts,
        show_progress=False,
    )
    explain_cfg = ExplainConfig(
        crop_size=cfg.crop_size, image_mean=IMAGE_MEAN, image_std=IMAGE_STD, seed=seed, show_progress=False,
        preview_units={},
    )
    loader = DataLoader(probe_set, batch_size=64)
    source = DataLoaderSampleSource(loader)
    concepts = concept_set(vocab, backend.encoder, 256)
    eval_inputs = torch.stack([eval_set[i][0] for i in range(len(eval_set))])
    eval_labels = torch.tensor([eval_set[i][1] for i in range(len(eval_set))])
    out: dict[str, Any] = {"texts": list(concepts.texts), "concepts": concepts.embeddings}
    for name, epochs in (("trained", cfg.epochs), ("random", 0)):
        model = train_classifier(dataclasses.replace(cfg, epochs=epochs), train_set)
        rec = collect_top_k(
            model, loader, [cfg.conv_layer], cfg.top_k, reservoir_size=cfg.reservoir_size, seed=seed,
            show_progress=False,
        )
        samples = RoundSamples.of(rec)
        forward = forward_samples(model, samples, source, explain_cfg, torch.device("cpu"))
        regions = find_regions(forward, {}, explain_cfg)
        crops = embed_crops(backend.encoder, forward, regions, explain_cfg, None)
        probe = build_probe(
            model, (eval_inputs, eval_labels), [cfg.conv_layer],
            backend.encoder if name == "trained" else None, image_mean=IMAGE_MEAN, image_std=IMAGE_STD,
        )
        out[name] = {
            "embeddings": crops.embeddings,
            "num_unique": crops.num_unique,
            "crop_index": regions.crop_index[cfg.conv_layer],
            "activations": probe.activations[cfg.conv_layer],
        }
        if name == "trained":
            out["probe_images"] = probe.image_embeddings
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


def _evaluate(data: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    from lightning_neurons.evaluation.simulation import simulation_scores
    from lightning_neurons.explanation.scoring import score_layer, similarity

    texts = data["texts"]
    settings = dict(settings)
    threshold = settings.pop("threshold", 0.85)
    result: dict[str, Any] = {}
    for name in ("trained", "random"):
        net = data[name]
        sims = similarity(net["embeddings"], data["concepts"])
        crop_sims, control_sims = sims[: net["num_unique"]], sims[net["num_unique"] :]
        res = score_layer(crop_sims, net["crop_index"], control_sims, "control", 4, **settings)
        desc = [texts[i] for i in res.top_indices[:, 0].tolist()]
        counts = Counter(desc)
        conf = res.confidence if res.confidence is not None else res.auc
        row = {
            "auc": float(res.auc.mean()),
            "confidence": float(conf.mean()),
            "above": float((conf > threshold).float().mean()),
            "above_at": {str(t): round(float((conf > t).float().mean()), 3) for t in (0.7, 0.8, 0.9, 0.95)},
            "quantiles": [round(float(q), 3) for q in conf.quantile(torch.tensor([0.5, 0.75, 0.9]))],
            "distinct": len(counts),
            "top_share": counts.most_common(1)[0][1] / len(desc),
            "top": counts.most_common(1)[0][0],
        }
        if name == "trained":
            emb = data["concepts"][res.top_indices[:, 0]]
            row["simulation"] = float(simulation_scores(net["activations"], data["probe_images"], emb).mean())
        result[name] = row
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="development")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--cache", default="/tmp/sanity_cache")
    parser.add_argument("--settings", default='[{}]', help="JSON list of score_layer option dicts")
    parser.add_argument("-o", "--output", default=None)
    args = parser.parse_args(argv)
    from lightning_neurons.benchmark.common import save_json

    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    for seed in args.seeds:
        data = _cache(args.split, seed, Path(args.cache))
        for settings in json.loads(args.settings):
            out.setdefault(json.dumps(settings), {})[seed] = _evaluate(data, settings)
    print(save_json({"split": args.split, "results": out}, args.output))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
