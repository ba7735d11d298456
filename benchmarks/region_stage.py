"""Region stage before/after, side by side in one run: boxes, dedupe and crops of many (unit, sample) pairs.

Prints ONE JSON object on stdout. The "before" code is ``src/lightning_neurons/regions.py`` of a git revision
(``--baseline``, default the commit before the run-graph components), loaded from ``git show`` into its own
module; the "after" code is the installed package. Both run on the same maps, alternately, ``--repeats`` times
(the minimum is reported, which is what matters on a shared machine), and the outputs are compared.

Maps: a random-weight ResNet-18 on synthetic probe images (``explain_throughput.synthetic_probe``), every stage
(conv1 112 px, layer1 56, layer2 28, layer3 14, layer4 7), each unit's top ``--top-k`` samples; 64 images and
top_k=8 give 8,192 pairs, the setting of the CPU profile in issue 15.

    python benchmarks/region_stage.py                     # CPU, about 2 minutes on 2 busy cores
    python benchmarks/region_stage.py --device cuda       # no baseline on CUDA unless --baseline is given
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torchvision
import torchvision.ops.boxes as tv_boxes

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from explain_throughput import synthetic_probe  # noqa: E402

from lightning_neurons import regions as after  # noqa: E402

STAGES = ("conv1", "layer1", "layer2", "layer3", "layer4")
BASELINE = "25227c9"  # main before the run-graph components and the vectorised dedupe


def load_baseline(rev: str) -> ModuleType:
    """``regions.py`` of git revision ``rev`` as a module of its own."""
    source = subprocess.run(
        ["git", "show", f"{rev}:src/lightning_neurons/regions.py"],
        cwd=HERE.parent,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "regions_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("regions_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_pairs(images: int, top_k: int, device: torch.device) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], Any]:
    """Per layer ``(maps [U*k, h, w], thresholds [U*k])`` and the sample index of every pair, plus the images."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval().to(device)
    probe = synthetic_probe(images, 224, device)
    feats: dict[str, torch.Tensor] = {}
    for name in STAGES:
        getattr(model, name).register_forward_hook(lambda m, i, o, n=name: feats.__setitem__(n, o.detach()))
    with torch.no_grad():
        model(probe)
    layers, samples = [], []
    for name in STAGES:
        f = feats[name]
        top = f.flatten(2).amax(2).topk(top_k, dim=0).indices.T  # [U, k] samples
        maps = f.permute(1, 0, 2, 3)[torch.arange(f.shape[1], device=device)[:, None], top]  # [U, k, h, w]
        thr = after.unit_thresholds(maps, None, 0.995)
        layers.append((maps.reshape(-1, *maps.shape[2:]).contiguous(), thr.repeat_interleave(top_k)))
        samples.append(top.reshape(-1))
    images_01 = after.images_from_inputs(probe, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    return layers, (torch.cat(samples), images_01)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_stage(mod: ModuleType, layers: list, samples: torch.Tensor, images: torch.Tensor, args: Any) -> dict:
    """The pipeline's region step (boxes per layer, dedupe over all pairs), then the crops of the unique boxes."""
    device = images.device
    sync(device)
    t0 = time.perf_counter()
    boxes = torch.cat([mod.region_boxes(m, t, (224, 224), chunk_size=args.chunk)[0] for m, t in layers])
    sync(device)
    t1 = time.perf_counter()
    keep, assign = mod.dedupe_boxes(samples, boxes, 0.8)
    sync(device)
    t2 = time.perf_counter()
    crops = 0
    for s in range(0, keep.numel() if args.crops else 0, args.encoder_batch):
        sel = keep[s : s + args.encoder_batch]
        crops += mod.crop_images(images, samples[sel], boxes[sel], 224).shape[0]
    sync(device)
    t3 = time.perf_counter()
    times = {"boxes_s": t1 - t0, "dedupe_s": t2 - t1, **({"crops_s": t3 - t2} if args.crops else {})}
    return {**times, "out": (boxes, keep, assign, crops)}


def dedupe_many_samples(versions: dict[str, ModuleType], device: torch.device, repeats: int) -> dict[str, Any]:
    """Dedupe alone where boxes spread over many samples (a large probe set): 20,000 boxes of 2,000 samples."""
    g = torch.Generator().manual_seed(0)
    samples = torch.randint(0, 2000, (20000,), generator=g)
    xy = torch.randint(0, 12, (20000, 2), generator=g)
    boxes = torch.cat([xy, xy + torch.randint(20, 26, (20000, 1), generator=g)], dim=1)
    samples, boxes = samples.to(device), boxes.to(device)
    out: dict[str, Any] = {}
    for name, mod in versions.items():
        best = float("inf")
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            keep, _ = mod.dedupe_boxes(samples, boxes, 0.8)
            sync(device)
            best = min(best, time.perf_counter() - t0)
        out[f"{name}_s"] = round(best, 3)
        out[f"{name}_unique"] = int(keep.numel())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=1024, help="pairs per vectorised region step")
    parser.add_argument("--encoder-batch", type=int, default=256, help="crops cut per call")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--baseline", default=None, help=f"git revision of the 'before' code (cpu default {BASELINE})")
    parser.add_argument("--no-crops", dest="crops", action="store_false", help="skip the crop timing")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rev = args.baseline or (BASELINE if device.type == "cpu" else None)
    layers, (samples, images) = make_pairs(args.images, args.top_k, device)
    versions: dict[str, ModuleType] = {"after": after}
    if rev:
        versions = {"before": load_baseline(rev), "after": after}
    best: dict[str, dict[str, float]] = {k: {} for k in versions}
    outs: dict[str, Any] = {}
    for _ in range(args.repeats):
        for name, mod in versions.items():
            res = run_stage(mod, layers, samples, images, args)
            outs[name] = res.pop("out")
            for key, value in res.items():
                best[name][key] = min(best[name].get(key, float("inf")), value)
    for name in best:
        best[name]["regions_s"] = best[name]["boxes_s"] + best[name]["dedupe_s"]
    boxes, keep, assign, _ = outs["after"]
    threads = torch.get_num_threads()
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({threads} threads)",
        "load_average_1min": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "baseline_rev": rev,
        "pairs": int(boxes.shape[0]),
        "pairs_per_layer": {n: int(m.shape[0]) for n, (m, _) in zip(STAGES, layers)},
        "unique_crops": int(keep.numel()),
        "unique_crop_fraction": round(keep.numel() / max(1, boxes.shape[0]), 4),
        "repeats": args.repeats,
        "seconds": {name: {k: round(v, 3) for k, v in t.items()} for name, t in best.items()},
    }
    if "before" in outs:
        b_boxes, b_keep, b_assign, _ = outs["before"]
        result["identical"] = {
            "boxes": bool(torch.equal(b_boxes, boxes)),
            "unique_crops": bool(torch.equal(b_keep.sort().values, keep.sort().values)),
            "representative_of_each_pair": bool(torch.equal(b_keep[b_assign], keep[assign])),
        }
        nms_trick = getattr(tv_boxes, "_batched_nms_coordinate_trick", None)
        if nms_trick is not None and hasattr(versions["before"], "batched_nms"):
            # torchvision switches to a per-sample loop above 1,000 boxes on the CPU, where the order of boxes of
            # equal area is not fixed; its one-call path (used below that size) is the stable greedy order.
            namespace = vars(versions["before"])
            original, namespace["batched_nms"] = namespace["batched_nms"], nms_trick
            s_keep, s_assign = versions["before"].dedupe_boxes(samples, b_boxes, 0.8)
            namespace["batched_nms"] = original
            result["identical"]["dedupe_vs_stable_greedy_nms"] = bool(
                torch.equal(s_keep, keep) and torch.equal(s_assign, assign)
            )
        result["dedupe_20k_boxes_2k_samples"] = dedupe_many_samples(versions, device, args.repeats)
        result["speedup_before_over_after"] = {
            k: round(best["before"][k] / max(best["after"][k], 1e-9), 2) for k in best["after"]
        }
    sys.stdout.write(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
