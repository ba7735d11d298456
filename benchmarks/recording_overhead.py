"""Recording overhead of NeuronExplainer's recorder vs plain validation vs a store-everything baseline.

Prints one JSON object. CPU (default): torchvision ResNet-18 (random weights), 512 images of 112x112, batch 64,
layer1..layer4 (960 units) at top_k=32. ``--device cuda``: ResNet-50, bf16 autocast, channels_last, batch 256,
conv1 + layer1..layer4 (3,904 units).

The recorder is driven exactly as the callback drives it (``begin_batch`` per batch with the labels, the forward
hooks, then ``sync`` and ``result`` at validation end), so its time is the callback's recording cost without the
Trainer's own per-batch overhead, which is the same with and without the callback.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torchvision
from torch import nn

from lightning_neurons.recording.recorder import ActivationRecorder


def build(device: str) -> dict:
    if device == "cuda":
        cfg = {
            "arch": "resnet50",
            "layers": ["conv1", "layer1", "layer2", "layer3", "layer4"],
            "batch": 256,
            "size": 224,
            "n": 256 * 12,
            "bf16": True,
            "channels_last": True,
        }
    else:
        cfg = {
            "arch": "resnet18",
            "layers": ["layer1", "layer2", "layer3", "layer4"],
            "batch": 64,
            "size": 112,
            "n": 512,
            "bf16": False,
            "channels_last": False,
        }
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--top-k", type=int, default=32)
    args = parser.parse_args()
    cfg = build(args.device)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = getattr(torchvision.models, cfg["arch"])(weights=None).eval().to(device)
    memory_format = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    g = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(cfg["batch"], 3, cfg["size"], cfg["size"], generator=g).to(device, memory_format=memory_format),
            torch.randint(0, 1000, (cfg["batch"],), generator=g).to(device),
        )
        for _ in range(cfg["n"] // cfg["batch"])
    ]
    modules = dict(model.named_modules())
    units = sum(_channels(modules[name]) for name in cfg["layers"])

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg["bf16"])

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def plain() -> None:
        with torch.no_grad(), autocast():
            for x, _ in batches:
                model(x)
        sync()

    recorder = ActivationRecorder(model, cfg["layers"], top_k=args.top_k, reservoir_size=64)

    def record() -> None:
        recorder.reset()
        with recorder, torch.no_grad(), autocast():
            for x, y in batches:
                recorder.begin_batch(x.shape[0], y)
                model(x)
            recorder.sync(lambda t: t)
        recorder.result(epoch=0)
        sync()

    stored: dict[str, list[torch.Tensor]] = {}

    def store_all() -> None:
        # What the published tools do: keep the [N, C] matrix of per-sample maxima, sort at the end.
        stored.clear()
        handles = [
            modules[name].register_forward_hook(
                lambda m, a, out, name=name: stored.setdefault(name, []).append(out.detach().flatten(2).amax(2).float())
            )
            for name in cfg["layers"]
        ]
        try:
            with torch.no_grad(), autocast():
                for x, _ in batches:
                    model(x)
            for name in cfg["layers"]:
                torch.cat(stored[name]).sort(dim=0, descending=True)
            sync()
        finally:
            for h in handles:
                h.remove()

    fns = {"plain": plain, "recorder": record, "store_all": store_all}
    for fn in fns.values():  # warm-up (and torch.compile on CUDA)
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.runs):
        for name, fn in fns.items():  # interleaved so that drift in machine speed hits all three alike
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    ratios = [r / p for r, p in zip(times["recorder"], times["plain"])]
    store_ratios = [s / p for s, p in zip(times["store_all"], times["plain"])]
    n = len(batches) * cfg["batch"]
    store_bytes = sum(torch.cat(v).numel() * 4 for v in stored.values())
    pending_bound = sum(
        (recorder.merge_rows + cfg["batch"]) * (b.num_units * 12 + 16) for b in recorder._buffers.values()
    )
    print(
        json.dumps(
            {
                "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(),
                "model": cfg["arch"],
                "layers": cfg["layers"],
                "units": units,
                "top_k": args.top_k,
                "num_images": n,
                "image_size": cfg["size"],
                "batch_size": cfg["batch"],
                "bf16_autocast": cfg["bf16"],
                "channels_last": cfg["channels_last"],
                "torch_threads": torch.get_num_threads(),
                "runs": args.runs,
                "overhead_ratio": round(statistics.median(ratios), 4),
                "overhead_ratios": [round(r, 4) for r in ratios],
                "store_all_ratio": round(statistics.median(store_ratios), 4),
                "plain_s_median": round(statistics.median(times["plain"]), 3),
                "recorder_s_median": round(statistics.median(times["recorder"]), 3),
                "store_all_s_median": round(statistics.median(times["store_all"]), 3),
                "recorder_bytes": recorder.nbytes,
                "recorder_bound_bytes": recorder.nbytes + pending_bound,
                "store_all_bytes": store_bytes,
                "store_all_bytes_at_50k": store_bytes * 50_000 // n,
                "recorder_bytes_at_50k": recorder.nbytes,
            }
        )
    )


def _channels(module: nn.Module) -> int:
    last = [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))][-1]
    return last.num_features if isinstance(last, nn.BatchNorm2d) else last.out_channels


if __name__ == "__main__":
    main()
