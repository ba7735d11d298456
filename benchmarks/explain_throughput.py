"""Throughput of the explanation stage: units/s and crops/s, against a CLIP-Dissect-style whole-probe baseline.

Prints one JSON object. CPU default (about 2-3 minutes on 2 cores): random-weight ResNet-18, 2 layers,
a few hundred synthetic probe images, top_k=10, for the embedded backend and a random-weight open_clip
ViT-B-16 (speed does not depend on the weights). GPU target (one command):

    python benchmarks/explain_throughput.py --device cuda

ResNet-50 conv1 + layer1-4 (3,904 units), top_k=20, 5,000 synthetic probe images generated on the GPU, bf16
model and half-precision encoder; model and encoder loading are excluded from the timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torchvision
from torch import Tensor

from lightning_neurons.explanation.pipeline import ExplainConfig, explain_recording

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def record(model: torch.nn.Module, inputs: Tensor, layers: list[str], top_k: int, batch: int) -> Any:
    from lightning_neurons.recording.recorder import collect_top_k

    loader = [inputs[i : i + batch] for i in range(0, inputs.shape[0], batch)]
    return collect_top_k(model, loader, layers, top_k, reservoir_size=256, show_progress=False)


def embedded_encoder(device: str) -> Any:
    try:
        from lightning_neurons.backends import load_backend

        return load_backend("embedded", device=device).encoder
    except (ImportError, AttributeError, TypeError):
        from lightning_neurons.backends.embedded import load_conse_encoder

        return load_conse_encoder(device=device)


class _OpenClipWrapper:
    """Fallback ImageTextEncoder straight on open_clip (used only if backends/clip.py is missing)."""

    name = "open_clip:ViT-B-16:random"

    def __init__(self, device: str) -> None:
        import open_clip

        self.model = open_clip.create_model("ViT-B-16", pretrained=None).to(device).eval()
        if device.startswith("cuda"):
            self.model = self.model.half()
        self.tokenizer = open_clip.get_tokenizer("ViT-B-16")
        self.device = device
        self.mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN, device=device)[:, None, None]
        self.std = torch.tensor(open_clip.OPENAI_DATASET_STD, device=device)[:, None, None]

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        x = torch.nn.functional.interpolate(images.to(self.device), size=(224, 224), mode="bilinear")
        x = ((x - self.mean) / self.std).to(next(self.model.parameters()).dtype)
        return torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1).cpu()

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        tokens = self.tokenizer(list(texts)).to(self.device)
        return torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu()


def clip_encoder(device: str, batch_size: int) -> Any:
    try:
        from lightning_neurons.backends.clip import load_clip_encoder

        return load_clip_encoder(
            "ViT-B-16", pretrained=None, device=device, batch_size=batch_size, resize_mode="squash"
        )
    except ImportError:
        return _OpenClipWrapper(device)


def concepts() -> list[str]:
    try:
        from lightning_neurons.backends.embedded import imagenet_class_names

        names = imagenet_class_names()
    except Exception:  # noqa: BLE001 - any vocabulary will do for timing
        names = [f"concept {i}" for i in range(1000)]
    return list(dict.fromkeys(names))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_one(
    name: str,
    encoder: Any,
    model: Any,
    rec: Any,
    probe: Tensor,
    vocab: list[str],
    cfg: ExplainConfig,
    device: str,
    baseline_batch: int,
) -> dict[str, Any]:
    # warm-up (kernels, autotuning, text embeddings cache of the encoder are not reused by the timed run)
    with torch.no_grad():
        encoder.encode_images(torch.rand(2, 3, 64, 64, device=device))
    sync(device)
    t0 = time.perf_counter()
    rnd = explain_recording(model, rec, TensorSource(probe), encoder, vocab, cfg)
    sync(device)
    seconds = time.perf_counter() - t0
    meta = rnd.meta
    # CLIP-Dissect-style baseline: embed every probe image once (whole images, encoder time only).
    images = probe[:, :, :, :]
    mean = torch.tensor(IMAGENET_MEAN, device=probe.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=probe.device)[:, None, None]
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, images.shape[0], baseline_batch):
            encoder.encode_images((images[s : s + baseline_batch] * std + mean).clamp(0, 1))
    sync(device)
    baseline = time.perf_counter() - t0
    embedded = meta["unique_crops"] + meta["control_crops"]
    return {
        "encoder": getattr(encoder, "name", name),
        "units": meta["units"],
        "crops": meta["crops"],
        "unique_crops": meta["unique_crops"],
        "control_crops": meta["control_crops"],
        "concepts": meta["concepts"],
        "explain_s": round(seconds, 3),
        "units_per_s": round(meta["units"] / seconds, 2),
        "crops_per_s": round(meta["crops"] / seconds, 2),
        "embedded_crops_per_s": round(embedded / max(meta["timings"]["embed_crops"], 1e-9), 2),
        "timings_s": {k: round(v, 3) for k, v in meta["timings"].items()},
        "baseline_whole_probe_s": round(baseline, 3),
        "baseline_images": int(images.shape[0]),
        "baseline_images_per_s": round(images.shape[0] / baseline, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", default=None, help="torchvision model (default resnet18 on cpu, resnet50 on cuda)")
    parser.add_argument("--layers", default=None, help="comma-separated layers")
    parser.add_argument("--probe", type=int, default=None, help="probe images")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--size", type=int, default=224, help="input side")
    parser.add_argument("--encoders", default="embedded,clip")
    parser.add_argument("--encoder-batch", type=int, default=None)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    arch = args.arch or ("resnet50" if cuda else "resnet18")
    layers = (args.layers or ("conv1,layer1,layer2,layer3,layer4" if cuda else "conv1,layer1")).split(",")
    probe_n = args.probe or (5000 if cuda else 200)
    top_k = args.top_k or (20 if cuda else 10)
    enc_batch = args.encoder_batch or (1024 if cuda else 64)
    torch.manual_seed(0)
    device = torch.device(args.device)

    model = getattr(torchvision.models, arch)(weights=None).eval().to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last, dtype=torch.bfloat16)
    probe = synthetic_probe(probe_n, args.size, device)
    t0 = time.perf_counter()
    rec = record(model, probe.to(torch.bfloat16) if cuda else probe, layers, top_k, 256 if cuda else 64)
    sync(args.device)
    record_s = time.perf_counter() - t0
    if cuda:
        probe = probe.to(torch.bfloat16)
    cfg = ExplainConfig(
        crop_size=224,
        batch_size=256 if cuda else 64,
        encoder_batch_size=enc_batch,
        region_chunk=2048 if cuda else 512,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        device=args.device,
        show_progress=False,
        preview_units={},
    )
    vocab = concepts()
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "model": arch,
        "layers": layers,
        "probe_images": probe_n,
        "top_k": top_k,
        "record_s": round(record_s, 3),
        "backends": {},
    }
    loaders = {"embedded": lambda: embedded_encoder(args.device), "clip": lambda: clip_encoder(args.device, enc_batch)}
    for name in args.encoders.split(","):
        try:
            t0 = time.perf_counter()
            encoder = loaders[name]()
            load_s = time.perf_counter() - t0
            entry = run_one(name, encoder, model, rec, probe, vocab, cfg, args.device, enc_batch)
            entry["load_s_excluded"] = round(load_s, 3)
            result["backends"][name] = entry
        except Exception as err:  # noqa: BLE001 - report and go on with the other backend
            result["backends"][name] = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-800:]}
    json.dump(result, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
