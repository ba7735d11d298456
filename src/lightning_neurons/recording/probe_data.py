"""What the callback reads off the probe (validation) data before step 0.

The loader, its class names, its normalisation, and whether its images have one size.

Lightning builds ``trainer.val_dataloaders`` only when the first validation loop runs, after the callback's
``setup``; :func:`setup_val_loader` reads the loader from where ``fit(model, train, val)`` / ``validate(model, val)``
or the data module put it, so that a bad probe set fails (and its class names are read) before training starts.

Example:
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> class Named(TensorDataset):
    ...     classes = ["cat", "dog"]
    >>> class_names_of(torch.utils.data.Subset(Named(torch.zeros(4, 3, 8, 8)), [0, 1]))
    ['cat', 'dog']
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from lightning_neurons.recording.samples import InputKey, batch_inputs


def _first_loader(loaders: Any) -> DataLoader | None:
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    elif isinstance(loaders, dict):
        loaders = next(iter(loaders.values()), None)
    return loaders if isinstance(loaders, DataLoader) else None


def setup_val_loader(trainer: Any) -> DataLoader | None:
    """The first validation loader of the Trainer's current ``fit`` / ``validate``, also before the loop built it.

    Reads ``trainer.val_dataloaders`` when built, else the loop's data source: the loaders passed to ``fit`` /
    ``validate``, or the data module's (or module's) ``val_dataloader()``. ``None`` when there is none.
    """
    built = _first_loader(getattr(trainer, "val_dataloaders", None))
    if built is not None:
        return built
    fn = str(getattr(getattr(trainer, "state", None), "fn", ""))
    try:
        loop = trainer.validate_loop if fn.endswith("validate") else trainer.fit_loop.epoch_loop.val_loop
        source = loop._data_source
        if source.instance is None or not source.is_defined():
            return None
        return _first_loader(source.dataloader())
    except Exception:  # noqa: BLE001 - a user hook that fails now fails again, with its own traceback, in the loop
        return None


def _datasets(dataset: Any) -> list[Any]:
    # The dataset and the ones it wraps (Subset, and wrappers that keep theirs in .dataset), outermost first.
    chain: list[Any] = []
    while dataset is not None and len(chain) < 8:
        chain.append(dataset)
        dataset = getattr(dataset, "dataset", None)
    return chain


def class_names_of(dataset: Any) -> list[str] | None:
    """Class names from a dataset's (or the dataset it wraps, e.g. a ``Subset``'s) ``classes`` attribute."""
    for candidate in _datasets(dataset):
        classes = getattr(candidate, "classes", None)
        if isinstance(classes, (list, tuple)) and classes and all(isinstance(c, str) for c in classes):
            return list(classes)
    return None


def normalisation_of(dataset: Any) -> tuple[list[float], list[float]] | None:
    """``(mean, std)`` of a torchvision ``Normalize`` in the dataset's ``transform`` (``Compose`` searched), if any.

    Example:
        >>> from torchvision import transforms
        >>> class Folder:
        ...     transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.25] * 3)])
        >>> normalisation_of(Folder())
        ([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    """
    for candidate in _datasets(dataset):
        for transform in _transforms(getattr(candidate, "transform", None)):
            mean, std = getattr(transform, "mean", None), getattr(transform, "std", None)
            if type(transform).__name__ == "Normalize" and mean is not None and std is not None:
                as_list = lambda v: [float(x) for x in (v.tolist() if isinstance(v, Tensor) else v)]  # noqa: E731
                mean_l, std_l = as_list(mean), as_list(std)
                if len(mean_l) == 1:
                    mean_l, std_l = mean_l * 3, std_l * 3
                return mean_l, std_l
    return None


def _transforms(transform: Any) -> list[Any]:
    if transform is None:
        return []
    inner = getattr(transform, "transforms", None)
    if isinstance(inner, Sequence):
        return [t for item in inner for t in _transforms(item)]
    return [transform]


def looks_normalised(inputs: Tensor) -> bool:
    """Whether image inputs are visibly normalised (clearly negative values; ``[0, 1]`` or ``[0, 255]`` are not).

    Example:
        >>> looks_normalised(torch.rand(2, 3, 4, 4)), looks_normalised(torch.randn(2, 3, 4, 4))
        (False, True)
    """
    return bool(inputs.is_floating_point() and inputs.numel() and float(inputs.min()) < -0.05)


def check_image_sizes(loader: DataLoader, input_key: InputKey = None, samples: int = 16) -> None:
    """Fail with the fix when the probe images do not all have one size (checked on up to ``samples`` items).

    The explanation stage fetches a unit's top samples from all over the probe set and stacks them: images of
    mixed sizes would make every round fail after a whole validation pass. Map-style datasets only (an iterable
    one is checked as it streams).

    Raises:
        ValueError: Naming two positions with different sizes and what to do.
    """
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset):
        return
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        return
    if n < 2:
        return
    picks = sorted({round(i * (n - 1) / (samples - 1)) for i in range(samples)}) if n > samples else range(n)
    seen: dict[tuple[int, ...], int] = {}
    for index in picks:
        try:
            inputs = batch_inputs(torch.utils.data.default_collate([dataset[index]]), input_key)
        except Exception:  # noqa: BLE001 - items the default collation cannot read: the loop's checks apply
            return
        seen.setdefault(tuple(inputs.shape[1:]), index)
        if len(seen) > 1:
            (a, i), (b, j) = list(seen.items())[:2]
            raise ValueError(
                f"the validation images have different sizes ({list(a)} at index {i}, {list(b)} at index {j}); "
                "the explanation stage stacks a unit's top images from the whole probe set, so give the validation "
                "set one size (e.g. transforms.Resize((224, 224)) or a CenterCrop in its transform)"
            )


def check_one_size(sizes: dict[tuple[int, ...], int]) -> None:
    """Fail with the fix when the recorded batches had inputs of more than one size (``{size: first batch}``).

    Example:
        >>> check_one_size({(3, 8, 8): 0})
        >>> check_one_size({(3, 8, 8): 0, (3, 9, 9): 4})
        Traceback (most recent call last):
        ...
        ValueError: the validation images have different sizes ([3, 8, 8] in batch 0, [3, 9, 9] in batch 4); ...
    """
    if len(sizes) < 2:
        return
    (a, i), (b, j) = list(sizes.items())[:2]
    raise ValueError(
        f"the validation images have different sizes ({list(a)} in batch {i}, {list(b)} in batch {j}); "
        "the explanation stage stacks a unit's top images from the whole probe set, so give the validation set one "
        "size (e.g. transforms.Resize((224, 224)) or a CenterCrop in its transform)"
    )


__all__ = [
    "check_image_sizes",
    "check_one_size",
    "class_names_of",
    "looks_normalised",
    "normalisation_of",
    "setup_val_loader",
]
