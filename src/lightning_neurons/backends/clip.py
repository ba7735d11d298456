"""open_clip image-text encoder: any architecture with a pretrained tag, a local checkpoint, or random weights.

Example:
    >>> from lightning_neurons.backends.clip import load_clip_encoder
    >>> encoder = load_clip_encoder("ViT-B-16", "laion2b_s34b_b88k")  # doctest: +SKIP
    >>> encoder.encode_texts(["a cat", "a car"]).shape  # doctest: +SKIP
    torch.Size([2, 512])
"""

from __future__ import annotations

import contextlib
import difflib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_neurons.backends.base import (
    ModelLoadError,
    cached_model,
    model_load_error,
    prepare_images,
    resolve_device,
)

DEFAULT_MODEL = "ViT-B-16"
DEFAULT_PRETRAINED = "laion2b_s34b_b88k"


class OpenClipEncoder:
    """Image-text encoder around an open_clip model.

    Images are resized and normalised as tensors (no PIL round-trip); on CUDA the towers run under fp16/bf16
    autocast. Outputs are L2-normalised float32 on the CPU.

    Args:
        model: An open_clip ``CLIP``-like model with ``encode_image`` / ``encode_text``.
        tokenizer: Its open_clip tokenizer.
        name: Identifier used in logs and embedding caches.
        batch_size: Images (and texts) per forward pass.
        resize_mode: ``"shortest"`` (resize + centre crop, as CLIP was trained) or ``"squash"``.
        cacheable: Whether embeddings may be cached on disk under ``name`` (``False`` for random weights).

    Example:
        >>> encoder = load_clip_encoder("ViT-B-16", pretrained=None, device="cpu")  # doctest: +SKIP
        >>> encoder.encode_images(torch.rand(2, 3, 100, 120)).shape  # doctest: +SKIP
        torch.Size([2, 512])
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        name: str,
        batch_size: int = 256,
        resize_mode: str = "shortest",
        cacheable: bool = True,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.batch_size = batch_size
        self.resize_mode = resize_mode
        self.cacheable = cacheable
        cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
        size = cfg.get("size", getattr(model.visual, "image_size", 224))
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)  # type: ignore[assignment]
        self.mean = tuple(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)))
        self.std = tuple(cfg.get("std", (0.26862954, 0.26130258, 0.27577711)))

    @property
    def device(self) -> torch.device:
        """The model's device."""
        return next(self.model.parameters()).device

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast(device_type="cuda", dtype=dtype)

    @torch.inference_mode()
    def encode_images(self, images: Tensor) -> Tensor:
        """Embed float ``[N, 3, H, W]`` images in ``[0, 1]``; returns L2-normalised float32 ``[N, D]`` on the CPU."""
        outs = []
        for start in range(0, images.shape[0], self.batch_size):
            chunk = images[start : start + self.batch_size].to(self.device, non_blocking=True)
            pixels = prepare_images(chunk, self.image_size, self.mean, self.std, self.resize_mode)
            with self._autocast():
                feats = self.model.encode_image(pixels)
            outs.append(F.normalize(feats.float(), dim=-1).cpu())
        if not outs:
            return torch.empty(0, self.embed_dim)
        return torch.cat(outs)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        """Embed texts; returns L2-normalised float32 ``[len(texts), D]`` on the CPU."""
        outs = []
        texts = list(texts)
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(texts[start : start + self.batch_size]).to(self.device)
            with self._autocast():
                feats = self.model.encode_text(tokens)
            outs.append(F.normalize(feats.float(), dim=-1).cpu())
        if not outs:
            return torch.empty(0, self.embed_dim)
        return torch.cat(outs)

    @property
    def embed_dim(self) -> int:
        """Dimension of the joint embedding space."""
        proj = getattr(self.model, "text_projection", None)
        if isinstance(proj, Tensor):
            return int(proj.shape[-1])
        return int(self.encode_texts(["x"]).shape[-1])


def _weights_location(model_name: str, pretrained: str, cache_dir: str | os.PathLike[str] | None) -> str:
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model_name, pretrained) or {}
    if cache_dir is None:
        from huggingface_hub import constants

        cache_dir = constants.HF_HUB_CACHE
    hub = cfg.get("hf_hub") or cfg.get("url") or "?"
    return f"open_clip pretrained tag {pretrained!r} -> {hub} (cache dir {cache_dir})"


def _name_for(model_name: str, pretrained: str | None) -> str:
    if pretrained is None:
        return f"open_clip:{model_name}:random"
    path = Path(pretrained).expanduser()
    if path.is_file():
        # Size and mtime in the name, so a replaced checkpoint does not reuse stale cached embeddings.
        stat = path.stat()
        return f"open_clip:{model_name}:{path.resolve()}@{stat.st_size}-{stat.st_mtime_ns}"
    return f"open_clip:{model_name}:{pretrained}"


def load_clip_encoder(
    model_name: str = DEFAULT_MODEL,
    pretrained: str | os.PathLike[str] | None = DEFAULT_PRETRAINED,
    device: str | torch.device | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 256,
    resize_mode: str = "shortest",
) -> OpenClipEncoder:
    """Load an open_clip encoder once per process.

    Args:
        model_name: An open_clip architecture (``open_clip.list_models()``), or ``"hf-hub:org/repo"`` /
            ``"local-dir:/path"`` (then ``pretrained`` is ignored).
        pretrained: A pretrained tag (``open_clip.list_pretrained_tags_by_model(model_name)``), a local checkpoint
            file, or ``None`` for random weights (benchmarks and tests).
        device: Target device; ``None`` picks the best available.
        cache_dir: Download cache directory override.
        batch_size: Images (and texts) per forward pass.
        resize_mode: ``"shortest"`` (resize + centre crop) or ``"squash"`` (keep the whole crop).

    Raises:
        ModelLoadError: If the architecture is unknown or the weights cannot be found or read; the message names
            the model, where it was looked for, and how to pass a local checkpoint.

    Example:
        >>> encoder = load_clip_encoder("ViT-B-16", "/ckpt/open_clip_model.safetensors")  # doctest: +SKIP
    """
    import open_clip

    dev = resolve_device(device)
    pretrained = None if pretrained is None else os.fspath(pretrained)
    has_schema = model_name.startswith(("hf-hub:", "local-dir:"))
    if not has_schema and open_clip.get_model_config(model_name.replace("/", "-")) is None:
        close = difflib.get_close_matches(model_name, open_clip.list_models(), n=5)
        raise ModelLoadError(
            f"Unknown open_clip architecture {model_name!r}. Close matches: {close or 'none'}; "
            'see open_clip.list_models(). backend="embedded" needs no download and works offline.'
        )
    if has_schema:
        looked_in = model_name
    elif pretrained is None:
        looked_in = "nowhere (random weights)"
    elif pretrained in open_clip.list_pretrained_tags_by_model(model_name):
        looked_in = _weights_location(model_name, pretrained, cache_dir)
    else:
        looked_in = f"local checkpoint path {Path(pretrained).expanduser()}"
        if not Path(pretrained).expanduser().is_file():
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            message = model_load_error(
                f"open_clip model {model_name}",
                pretrained,
                f"{looked_in} (not a file, and not one of the known tags {tags})",
                "pretrained",
                "/path/to/open_clip_model.safetensors",
            )
            raise ModelLoadError(message)

    def build() -> tuple[Any, Any]:
        kwargs: dict[str, Any] = {"device": dev, "cache_dir": None if cache_dir is None else os.fspath(cache_dir)}
        if not has_schema:
            local = pretrained is not None and Path(pretrained).expanduser().is_file()
            kwargs["pretrained"] = str(Path(str(pretrained)).expanduser()) if local else pretrained
        # Only the CLIP checkpoint may load weights: never fetch separate tower weights (e.g. an HF text tower).
        model = open_clip.create_model(model_name, pretrained_text=False, **kwargs)
        tokenizer = open_clip.get_tokenizer(model_name, cache_dir=None if cache_dir is None else os.fspath(cache_dir))
        return model.eval(), tokenizer

    try:
        model, tokenizer = cached_model(("open_clip", model_name, pretrained, str(dev), str(cache_dir)), build)
    except (OSError, RuntimeError, ValueError) as exc:
        message = model_load_error(
            f"open_clip model {model_name}",
            str(pretrained),
            looked_in,
            "pretrained",
            "/path/to/open_clip_model.safetensors",
            exc,
        )
        raise ModelLoadError(message) from exc
    return OpenClipEncoder(
        model,
        tokenizer,
        name=_name_for(model_name, pretrained),
        batch_size=batch_size,
        resize_mode=resize_mode,
        cacheable=pretrained is not None or has_schema,
    )
