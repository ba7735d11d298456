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


def build(device: str, quick: bool = False) -> dict:
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
    if quick:  # checks that the script runs; the figures mean nothing
        cfg.update(batch=16, size=32, n=32)
    return cfg


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="a tiny run that checks the script (no figures)")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs = 1
    cfg = build(args.device, args.quick)
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

    recorder = ActivationRecorder(model, cfg["layers"], top_k=args.top_k, reservoir_size=64)
    stored: dict[str, list[torch.Tensor]] = {}

    def store_hook(name: str):
        # What the published tools do: keep the [N, C] matrix of per-sample maxima, sort at the end.
        return lambda m, a, out: stored.setdefault(name, []).append(out.detach().flatten(2).amax(2).float())

    def forward_plain(x, y) -> None:
        model(x)

    def forward_recorded(x, y) -> None:
        with recorder:  # attach/detach cost (microseconds) is included, as the callback pays it per pass
            recorder.begin_batch(x.shape[0], y)
            model(x)

    def forward_store_all(x, y) -> None:
        handles = [modules[name].register_forward_hook(store_hook(name)) for name in cfg["layers"]]
        try:
            model(x)
        finally:
            for h in handles:
                h.remove()

    held = {"bytes": 0, "pending": 0}

    def finish_recorder() -> None:
        recorder.sync(lambda t: t)
        recorder.result(epoch=0)
        # What the recorder holds at the end of a pass (top-k buffers + reservoir); read here, before the next
        # pass's reset() empties it (reading it after the loops printed 0).
        held["bytes"] = max(held["bytes"], recorder.nbytes)
        held["pending"] = sum(
            (recorder.merge_rows + cfg["batch"]) * (b.num_units * 12 + 16) for b in recorder._buffers.values()
        )

    def finish_store_all() -> None:
        for name in cfg["layers"]:
            torch.cat(stored[name]).sort(dim=0, descending=True)

    steps = {"plain": forward_plain, "recorder": forward_recorded, "store_all": forward_store_all}
    finish = {"plain": lambda: None, "recorder": finish_recorder, "store_all": finish_store_all}

    def one_run(order: list[str], limit: int | None = None) -> dict[str, float]:
        # Interleaved batch by batch: machine-load drift hits the three variants alike.
        recorder.reset()
        stored.clear()
        spent = dict.fromkeys(order, 0.0)
        with torch.no_grad(), autocast():
            for x, y in batches[:limit]:
                for name in order:
                    sync()
                    start = time.perf_counter()
                    steps[name](x, y)
                    sync()
                    spent[name] += time.perf_counter() - start
            for name in order:
                start = time.perf_counter()
                finish[name]()
                sync()
                spent[name] += time.perf_counter() - start
        return spent

    one_run(list(steps), limit=2)  # warm-up (and torch.compile on CUDA)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for run in range(args.runs):
        order = list(steps)[run % 3 :] + list(steps)[: run % 3]  # rotate to cancel order effects
        for name, spent in one_run(order).items():
            times[name].append(spent)
    # The same passes as a validation loop runs them: no synchronisation between batches, so host-side work in the
    # hooks can overlap with the GPU (on a CPU this equals the interleaved measurement).
    pipelined: dict[str, list[float]] = {"plain": [], "recorder": []}
    for run in range(args.runs):
        for name in ("plain", "recorder") if run % 2 == 0 else ("recorder", "plain"):
            recorder.reset()
            with torch.no_grad(), autocast():
                sync()
                start = time.perf_counter()
                for x, y in batches:
                    steps[name](x, y)
                finish[name]()
                sync()
            pipelined[name].append(time.perf_counter() - start)
    ratios = [r / p for r, p in zip(times["recorder"], times["plain"])]
    store_ratios = [s / p for s, p in zip(times["store_all"], times["plain"])]
    n = len(batches) * cfg["batch"]
    store_bytes = sum(torch.cat(v).numel() * 4 for v in stored.values())
    pending_bound = held["pending"]
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
                "overhead_ratio_pipelined": round(
                    statistics.median(pipelined["recorder"]) / statistics.median(pipelined["plain"]), 4
                ),
                "plain_s_median": round(statistics.median(times["plain"]), 3),
                "recorder_s_median": round(statistics.median(times["recorder"]), 3),
                "store_all_s_median": round(statistics.median(times["store_all"]), 3),
                "recorder_bytes": held["bytes"],
                "recorder_bound_bytes": held["bytes"] + pending_bound,
                "store_all_bytes": store_bytes,
                "store_all_bytes_at_50k": store_bytes * 50_000 // n,
                "recorder_bytes_at_50k": held["bytes"],  # independent of the number of probe samples
            }
        )
    )


def _channels(module: nn.Module) -> int:
    last = [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))][-1]
    return last.num_features if isinstance(last, nn.BatchNorm2d) else last.out_channels


if __name__ == "__main__":
    main()
