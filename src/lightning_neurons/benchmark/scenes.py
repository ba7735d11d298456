"""The broad benchmark's data: real photos, textiles and rendered scenes, in a development and a held-out split.

Every class has a one-word ``name`` and a ``phrase`` ("bricks", "a brick wall"). Its images come from one of:

- a bundled photo (every colour and grey photo of ``skimage.data`` that loads offline, and scikit-learn's sample
  images): samples are random crops of it, as in :class:`~lightning_neurons.demo.PhotoPatches`;
- the simulated textile JPEGs of package ``conformal-clip-data`` (optional; the class is left out when the
  package is not installed): each sample is a crop of another textile;
- a rendered scene with known ground truth (a colour, stripes, dots, a checkerboard, circles), drawn anew per
  sample with random orientation, frequency, jitter and noise.

The development split holds the 12 photos the previous defaults were chosen on plus rendered scenes; the held-out
split holds only photos, textiles and scenes that no default was chosen on. Defaults are chosen on the
development split only.

Example:
    >>> ds = SceneCrops(DEVELOPMENT[:2], samples_per_class=2, image_size=32, seed=0)
    >>> image, label = ds[0]
    >>> tuple(image.shape), ds.classes[label], ds.phrases[label]
    ((3, 32, 32), 'cat', "a cat's face")
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from lightning_neurons.demo.data import IMAGE_MEAN, IMAGE_STD, load_photo


@dataclass(frozen=True)
class SceneClass:
    """One benchmark class.

    Args:
        name: One-word class name.
        phrase: A short description of the class ("the surface of the moon").
        source: ``"photo:<loader>"`` (a :func:`~lightning_neurons.demo.data.load_photo` name),
            ``"textile:<folder>"`` (a ``conformal-clip-data`` folder) or ``"render:<kind>"``.
    """

    name: str
    phrase: str
    source: str


#: The development split: the 12 photos of :data:`~lightning_neurons.demo.data.PHOTO_CLASSES` and 4 scenes.
DEVELOPMENT: list[SceneClass] = [
    SceneClass("cat", "a cat's face", "photo:chelsea"),
    SceneClass("coffee", "a cup of coffee", "photo:coffee"),
    SceneClass("rocket", "a rocket on its launch pad", "photo:rocket"),
    SceneClass("astronaut", "an astronaut in a space suit", "photo:astronaut"),
    SceneClass("bricks", "a brick wall", "photo:brick"),
    SceneClass("grass", "a lawn of grass", "photo:grass"),
    SceneClass("gravel", "a gravel path", "photo:gravel"),
    SceneClass("coins", "a pile of old coins", "photo:coins"),
    SceneClass("motorcycle", "a parked motorcycle", "photo:stereo_motorcycle"),
    SceneClass("flower", "a flower in bloom", "photo:sklearn:flower.jpg"),
    SceneClass("temple", "the roof of a chinese temple", "photo:sklearn:china.jpg"),
    SceneClass("moon", "the surface of the moon", "photo:moon"),
    SceneClass("red", "a plain red surface", "render:red"),
    SceneClass("green", "a plain green surface", "render:green"),
    SceneClass("stripes", "black and white stripes", "render:stripes"),
    SceneClass("dots", "coloured polka dots", "render:dots"),
]

#: The held-out split: photos, textiles and scenes that no default was chosen on.
HELD_OUT: list[SceneClass] = [
    SceneClass("photographer", "a man with a camera on a tripod", "photo:camera"),
    SceneClass("clock", "a clock on the wall", "photo:clock"),
    SceneClass("galaxies", "galaxies in deep space", "photo:hubble_deep_field"),
    SceneClass("tissue", "a stained tissue sample under a microscope", "photo:immunohistochemistry"),
    SceneClass("retina", "the retina of an eye", "photo:retina"),
    SceneClass("text", "a page of printed text", "photo:page"),
    SceneClass("horse", "the silhouette of a horse", "photo:horse"),
    SceneClass("rainbow", "a rainbow colour wheel", "photo:colorwheel"),
    SceneClass("cells", "cells under a microscope", "photo:cell"),
    SceneClass("fabric", "a grey woven fabric", "textile:nominal"),
    SceneClass("blue", "a plain blue surface", "render:blue"),
    SceneClass("yellow", "a plain yellow surface", "render:yellow"),
    SceneClass("checkerboard", "a black and white checkerboard", "render:checkers"),
    SceneClass("circles", "white circles on a black background", "render:circles"),
]

#: Split name -> classes.
SPLITS: dict[str, list[SceneClass]] = {"development": DEVELOPMENT, "held_out": HELD_OUT}

_COLOURS = {"red": (0.8, 0.1, 0.1), "green": (0.1, 0.65, 0.15), "blue": (0.1, 0.2, 0.85), "yellow": (0.9, 0.8, 0.1)}
_CANVAS = 160  # side of a rendered scene before the crop


def split_classes(split: str) -> list[SceneClass]:
    """The classes of a split that can be loaded here (the textile class needs ``conformal-clip-data``).

    Raises:
        ValueError: If ``split`` is not ``"development"`` or ``"held_out"``.

    Example:
        >>> [c.name for c in split_classes("development")][:3]
        ['cat', 'coffee', 'rocket']
    """
    if split not in SPLITS:
        raise ValueError(f"unknown benchmark split {split!r}; choose from {sorted(SPLITS)}")
    return [c for c in SPLITS[split] if not c.source.startswith("textile:") or textile_dir() is not None]


def textile_dir() -> Path | None:
    """The simulated textile folder of package ``conformal-clip-data``, or ``None`` when it is not installed."""
    spec = importlib.util.find_spec("conformal_clip_data")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "textile_images" / "simulated"
    return path if path.is_dir() else None


@functools.cache
def _textiles(folder: str) -> tuple[Path, ...]:
    root = textile_dir()
    if root is None:
        raise FileNotFoundError("package conformal-clip-data is not installed (pip install conformal-clip-data)")
    return tuple(sorted((root / folder).glob("*.jpg")))


@functools.lru_cache(maxsize=64)
def _photo(name: str) -> Tensor:
    # Decoding a photo (up to ~1,000 px) took most of a run's data time when it was repeated for every crop; the
    # crops only read the cached tensor (slice, flip and resize copy it), so caching changes no pixel.
    return load_photo(name)


def _read_textile(path: Path) -> Tensor:
    from PIL import Image

    with Image.open(path) as image:
        array = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
        return array.view(image.height, image.width, 3).permute(2, 0, 1).float() / 255.0


def render(kind: str, generator: torch.Generator, size: int = _CANVAS) -> Tensor:
    """Draw one rendered scene of ``kind`` as float ``[3, size, size]`` in ``[0, 1]``.

    Args:
        kind: A colour name (red, green, blue, yellow), ``stripes``, ``dots``, ``checkers`` or ``circles``.
        generator: Source of the random orientation, frequency, jitter and noise.
        size: Side of the scene.

    Raises:
        ValueError: If ``kind`` is unknown.

    Example:
        >>> render("stripes", torch.Generator().manual_seed(0), size=16).shape
        torch.Size([3, 16, 16])
    """

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator)

    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    if kind in _COLOURS:
        colour = torch.tensor(_COLOURS[kind]) + 0.08 * (rand(3) - 0.5)
        image = colour[:, None, None] * (0.85 + 0.15 * rand(1, size, size))
    elif kind == "stripes":
        angle, period = math.pi * float(rand(1)), 8 + 16 * float(rand(1))
        wave = torch.sin(2 * math.pi * (xs * math.cos(angle) + ys * math.sin(angle)) / period)
        image = (wave > 0).float().expand(3, size, size)
    elif kind == "checkers":
        cell = int(8 + 16 * float(rand(1)))
        board = ((torch.div(xs, cell, rounding_mode="floor") + torch.div(ys, cell, rounding_mode="floor")) % 2).float()
        image = board.expand(3, size, size)
    elif kind in ("dots", "circles"):
        spacing = 16 + 16 * float(rand(1))
        radius = spacing * (0.2 + 0.15 * float(rand(1)))
        cx, cy = (xs % spacing) - spacing / 2, (ys % spacing) - spacing / 2
        inside = ((cx**2 + cy**2) <= radius**2).float()
        if kind == "dots":  # coloured dots on white, one colour per dot row
            row_colour = rand(3, int(size // spacing) + 2)
            colour = row_colour[:, torch.div(ys, spacing, rounding_mode="floor").long()]
            image = inside * colour + (1 - inside)
        else:  # white circles (rings on half of the scenes) on black
            if float(rand(1)) < 0.5:
                inside = inside - ((cx**2 + cy**2) <= (0.6 * radius) ** 2).float()
            image = inside.expand(3, size, size)
    else:
        raise ValueError(f"unknown rendered scene {kind!r}")
    noise = 0.04 * (rand(3, size, size) - 0.5)
    return (image + noise).clamp(0, 1).contiguous()


class SceneCrops(Dataset[tuple[Tensor, int]]):
    """Random crops of the images of :class:`SceneClass` es, generated deterministically from ``seed``.

    Args:
        classes: The classes, e.g. :func:`split_classes` ``("held_out")``.
        samples_per_class: Crops per class.
        image_size: Side of the square output images.
        min_scale: Smallest crop side as a fraction of the source's shorter side.
        seed: Seed of the crops and of the rendered scenes; use different seeds for training and probes.
        normalize: Apply ImageNet mean/std normalisation (what :class:`~lightning_neurons.demo.SmallCNN` expects).

    Attributes:
        classes: The one-word class names (the dataset vocabulary, as ``PhotoPatches.classes``).
        phrases: The class phrases, in the same order.
    """

    def __init__(
        self,
        classes: Sequence[SceneClass],
        samples_per_class: int = 64,
        image_size: int = 64,
        min_scale: float = 0.25,
        seed: int = 0,
        normalize: bool = True,
    ) -> None:
        if not classes or samples_per_class < 1 or image_size < 8 or not 0 < min_scale <= 1:
            raise ValueError("need classes, samples_per_class >= 1, image_size >= 8 and 0 < min_scale <= 1")
        self.scene_classes = list(classes)
        self.classes = [c.name for c in self.scene_classes]
        self.phrases = [c.phrase for c in self.scene_classes]
        self.samples_per_class = samples_per_class
        self.image_size = image_size
        self.normalize = normalize
        self.seed = seed
        self._min_scale = min_scale
        # (scale, x, y, flip, pick) per sample, fixed at construction so that indexing is deterministic.
        self._params = torch.rand(len(classes) * samples_per_class, 5, generator=torch.Generator().manual_seed(seed))
        self._cache: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return len(self.scene_classes) * self.samples_per_class

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        label = index // self.samples_per_class
        if index not in self._cache:
            self._cache[index] = self._cut(index, self.scene_classes[label])
        return self._cache[index], label

    def _source(self, index: int, scene: SceneClass) -> Tensor:
        kind, _, what = scene.source.partition(":")
        if kind == "photo":
            return _photo(what)
        if kind == "textile":
            files = _textiles(what)
            return _read_textile(files[int(float(self._params[index, 4]) * len(files)) % len(files)])
        return render(what, torch.Generator().manual_seed(self.seed * 1_000_003 + index))

    def _cut(self, index: int, scene: SceneClass) -> Tensor:
        source = self._source(index, scene)
        scale, fx, fy, flip, _ = self._params[index].tolist()
        _, height, width = source.shape
        side = max(8, int(min(height, width) * (self._min_scale + (1 - self._min_scale) * scale)))
        top, left = int(fy * (height - side)), int(fx * (width - side))
        crop = source[:, top : top + side, left : left + side]
        if flip > 0.5:
            crop = crop.flip(-1)
        image = F.interpolate(crop[None], size=self.image_size, mode="bilinear", antialias=True, align_corners=False)
        image = image[0].clamp(0, 1)
        if self.normalize:
            image = (image - torch.tensor(IMAGE_MEAN)[:, None, None]) / torch.tensor(IMAGE_STD)[:, None, None]
        return image


__all__ = ["DEVELOPMENT", "HELD_OUT", "SPLITS", "SceneClass", "SceneCrops", "render", "split_classes", "textile_dir"]
