"""Throughput of the explanation stage: units/s and crops/s, against a CLIP-Dissect-style whole-probe baseline.

Each backend's result is printed to stderr as soon as it finishes; the final output is ONE JSON object on stdout
(also when ``--max-seconds`` runs out: then with ``"aborted"`` set and the backends finished so far).

CPU default (about 3 minutes on 2 slow cores): random-weight ResNet-18 ``conv1`` (64 units), 48 synthetic probe
images, the embedded backend (all units, top_k=4, 512 concepts) and a random-weight open_clip ViT-B-16 (speed does
not depend on the weights; a ViT-B/16 embeds ~1 image/s on such a CPU, so it explains 16 units at top_k=2 with 32
concepts). Layers after the last explained one are cut from the CPU model (their outputs are never used). Every
entry reports its own configuration.

GPU target (one command, model and encoder loading excluded from the timings, < 4 minutes in all):

    python benchmarks/explain_throughput.py --device cuda

ResNet-50 conv1 + layer1-4 (3,904 units), top_k=20, 5,000 synthetic 224 px probe images generated on the GPU,
bf16 model, open_clip ViT-B-16 with random weights under autocast, the general concept vocabulary. The embedded
backend is skipped on CUDA unless named in ``--encoders`` (it needs the offline pack).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torchvision
from torch import Tensor, nn

from lightning_neurons.explanation.pipeline import ExplainConfig, explain_recording
from lightning_neurons.recording.types import LayerTopK, Recording

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESNET_STAGES = ("conv1", "layer1", "layer2", "layer3", "layer4")

# Per-backend CPU defaults (None = everything); CUDA uses the full job for every backend.
CPU_DEFAULTS: dict[str, dict[str, Any]] = {
    "embedded": {"units": None, "top_k": 4, "concepts": 512, "baseline_images": 48, "reservoir": 16},
    "clip": {"units": 16, "top_k": 2, "concepts": 32, "baseline_images": 8, "reservoir": 4},
}


def log(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


class TensorSource:
    """SampleSource over a (device) tensor of inputs."""

    def __init__(self, inputs: Tensor) -> None:
        self.inputs = inputs

    def fetch(self, ids: Sequence[int]) -> tuple[Tensor, Tensor | None]:
        idx = torch.as_tensor(list(ids), dtype=torch.long, device=self.inputs.device)
        return self.inputs[idx], None


def synthetic_probe(n: int, size: int, device: torch.device, seed: int = 0) -> Tensor:
    """Smooth random colour fields with random bright rectangles, normalised like ImageNet inputs."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = torch.empty(n, 3, size, size, device=device)
    mean = torch.tensor(IMAGENET_MEAN, device=device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=device)[:, None, None]
    for start in range(0, n, 500):
        b = min(500, n - start)
        low = torch.rand(b, 3, 7, 7, generator=g, device=device)
        img = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
        xy = (torch.rand(b, 2, generator=g, device=device) * size * 0.7).long()
        side = (torch.rand(b, generator=g, device=device) * size * 0.3 + size * 0.1).long()
        ar = torch.arange(size, device=device)
        inx = (ar[None] >= xy[:, :1]) & (ar[None] < xy[:, :1] + side[:, None])
        iny = (ar[None] >= xy[:, 1:]) & (ar[None] < xy[:, 1:] + side[:, None])
        rect = (iny[:, :, None] & inx[:, None, :])[:, None]
        colour = torch.rand(b, 3, 1, 1, generator=g, device=device)
        img = torch.where(rect, colour.expand_as(img), img).clamp(0, 1)
        out[start : start + b] = (img - mean) / std
    return out


def truncate_resnet(model: nn.Module, layers: Sequence[str]) -> nn.Module:
    """Replace the ResNet stages after the last explained one by identities (their outputs are never used)."""
    if not all(hasattr(model, s) for s in RESNET_STAGES):
        return model
    last = max(RESNET_STAGES.index(name) for name in layers if name in RESNET_STAGES)
    for stage in RESNET_STAGES[last + 1 :]:
        setattr(model, stage, nn.Identity())
    if last < len(RESNET_STAGES) - 1:
        model.fc = nn.Identity()
    return model


def record(model: nn.Module, inputs: Tensor, layers: list[str], top_k: int, batch: int, reservoir: int) -> Recording:
    from lightning_neurons.recording.recorder import collect_top_k

    loader = [inputs[i : i + batch] for i in range(0, inputs.shape[0], batch)]
    return collect_top_k(model, loader, layers, top_k, reservoir_size=reservoir, show_progress=False)


def subset_recording(rec: Recording, units: int | None, top_k: int | None, reservoir: int | None) -> Recording:
    """Explain only the first ``units`` units of every layer (the others get no samples: the pipeline leaves them
    empty), with their first ``top_k`` samples, and ``reservoir`` control samples."""
    layers = {}
    for name, lt in rec.layers.items():
        k = lt.sample_ids.shape[1] if top_k is None else min(top_k, lt.sample_ids.shape[1])
        ids = lt.sample_ids[:, :k].clone()
        if units is not None:
            ids[units:] = -1
        layers[name] = LayerTopK(
            name=lt.name,
            kind=lt.kind,
            num_units=lt.num_units,
            map_size=lt.map_size,
            values=lt.values[:, :k],
            sample_ids=ids,
            peaks=lt.peaks[:, :k],
        )
    res = rec.reservoir_ids[rec.reservoir_ids >= 0]
    if reservoir is not None:
        res = res[:reservoir]
    k_all = max((lt.sample_ids.shape[1] for lt in layers.values()), default=rec.top_k)
    return Recording(layers=layers, reservoir_ids=res, num_samples=rec.num_samples, top_k=k_all)


def explained_units(rec: Recording) -> int:
    return int(sum(int((lt.sample_ids >= 0).any(dim=1).sum()) for lt in rec.layers.values()))


def load_encoder(name: str, device: str, batch_size: int) -> Any:
    from lightning_neurons.backends import load_backend

    if name == "clip":
        return load_backend("clip", device=device, pretrained=None, batch_size=batch_size, resize_mode="squash").encoder
    if name == "embedded":  # imported only when asked: needs the offline pack
        return load_backend("embedded", device=device, generator=False).encoder
    raise ValueError(f"unknown encoder {name!r}; choose embedded or clip")


def concepts() -> list[str]:
    from lightning_neurons.concepts.vocabulary import general_concepts

    return list(dict.fromkeys(general_concepts()))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_one(
    name: str,
    encoder: Any,
    model: nn.Module,
    rec: Recording,
    probe: Tensor,
    vocab: list[str],
    cfg: ExplainConfig,
    device: str,
    baseline_images: int,
    baseline_batch: int,
) -> dict[str, Any]:
    # warm-up (kernels, autocast, allocator); nothing of it is reused by the timed run
    with torch.no_grad():
        encoder.encode_images(torch.rand(8 if device.startswith("cuda") else 1, 3, 224, 224, device=device))
        encoder.encode_texts(vocab[:2])
    sync(device)
    t0 = time.perf_counter()
    rnd = explain_recording(model, rec, TensorSource(probe), encoder, vocab, cfg)
    sync(device)
    seconds = time.perf_counter() - t0
    meta = rnd.meta
    # CLIP-Dissect-style baseline: embed whole probe images once (encoder time only, images already in memory).
    images = probe[:baseline_images]
    mean = torch.tensor(IMAGENET_MEAN, device=probe.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=probe.device)[:, None, None]
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, images.shape[0], baseline_batch):
            encoder.encode_images((images[s : s + baseline_batch].float() * std + mean).clamp(0, 1))
    sync(device)
    baseline = time.perf_counter() - t0
    embedded = meta["unique_crops"] + meta["control_crops"]
    n_base = int(images.shape[0])
    units = explained_units(rec)
    return {
        "encoder": getattr(encoder, "name", name),
        "config": {
            "units": units,
            "top_k": rec.top_k,
            "layers": list(rec.layers),
            "concepts": meta["concepts"],
            "control_images": int(rec.reservoir_ids.numel()),
            "samples_forwarded": meta["samples"],
        },
        "units": units,
        "crops": meta["crops"],
        "unique_crops": meta["unique_crops"],
        "unique_crop_fraction": round(meta["unique_crops"] / max(1, meta["crops"]), 4),  # after IoU dedupe
        "control_crops": meta["control_crops"],
        "concepts": meta["concepts"],
        "explain_s": round(seconds, 3),
        "units_per_s": round(units / seconds, 2),
        "crops_per_s": round(meta["crops"] / seconds, 2),
        "embedded_crops_per_s": round(embedded / max(meta["timings"]["embed_crops"], 1e-9), 2),
        "timings_s": {k: round(v, 3) for k, v in meta["timings"].items()},
        "regions_ms_per_pair": round(1e3 * meta["timings"]["regions"] / max(meta["crops"], 1), 4),
        "baseline_whole_probe_s": round(baseline, 3),
        "baseline_images": n_base,
        "baseline_images_per_s": round(n_base / max(baseline, 1e-9), 2),
        "baseline_full_probe_s_estimate": round(baseline * probe.shape[0] / max(n_base, 1), 3),
    }


class Output:
    """The one JSON object; printed once, by the main thread at the end or by the watchdog on time-out."""

    def __init__(self, result: dict[str, Any]) -> None:
        self.result = result
        self.lock = threading.Lock()
        self.done = False

    def emit(self, aborted: str | None = None) -> bool:
        with self.lock:
            if self.done:
                return False
            self.done = True
            if aborted:
                self.result["aborted"] = aborted
            self.result["wall_s"] = round(time.perf_counter() - START, 3)
            sys.stdout.write(json.dumps(self.result, indent=1) + "\n")
            sys.stdout.flush()
            return True


START = time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", default=None, help="torchvision model (default resnet18 on cpu, resnet50 on cuda)")
    parser.add_argument("--layers", default=None, help="comma-separated layers")
    parser.add_argument("--probe", type=int, default=None, help="probe images")
    parser.add_argument("--top-k", type=int, default=None, help="top_k for every backend")
    parser.add_argument("--units", type=int, default=None, help="units per layer for every backend")
    parser.add_argument("--concepts", type=int, default=None, help="concepts for every backend")
    parser.add_argument("--baseline-images", type=int, default=None, help="whole images embedded by the baseline")
    parser.add_argument("--reservoir", type=int, default=None, help="control (reservoir) images")
    parser.add_argument("--size", type=int, default=224, help="input side")
    parser.add_argument("--encoders", default=None, help="comma-separated: embedded,clip (cuda default: clip)")
    parser.add_argument("--encoder-batch", type=int, default=None)
    parser.add_argument("--dtype", default=None, help="model dtype: float32 | bfloat16 | float16 (cuda: bfloat16)")
    parser.add_argument("--max-seconds", type=float, default=None, help="print what is done and exit after this")
    parser.add_argument("--no-truncate", action="store_true", help="keep the layers after the last explained one")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    arch = args.arch or ("resnet50" if cuda else "resnet18")
    layers = (args.layers or (",".join(RESNET_STAGES) if cuda else "conv1")).split(",")
    probe_n = args.probe or (5000 if cuda else 48)
    full_k = args.top_k or (20 if cuda else max(v["top_k"] for v in CPU_DEFAULTS.values()))
    enc_batch = args.encoder_batch or (1024 if cuda else 32)
    reservoir_n = args.reservoir or (256 if cuda else max(v["reservoir"] for v in CPU_DEFAULTS.values()))
    encoders = (args.encoders or ("clip" if cuda else "embedded,clip")).split(",")
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    max_seconds = args.max_seconds if args.max_seconds is not None else (230.0 if cuda else 600.0)
    torch.manual_seed(0)
    device = torch.device(args.device)
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "model": arch,
        "model_dtype": str(dtype).removeprefix("torch."),
        "layers": layers,
        "probe_images": probe_n,
        "input_size": args.size,
        "max_seconds": max_seconds,
        "backends": {},
    }
    out = Output(result)

    def on_timeout() -> None:
        if out.emit(aborted=f"--max-seconds {max_seconds} reached"):
            log(f"[explain_throughput] --max-seconds {max_seconds} reached; partial JSON printed")
            os._exit(3)

    watchdog = threading.Timer(max_seconds, on_timeout)
    watchdog.daemon = True
    watchdog.start()

    t0 = time.perf_counter()
    model = getattr(torchvision.models, arch)(weights=None).eval()
    truncated = not cuda and not args.no_truncate
    if truncated:
        model = truncate_resnet(model, layers)
    model = model.to(device=device, dtype=dtype)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    probe = synthetic_probe(probe_n, args.size, device).to(dtype)
    sync(args.device)
    result["setup_s_excluded"] = round(time.perf_counter() - t0, 3)
    result["cut_after_last_layer"] = truncated
    log(f"[explain_throughput] {arch} on {result['device']}: model and {probe_n} probe images ready")

    t0 = time.perf_counter()
    rec = record(model, probe, layers, full_k, 256 if cuda else 16, reservoir_n)
    sync(args.device)
    result["record_s_excluded"] = round(time.perf_counter() - t0, 3)
    result["units_total"] = sum(lt.num_units for lt in rec.layers.values())
    log(f"[explain_throughput] recorded {result['units_total']} units in {result['record_s_excluded']} s")

    vocab_all = concepts()
    for name in encoders:
        opts = dict(CPU_DEFAULTS.get(name, {})) if not cuda else {}
        for key, value in (
            ("units", args.units),
            ("top_k", args.top_k),
            ("concepts", args.concepts),
            ("baseline_images", args.baseline_images),
            ("reservoir", args.reservoir),
        ):
            if value is not None:
                opts[key] = value
        try:
            t0 = time.perf_counter()
            encoder = load_encoder(name, args.device, enc_batch)
            load_s = time.perf_counter() - t0
            sub = subset_recording(rec, opts.get("units"), opts.get("top_k"), opts.get("reservoir"))
            vocab = vocab_all[: opts["concepts"]] if opts.get("concepts") else vocab_all
            cfg = ExplainConfig(
                crop_size=224,
                batch_size=256 if cuda else 16,
                encoder_batch_size=enc_batch,
                region_chunk=4096 if cuda else 1024,
                image_mean=IMAGENET_MEAN,
                image_std=IMAGENET_STD,
                device=args.device,
                show_progress=False,
                preview_units={},
                truncate_forward=True,
            )
            baseline_n = min(probe_n, opts.get("baseline_images") or probe_n)
            entry = run_one(name, encoder, model, sub, probe, vocab, cfg, args.device, baseline_n, enc_batch)
            entry["load_s_excluded"] = round(load_s, 3)
            del encoder
        except Exception as err:  # noqa: BLE001 - report and go on with the other backend
            entry = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-1500:]}
        result["backends"][name] = entry
        log(f"[explain_throughput] {name}: {json.dumps(entry)}")
        if cuda:
            torch.cuda.empty_cache()
    watchdog.cancel()
    out.emit()


if __name__ == "__main__":
    main()
