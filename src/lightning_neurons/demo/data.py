"""An offline image-classification dataset cut from the real photos that ship with scikit-image and scikit-learn.

Each class is one photo (a cat, a coffee cup, a rocket, a brick wall, ...); samples are random crops of it, so
a network trained on it has to learn the photo's textures, colours and parts — which the explanation stage can
then name. Nothing is downloaded.

Example:
    >>> ds = PhotoPatches(samples_per_class=2, image_size=32, seed=0)
    >>> image, label = ds[0]
    >>> tuple(image.shape), ds.classes[label]
    ((3, 32, 32), 'cat')
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

#: Class name -> loader name. Class names double as the dataset vocabulary, so they are plain English.
PHOTO_CLASSES: dict[str, str] = {
    "cat": "chelsea",
    "coffee cup": "coffee",
    "rocket": "rocket",
    "astronaut": "astronaut",
    "brick wall": "brick",
    "grass": "grass",
    "gravel": "gravel",
    "coins": "coins",
    "motorcycle": "stereo_motorcycle",
    "flower": "sklearn:flower.jpg",
    "temple": "sklearn:china.jpg",
    "moon": "moon",
}

#: ImageNet statistics: the usual input normalisation (the explainer is told about it in the configs).
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


@functools.cache
def load_photo(name: str) -> Tensor:
    """Load one bundled photo as float ``[3, H, W]`` in ``[0, 1]`` (grey photos are repeated to RGB)."""
    if name.startswith("sklearn:"):
        from sklearn.datasets import load_sample_image

        array = load_sample_image(name.split(":", 1)[1])
    else:
        import skimage.data

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            array = getattr(skimage.data, name)()
        if isinstance(array, tuple):  # stereo pairs
            array = array[0]
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    image = torch.from_numpy(np.array(array[..., :3], copy=True)).permute(2, 0, 1).float() / 255.0
    return image


class PhotoPatches(Dataset[tuple[Tensor, int]]):
    """Random crops of bundled real photos, one class per photo, generated deterministically from ``seed``.

    Args:
        classes: Class names (keys of :data:`PHOTO_CLASSES`); default: all of them.
        samples_per_class: Crops per class.
        image_size: Side of the square output images.
        min_scale: Smallest crop side as a fraction of the photo's shorter side.
        seed: Seed of the crop positions; use different seeds for training and validation.
        normalize: Apply ImageNet mean/std normalisation.
        swap: Optional ``{class: other photo class}``: draw this class's crops from another photo (used to make
            units change meaning on purpose in drift tests and demos).
    """

    def __init__(
        self,
        classes: Sequence[str] | None = None,
        samples_per_class: int = 64,
        image_size: int = 64,
        min_scale: float = 0.25,
        seed: int = 0,
        normalize: bool = True,
        swap: dict[str, str] | None = None,
    ) -> None:
        self.classes = list(classes or PHOTO_CLASSES)
        unknown = [c for c in self.classes if c not in PHOTO_CLASSES]
        if unknown:
            raise ValueError(f"unknown classes {unknown}; choose from {list(PHOTO_CLASSES)}")
        if samples_per_class < 1 or image_size < 8 or not 0 < min_scale <= 1:
            raise ValueError("need samples_per_class >= 1, image_size >= 8 and 0 < min_scale <= 1")
        self.samples_per_class = samples_per_class
        self.image_size = image_size
        self.normalize = normalize
        self.swap = dict(swap or {})
        generator = torch.Generator().manual_seed(seed)
        # (scale, x, y, flip) per sample, fixed at construction so that indexing is deterministic.
        self._params = torch.rand(len(self.classes) * samples_per_class, 4, generator=generator)
        self._min_scale = min_scale
        self._cache: dict[int, Tensor] = {}  # crops are deterministic: cut each one once

    def __len__(self) -> int:
        return len(self.classes) * self.samples_per_class

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        label = index // self.samples_per_class
        if index not in self._cache:
            self._cache[index] = self._cut(index, label)
        return self._cache[index], label

    def _cut(self, index: int, label: int) -> Tensor:
        name = self.classes[label]
        photo = load_photo(PHOTO_CLASSES[self.swap.get(name, name)])
        scale, fx, fy, flip = self._params[index].tolist()
        _, height, width = photo.shape
        side = max(8, int(min(height, width) * (self._min_scale + (1 - self._min_scale) * scale)))
        top, left = int(fy * (height - side)), int(fx * (width - side))
        crop = photo[:, top : top + side, left : left + side]
        if flip > 0.5:
            crop = crop.flip(-1)
        image = F.interpolate(crop[None], size=self.image_size, mode="bilinear", antialias=True, align_corners=False)[0]
        image = image.clamp(0, 1)
        if self.normalize:
            image = (image - torch.tensor(IMAGE_MEAN)[:, None, None]) / torch.tensor(IMAGE_STD)[:, None, None]
        return image


class PhotoPatchesDataModule(pl.LightningDataModule):
    """Train/validation loaders over :class:`PhotoPatches` (different crop seeds for the two splits).

    Args:
        classes: Class names; default: all bundled photos.
        train_per_class: Training crops per class.
        val_per_class: Validation (probe) crops per class.
        image_size: Side of the square images.
        batch_size: Batch size of both loaders.
        num_workers: DataLoader workers.
        seed: Base seed.
        shuffle: Shuffle the training loader.
        swap: ``{class: other class}``: from epoch ``swap_from_epoch`` on, a class's *training* crops come from
            another photo (validation stays as it is), so the units tied to it change meaning on purpose. Needs
            ``Trainer(reload_dataloaders_every_n_epochs=1)``.
        swap_from_epoch: First epoch of the swap.
    """

    def __init__(
        self,
        classes: list[str] | None = None,
        train_per_class: int = 96,
        val_per_class: int = 32,
        image_size: int = 64,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        swap: dict[str, str] | None = None,
        swap_from_epoch: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.classes = list(classes or PHOTO_CLASSES)

    def setup(self, stage: str | None = None) -> None:
        hp = _HParams(self.hparams)
        self.train_set = PhotoPatches(self.classes, hp.train_per_class, hp.image_size, seed=hp.seed)
        self.val_set = PhotoPatches(self.classes, hp.val_per_class, hp.image_size, seed=hp.seed + 1)

    def train_dataloader(self) -> DataLoader:
        hp = _HParams(self.hparams)
        dataset = self.train_set
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        if hp.swap and epoch >= hp.swap_from_epoch:
            dataset = PhotoPatches(self.classes, hp.train_per_class, hp.image_size, seed=hp.seed, swap=hp.swap)
        return DataLoader(dataset, batch_size=hp.batch_size, shuffle=hp.shuffle, num_workers=hp.num_workers)

    def val_dataloader(self) -> DataLoader:
        hp = _HParams(self.hparams)
        return DataLoader(self.val_set, batch_size=hp.batch_size, num_workers=hp.num_workers)


class _HParams:
    """Attribute access to saved hyperparameters (typed as a mapping by Lightning)."""

    def __init__(self, hparams: Any) -> None:
        self._hparams = hparams

    def __getattr__(self, name: str) -> Any:
        return self._hparams[name]
