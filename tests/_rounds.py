"""Hand-built explanation rounds and a deterministic toy text embedder for the drift/logging tests."""

from __future__ import annotations

import hashlib

import torch

from lightning_neurons.results import Alternative, ExplanationRound, UnitExplanation

DIM = 512


def bow_embed(texts: list[str]) -> torch.Tensor:
    """Bag-of-words hashing embedder: texts sharing no word are orthogonal; the same text gives the same row."""
    out = torch.zeros(len(texts), DIM)
    for i, text in enumerate(texts):
        for word in text.lower().split():
            out[i, int(hashlib.md5(word.encode()).hexdigest(), 16) % DIM] += 1.0
    return torch.nn.functional.normalize(out, dim=1)


class CountingEmbed:
    """bow_embed that records its calls."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.calls.append(list(texts))
        return bow_embed(texts)


# Unit 0 of "features.3" changes meaning at epoch 2 (dots -> stripes); everything else keeps its meaning.
PLAN = {
    ("features.3", 0): ["red dots", "red dots", "vertical stripes", "vertical stripes", "vertical stripes"],
    ("features.3", 1): ["grass", "grass", "grass", "grass", "grass"],
    ("features.3", 2): ["sky", "Sky ", "Sky ", "sky", "sky"],
    ("head.fc", 0): ["cat face", "cat face", "cat face", "cat face", "cat face"],
    ("head.fc", 1): ["wheel", "wheel", "wheel", "wheel", "wheel"],
}
COLOURS = [(220, 40, 40), (40, 160, 40), (40, 90, 220), (230, 200, 40), (150, 60, 200)]


def make_round(epoch: int, previews: bool = True, k: int = 4, size: int = 24) -> ExplanationRound:
    units = []
    rnd = ExplanationRound(epoch=epoch, meta={"backend": "toy"})
    for idx, ((layer, unit), texts) in enumerate(PLAN.items()):
        ids = [epoch + unit + j for j in range(k)]  # top-k set slides by one id per epoch
        units.append(
            UnitExplanation(
                layer=layer,
                unit=unit,
                epoch=epoch,
                description=texts[epoch],
                score=0.6 + 0.05 * epoch + 0.01 * unit,
                alternatives=[Alternative("zigzag", 0.1), Alternative("mesh", 0.05)],
                top_sample_ids=ids,
                activations=[1.0 - 0.1 * j for j in range(k)],
            )
        )
        if previews:
            img = torch.zeros(k, 3, size, size, dtype=torch.uint8)
            for c in range(3):
                img[:, c] = COLOURS[idx % len(COLOURS)][c]
            img[:, :, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
            rnd.previews[(layer, unit)] = img
    rnd.units = units
    return rnd


# A realistic-looking run (real photos from scikit-image as crops) for the browser test and the README screenshot.
REAL_PLAN = {
    ("layer3", 0): ["fur", "fur", "cat face", "cat face", "cat face"],
    ("layer3", 1): ["brick wall", "brick wall", "brick wall", "bricks", "bricks"],
    ("layer3", 2): ["grass", "grass", "grass", "grass", "grass"],
    ("layer4", 0): ["coins", "metal disc", "coins", "coins", "coins"],
    ("layer4", 1): ["rocket", "rocket", "rocket", "rocket", "rocket"],
}
REAL_IMAGES = {
    ("layer3", 0): "chelsea",
    ("layer3", 1): "brick",
    ("layer3", 2): "grass",
    ("layer4", 0): "coins",
    ("layer4", 1): "rocket",
}


def _photo_crops(name: str, k: int, size: int, epoch: int) -> torch.Tensor:
    from skimage import data

    img = torch.as_tensor(getattr(data, name)())
    if img.ndim == 2:
        img = img[..., None].expand(-1, -1, 3)
    img = img[..., :3].permute(2, 0, 1)
    h, w = img.shape[1:]
    crops = []
    for j in range(k):
        side = min(h, w) // 2
        y = (j * 37 + epoch * 11) % max(1, h - side)
        x = (j * 53 + epoch * 17) % max(1, w - side)
        crop = img[:, y : y + side, x : x + side].unsqueeze(0).float()
        crop = torch.nn.functional.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)[0]
        crop = crop.round().clamp(0, 255).to(torch.uint8)
        b = size // 5  # activated-region outline, as the pipeline draws it
        crop[:, b : size - b, b : b + 2] = crop[:, b : size - b, size - b - 2 : size - b] = 0
        crop[:, b : b + 2, b : size - b] = crop[:, size - b - 2 : size - b, b : size - b] = 0
        crop[0, b : size - b, b : b + 2] = crop[0, b : size - b, size - b - 2 : size - b] = 255
        crop[0, b : b + 2, b : size - b] = crop[0, size - b - 2 : size - b, b : size - b] = 255
        crops.append(crop)
    return torch.stack(crops)


def make_real_round(epoch: int, k: int = 6, size: int = 64) -> ExplanationRound:
    rnd = ExplanationRound(epoch=epoch, meta={"backend": "embedded"})
    for (layer, unit), texts in REAL_PLAN.items():
        rnd.units.append(
            UnitExplanation(
                layer=layer,
                unit=unit,
                epoch=epoch,
                description=texts[epoch],
                score=round(0.55 + 0.08 * epoch * (1 + unit) / 3 + 0.02 * unit, 3),
                alternatives=[Alternative("texture", 0.12), Alternative("pattern", 0.08)],
                top_sample_ids=[(epoch + unit * 7 + j) % 50 for j in range(k)],
            )
        )
        rnd.previews[(layer, unit)] = _photo_crops(REAL_IMAGES[(layer, unit)], k, size, epoch)
    return rnd
