"""Time per crop of the embedded encoder's classifier (MobileNetV2) in the forms the backend can run it, side by side.

Prints one JSON object. Forms (all on the CPU, ``channels_last``, batch norms folded, as the backend runs them):

- ``float32``: the eager float32 classifier (``backend_kwargs={"precision": "float32"}``);
- ``bfloat16_eager``: the eager bfloat16 copy (the default on CPUs with native bfloat16 before the fused
  convolutions);
- ``bfloat16``: what the backend runs now in bfloat16 (each conv fused with its ReLU6 by oneDNN,
  :func:`~lightning_neurons.backends.fused_conv.fuse_conv_activations`, where the kernel exists).

The crops are real photos (scikit-image's sample images) cut into random boxes and resized to 224 px, in batches of
the backend's ``batch_size="auto"``. The forms run in turns (``--repeats`` times each, interleaved, so that load
drift hits all), and each reports its seconds per crop (the median over repeats), its speed-up over
``bfloat16_eager`` and its largest logit difference from ``bfloat16_eager`` (0 means the same numbers bit for bit).

    HF_HUB_OFFLINE=1 python benchmarks/encoder_speed.py [--crops 256] [--repeats 3] [--quick] [-o out.json]

``--quick`` runs 16 crops once to check that the script runs; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _crops(count: int, size: int) -> Any:
    """``count`` random boxes of real photos, resized to ``size`` px and normalised for ImageNet."""
    import torch

    from lightning_neurons.backends.base import prepare_images
    from lightning_neurons.backends.embedded import _IMAGENET_MEAN, _IMAGENET_STD
    from lightning_neurons.demo.data import load_photo

    photos = [load_photo(name) for name in ("chelsea", "coffee", "rocket", "astronaut", "horse", "brick")]
    generator = torch.Generator().manual_seed(0)
    crops = []
    for index in range(count):
        photo = photos[index % len(photos)]
        height, width = photo.shape[-2:]
        side = int(torch.randint(min(height, width) // 6, min(height, width) // 2, (1,), generator=generator))
        top = int(torch.randint(0, height - side, (1,), generator=generator))
        left = int(torch.randint(0, width - side, (1,), generator=generator))
        box = photo[:, top : top + side, left : left + side]
        crops.append(prepare_images(box, size, _IMAGENET_MEAN, _IMAGENET_STD))
    return torch.cat(crops)


def run(crops: int = 256, repeats: int = 3, image_size: int = 224) -> dict[str, Any]:
    """Time the classifier forms on the same crops; see the module docstring."""
    import torch

    from lightning_neurons.backends.embedded import inference_copy, load_mobilenet, resolve_batch_size
    from lightning_neurons.backends.fused_conv import FusedConv2d, fuse_conv_activations

    folded = inference_copy(load_mobilenet("cpu"))
    eager_bf16 = copy.deepcopy(folded).to(torch.bfloat16)
    forms = {"float32": folded, "bfloat16_eager": eager_bf16, "bfloat16": fuse_conv_activations(eager_bf16)}
    pixels = _crops(crops, image_size)
    batch = resolve_batch_size("auto", image_size, torch.device("cpu"))

    def logits(model: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
        outs = []
        with torch.inference_mode():
            for start in range(0, pixels.shape[0], batch):
                chunk = pixels[start : start + batch].to(dtype=dtype, memory_format=torch.channels_last)
                outs.append(model(chunk).float())
        return torch.cat(outs)

    dtypes = {"float32": torch.float32, "bfloat16_eager": torch.bfloat16, "bfloat16": torch.bfloat16}
    reference = {name: logits(model, dtypes[name]) for name, model in forms.items()}  # also warms every form up
    seconds: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(repeats):
        for name, model in forms.items():
            start = time.perf_counter()
            logits(model, dtypes[name])
            seconds[name].append(time.perf_counter() - start)
    base = statistics.median(seconds["bfloat16_eager"])
    result: dict[str, Any] = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "processor": platform.processor(),
        },
        "crops": crops,
        "image_size": image_size,
        "batch_size": batch,
        "repeats": repeats,
        "fused_convs": sum(isinstance(m, FusedConv2d) for m in forms["bfloat16"].modules()),
    }
    for name in forms:
        median = statistics.median(seconds[name])
        result[name] = {
            "ms_per_crop": round(1000 * median / crops, 3),
            "seconds": [round(s, 3) for s in seconds[name]],
            "speedup_over_bfloat16_eager": round(base / median, 2) if median > 0 else None,
            "max_logit_diff_vs_bfloat16_eager": float((reference[name] - reference["bfloat16_eager"]).abs().max()),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crops", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--quick", action="store_true", help="16 crops once: checks the script (no figures)")
    parser.add_argument("-o", "--output", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    crops, repeats = (16, 1) if args.quick else (args.crops, args.repeats)
    result = run(crops, repeats, args.image_size)
    text = json.dumps(result, indent=1)
    if args.output:
        Path(args.output).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
