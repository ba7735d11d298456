"""Description diversity and the randomisation check on pretrained MobileNetV2, offline.

Explains the units of one MobileNetV2 block (default ``features.14``, 160 units) on crops of the broad benchmark's
images (both splits), once with the packaged ImageNet weights and once with random weights, with the embedded
backend and the built-in general vocabulary, with and without the frequency penalty
(``ExplainConfig.frequency_penalty``; the crops are embedded once), and prints one JSON object: per network and
setting the number of distinct descriptions, the share and text of the most frequent one, the mean explanation
score (AUC), the mean confidence
(``UnitExplanation.confidence``, 0.5 = chance) and the share of units above the default confidence threshold (the
others are shown as "no clear concept").

    HF_HUB_OFFLINE=1 python benchmarks/quality_diversity.py [--layer features.14] [--per-class 4]
        [--frequency-penalty 0.5] [-o out.json]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", default="features.14")
    parser.add_argument("--per-class", type=int, default=4, help="crops per benchmark class")
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--frequency-penalty", type=float, default=None, help="default: ExplainConfig's")
    parser.add_argument("-o", "--output", default=None)
    args = parser.parse_args(argv)

    import dataclasses

    import torch

    from lightning_neurons.benchmark.common import mobilenets, save_json, scene_probe
    from lightning_neurons.benchmark.quality import description_diversity
    from lightning_neurons.explanation.pipeline import explain_recording
    from lightning_neurons.recording.recorder import collect_top_k
    from lightning_neurons.recording.samples import DataLoaderSampleSource

    torch.set_num_threads(1)  # the benchmark machines are shared
    probe = scene_probe(args.per_class)
    loader, backend, vocabulary = probe.loader, probe.backend, probe.vocabulary
    cfg = probe.config(confidence_samples=256)  # the deprecated confidence this script reports (its old default)
    if args.frequency_penalty is not None:
        cfg = dataclasses.replace(cfg, frequency_penalty=args.frequency_penalty)
    threshold = cfg.confidence_threshold
    networks = mobilenets()
    result: dict = {
        "layer": args.layer,
        "images": len(probe.data),
        "confidence_threshold": threshold,
        "frequency_penalty": cfg.frequency_penalty,
    }
    for name, net in networks.items():
        recording = collect_top_k(net, loader, [args.layer], args.top_k, reservoir_size=48, show_progress=False)
        for setting, explain_cfg in (("", cfg), ("_unpenalised", dataclasses.replace(cfg, frequency_penalty=0.0))):
            rnd = explain_recording(net, recording, DataLoaderSampleSource(loader), backend, vocabulary, explain_cfg)
            units = rnd.layer(args.layer)
            conf = torch.tensor([u.confidence for u in units], dtype=torch.float32)
            result[name + setting] = {
                **description_diversity(units),
                "mean_score": sum(u.score for u in units) / len(units),
                "mean_confidence": float(conf.mean()),
                "above_threshold": float((conf > threshold).float().mean()),
            }
    print(save_json(result, args.output))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
