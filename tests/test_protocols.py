"""The published protocols on a user's ImageFolder: a random-weight torchvision model and a tiny random open_clip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightning_neurons.evaluation.protocols import load_model, output_layer, run_protocol


@pytest.fixture(scope="module")
def tiny_clip_name(tmp_path_factory: pytest.TempPathFactory) -> str:
    import open_clip

    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    path = tmp_path_factory.mktemp("clip_cfg") / "ln-test-protocol-vit.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return "ln-test-protocol-vit"


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("probe")
    rng = np.random.default_rng(0)
    for name, colour in (("red_thing", (200, 30, 30)), ("green_thing", (30, 180, 40)), ("blue_thing", (20, 40, 210))):
        (root / name).mkdir()
        for i in range(6):
            pixels = np.clip(np.array(colour) + rng.normal(0, 25, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_final_layer_protocol_on_a_random_torchvision_model(tiny_clip_name: str, image_folder: Path) -> None:
    backend_kwargs = {"model_name": tiny_clip_name, "pretrained": None}
    out = run_protocol(
        "final-layer",
        "torchvision:resnet18",
        image_folder,
        "clip",
        weights=None,
        image_size=32,
        top_k=4,
        vocabulary=["red", "green", "blue", "stripes", "sky"],
        backend_kwargs=backend_kwargs,
    )
    metrics = out["metrics"]
    assert metrics["layer"] == "fc" and metrics["images"] == 18 and metrics["units"] == 1000
    assert 0 <= metrics["top1"] <= metrics["top5"] <= 1 and -1 <= metrics["class_similarity"] <= 1
    lines = out["table"].splitlines()
    assert lines[0].startswith("| method | top-1 | top-5 |") and lines[2].endswith("| 3 | 18 |")


def test_simulation_protocol_on_a_hidden_layer(tiny_clip_name: str, image_folder: Path) -> None:
    out = run_protocol(
        "simulation",
        "torchvision:resnet18",
        image_folder,
        "clip",
        layer="layer4",
        weights=None,
        image_size=32,
        top_k=3,
        vocabulary=["red", "green", "blue"],
        max_images=12,
        backend_kwargs={"model_name": tiny_clip_name, "pretrained": None},
    )
    metrics = out["metrics"]
    assert metrics["units"] == 512 and metrics["held_out_images"] == 6 and -1 <= metrics["simulation"] <= 1
    assert out["rows"][0]["explaining images"] == "6"


def test_protocol_errors_name_the_fix(image_folder: Path) -> None:
    with pytest.raises(ValueError, match="unknown protocol"):
        run_protocol("accuracy", "torchvision:resnet18", image_folder)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="torchvision:<name>"):
        load_model("resnet50")
    import torch.nn as nn

    with pytest.raises(ValueError, match="layer="):
        output_layer(nn.Sequential(nn.Conv2d(3, 3, 1)))
