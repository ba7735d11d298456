"""The small interfaces every foundation-model backend implements.

A backend is three optional parts: an image-text encoder (required: scoring needs it), a captioner and
a text generator (only for the describe stage and the LLM vocabulary). Each model family lives in its own
module (``embedded``, ``clip``, ``hf``) and returns a :class:`Backend`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

T = TypeVar("T")


class ModelLoadError(RuntimeError):
    """A foundation model could not be loaded; the message says which, where it was looked for, and what to do."""


@runtime_checkable
class TextEncoder(Protocol):
    """Embeds texts (descriptions compared with each other: drift similarity, evaluation)."""

    name: str

    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        """Embed texts; returns L2-normalised float32 ``[len(texts), D]`` on the CPU."""
        ...


@runtime_checkable
class ImageTextEncoder(Protocol):
    """Embeds images and texts into one space where the dot product is a similarity."""

    name: str

    def encode_images(self, images: Tensor) -> Tensor:
        """Embed RGB images.

        Args:
            images: float ``[N, 3, H, W]`` in ``[0, 1]``, any ``H, W`` (the encoder resizes and normalises).

        Returns:
            L2-normalised float32 ``[N, D]`` on the CPU.
        """
        ...

    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        """Embed texts; returns L2-normalised float32 ``[len(texts), D]`` on the CPU."""
        ...


@runtime_checkable
class Captioner(Protocol):
    """Writes one short caption per image."""

    name: str

    def caption(self, images: Tensor) -> list[str]:
        """Caption float ``[N, 3, H, W]`` images in ``[0, 1]``."""
        ...


@runtime_checkable
class TextGenerator(Protocol):
    """A (small) instruction-following language model."""

    name: str

    def generate(self, prompt: str, max_new_tokens: int = 128) -> str:
        """Answer one user prompt; returns only the newly generated text."""
        ...


@dataclass
class Backend:
    """A loaded set of foundation models.

    Args:
        name: ``"embedded"``, ``"clip"``, ``"hf"`` or a user name.
        encoder: The image-text encoder used for scoring.
        captioner: Optional captioner for the describe stage.
        generator: Optional text generator for the LLM vocabulary and the describe stage.
        text_encoder: Encoder of descriptions for drift similarity; defaults to ``encoder``.
        basis_concepts: Concepts the encoder builds its image embeddings from (the embedded backend's ImageNet
            class names). They are left out of the built-in general vocabulary: an image embedding that mixes
            them is closest to one of them by construction, so they would win whether or not they fit.
    """

    name: str
    encoder: ImageTextEncoder
    captioner: Captioner | None = None
    generator: TextGenerator | None = None
    text_encoder: TextEncoder | None = None
    basis_concepts: frozenset[str] = frozenset()

    def encode_descriptions(self, texts: Sequence[str]) -> Tensor:
        """Embed descriptions for drift similarity (text-text)."""
        return (self.text_encoder or self.encoder).encode_texts(texts)


#: Attributes of an image encoder that change its image embeddings without changing its name (per-call options).
EMBEDDING_ATTRIBUTES = ("image_size", "resize_mode", "compute_dtype")


def encoder_label(encoder: Any) -> str:
    """The encoder's name with the per-call options that change its image embeddings (:data:`EMBEDDING_ATTRIBUTES`).

    What a round's settings fingerprint records as its model: the same encoder at another image size, or in bfloat16
    instead of float32 (``precision="auto"`` differs between CPUs), embeds crops differently, so its rounds start a
    new drift baseline instead of counting the difference as drift.

    Example:
        >>> class Encoder:
        ...     name, image_size = "mobilenet", 224
        >>> encoder_label(Encoder())
        'mobilenet@image_size=224'
    """
    name = str(getattr(encoder, "name", type(encoder).__name__))
    parts = []
    for attribute in EMBEDDING_ATTRIBUTES:
        try:
            value = getattr(encoder, attribute)
        except Exception:  # noqa: BLE001 - an attribute the encoder cannot say is not part of its label
            continue
        parts.append(f"{attribute}={str(value).removeprefix('torch.')}")
    return f"{name}@{','.join(parts)}" if parts else name


#: Side of the crops cut for an encoder that does not say which images it takes (CLIP's and ImageNet's size).
DEFAULT_CROP_SIDE = 224


def encoder_input_side(encoder: Any) -> int | None:
    """The side of the square images an encoder embeds, where it says: its ``image_size`` (an int or a square pair).

    Crops cut at this side reach the encoder's network without being resized again (a crop cut at 224 px for an
    encoder that resizes to 128 px is resampled twice, and costs 3x the pixels to cut).

    Example:
        >>> class Encoder:
        ...     image_size = (128, 128)
        >>> encoder_input_side(Encoder()), encoder_input_side(object())
        (128, None)
    """
    size = getattr(encoder, "image_size", None)
    if isinstance(size, (tuple, list)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    return None


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The given device, or the best available one (CUDA, then Apple MPS, then CPU).

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def prepare_images(
    images: Tensor,
    size: int | tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    resize_mode: str = "shortest",
) -> Tensor:
    """Resize and normalise ``[0, 1]`` images on their own device, without a PIL round-trip.

    Args:
        images: Float ``[N, 3, H, W]`` (or ``[3, H, W]``) in ``[0, 1]``; one channel is repeated to three.
        size: Output side (or ``(height, width)``).
        mean: Per-channel mean of the model's normalisation.
        std: Per-channel standard deviation of the model's normalisation.
        resize_mode: ``"shortest"`` resizes the shorter side to ``size`` then centre-crops (as CLIP and
            ImageNet models were trained); ``"squash"`` resizes straight to ``size`` and so keeps the whole
            region, which suits tight region crops.

    Returns:
        Float ``[N, 3, size, size]`` normalised images.

    Example:
        >>> prepare_images(torch.rand(2, 3, 50, 80), 32, (0.5,) * 3, (0.5,) * 3).shape
        torch.Size([2, 3, 32, 32])
    """
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4:
        raise ValueError(f"expected images of shape [N, 3, H, W], got {tuple(images.shape)}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    images = images.float()
    out_h, out_w = (size, size) if isinstance(size, int) else size
    h, w = images.shape[-2:]
    if resize_mode == "shortest":
        scale = max(out_h / h, out_w / w)
        new_h, new_w = max(out_h, round(h * scale)), max(out_w, round(w * scale))
    elif resize_mode == "squash":
        new_h, new_w = out_h, out_w
    else:
        raise ValueError(f"resize_mode must be 'shortest' or 'squash', got {resize_mode!r}")
    if (new_h, new_w) != (h, w):
        # Antialiasing matters when shrinking large photos; it is a no-op cost when upsampling small crops.
        images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    top, left = (new_h - out_h) // 2, (new_w - out_w) // 2
    images = images[..., top : top + out_h, left : left + out_w].clamp(0.0, 1.0)
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return images.sub_(mean_t).div_(std_t)  # the clamp made a new tensor: normalised in place, the same numbers


_MODEL_CACHE: dict[tuple[Any, ...], Any] = {}


def cached_model(key: tuple[Any, ...], factory: Callable[[], T]) -> T:
    """Build a model once per process and key (loading weights is the slow part of every run).

    Example:
        >>> cached_model(("doc", 1), lambda: [1]) is cached_model(("doc", 1), lambda: [2])
        True
    """
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = factory()
    return _MODEL_CACHE[key]


def clear_model_cache() -> None:
    """Drop every model cached by :func:`cached_model` (frees memory; the next load reads weights again)."""
    _MODEL_CACHE.clear()


def model_load_error(
    what: str, source: str, looked_in: str, kwarg: str, example: str, cause: BaseException | None = None
) -> str:
    """One error message for a model that could not be loaded: which, where it was looked for, what to do.

    Args:
        what: The kind of model, e.g. ``"BLIP captioner"``.
        source: The hub id, tag or path that was asked for.
        looked_in: Where it was looked for (hub id and cache directory, or the local path).
        kwarg: The ``backend_kwargs`` key that takes a local path.
        example: An example local path for that key.
        cause: The underlying exception, summarised on the last line.
    """
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    lines = [
        f"Could not load the {what} {source!r}.",
        f"Looked for it in: {looked_in}" + (" (HF_HUB_OFFLINE is set, so nothing was downloaded)." if offline else "."),
        f'To use local weights pass a path: backend_kwargs={{"{kwarg}": "{example}"}}.',
        'backend="embedded" needs no download and works offline.',
    ]
    if cause is not None:
        first = (str(cause).strip().splitlines() or [""])[0]
        lines.append(f"Cause: {type(cause).__name__}: {first}")
    return "\n".join(lines)
