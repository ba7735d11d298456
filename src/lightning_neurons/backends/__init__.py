"""Foundation-model backends behind small interfaces, and the :func:`load_backend` registry.

Example:
    >>> from lightning_neurons.backends import load_backend
    >>> backend = load_backend("embedded", device="cpu")  # doctest: +SKIP
    >>> backend.encoder.encode_texts(["striped", "red"]).shape  # doctest: +SKIP
    torch.Size([2, 384])
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from lightning_neurons.backends.base import (
    Backend,
    Captioner,
    ImageTextEncoder,
    ModelLoadError,
    TextEncoder,
    TextGenerator,
    resolve_device,
)

BACKENDS = ("auto", "embedded", "clip", "hf")

#: ``backend_kwargs`` keys that only the CLIP choice of ``backend="auto"`` reads; the rest go to the offline pack.
_AUTO_CLIP_KEYS = ("model_name", "pretrained", "cache_dir", "captioner")
#: Keys both choices read.
_AUTO_SHARED_KEYS = ("batch_size", "resize_mode")

__all__ = [
    "BACKENDS",
    "Backend",
    "Captioner",
    "ImageTextEncoder",
    "TextEncoder",
    "ModelLoadError",
    "TextGenerator",
    "load_backend",
    "resolve_device",
]


def _load_clip(device: torch.device, kwargs: dict[str, Any]) -> Backend:
    from lightning_neurons.backends.clip import DEFAULT_MODEL, DEFAULT_PRETRAINED, load_clip_encoder
    from lightning_neurons.backends.hf import load_blip_captioner, load_text_generator

    captioner = kwargs.pop("captioner", None)
    generator = kwargs.pop("generator", None)
    encoder = load_clip_encoder(
        kwargs.pop("model_name", DEFAULT_MODEL), kwargs.pop("pretrained", DEFAULT_PRETRAINED), device, **kwargs
    )
    return Backend(
        name="clip",
        encoder=encoder,
        captioner=None if captioner is None else load_blip_captioner(captioner, device),
        generator=None if generator is None else load_text_generator(generator, device),
    )


def _load_hf(device: torch.device, kwargs: dict[str, Any]) -> Backend:
    from lightning_neurons.backends.hf import (
        DEFAULT_CAPTIONER,
        DEFAULT_GENERATOR,
        load_blip_captioner,
        load_text_generator,
    )

    captioner = kwargs.pop("captioner", DEFAULT_CAPTIONER)
    generator = kwargs.pop("generator", DEFAULT_GENERATOR)
    encoder_name = kwargs.pop("encoder", "clip")
    encoder_kwargs = dict(kwargs.pop("encoder_kwargs", None) or {})
    encoder_kwargs.update(kwargs)  # remaining keys (model_name, pretrained, top_t, ...) go to the encoder
    if encoder_name == "clip":
        inner = _load_clip(device, encoder_kwargs)
    elif encoder_name == "embedded":
        from lightning_neurons.backends.embedded import load_embedded_backend

        inner = load_embedded_backend(device, generator=False, **encoder_kwargs)
    else:
        raise ValueError(f"hf backend: encoder must be 'clip' or 'embedded', got {encoder_name!r}")
    return Backend(
        name="hf",
        encoder=inner.encoder,
        captioner=None if captioner is None else load_blip_captioner(captioner, device),
        generator=None if generator is None else load_text_generator(generator, device),
        text_encoder=inner.text_encoder,
        basis_concepts=inner.basis_concepts,
    )


def _load_auto(device: torch.device, kwargs: dict[str, Any]) -> Backend:
    from lightning_neurons.backends.auto import choose_auto, fallback_warning
    from lightning_neurons.backends.embedded import load_embedded_backend

    clip_keys = {k: kwargs.pop(k) for k in _AUTO_CLIP_KEYS if k in kwargs}
    shared = {k: kwargs.pop(k) for k in _AUTO_SHARED_KEYS if k in kwargs}
    generator = kwargs.get("generator", True)
    choice = choose_auto(clip_keys.get("model_name"), clip_keys.get("pretrained"), cache_dir=clip_keys.get("cache_dir"))
    reason = choice.reason
    if choice.backend == "clip":
        options: dict[str, Any] = {**clip_keys, **shared, "model_name": choice.model_name}
        options["pretrained"] = choice.pretrained
        options.setdefault("cache_dir", choice.cache_dir)
        if isinstance(generator, str):
            options["generator"] = generator
        try:
            backend = _load_clip(device, options)
        except ModelLoadError as exc:
            reason = f"open_clip {choice.model_name} could not be loaded ({str(exc).splitlines()[0]})"
        else:
            if generator is True:
                # The LLM vocabulary keeps working offline: the pack's small text generator, loaded on first use.
                from lightning_neurons.backends.embedded import smollm_generator

                try:
                    backend = dataclasses.replace(backend, generator=smollm_generator(device, lazy=True))
                except ModelLoadError:
                    pass  # no pack installed: CLIP without a generator, as backend="clip" gives
            return backend
    fallback_warning(reason)
    if isinstance(generator, str):
        kwargs["generator"] = True
    return load_embedded_backend(device, **{**kwargs, **shared})


def load_backend(
    spec: str | Backend = "embedded", *, device: str | torch.device | None = None, **kwargs: Any
) -> Backend:
    """Load a backend by name (models are cached per process), or pass a :class:`Backend` through.

    Args:
        spec: ``"auto"`` (an open_clip model whose weights are cached or can be fetched, else the offline pack with
            one :class:`~lightning_neurons.backends.auto.AutoBackendWarning`; see
            :mod:`lightning_neurons.backends.auto`), ``"embedded"`` (offline pack: MobileNetV2 ConSE + MiniLM +
            SmolLM2), ``"clip"`` (open_clip encoder,
            optional BLIP captioner and causal-LM generator) or ``"hf"`` (an encoder, ``"clip"`` or ``"embedded"``,
            plus a BLIP captioner and a causal-LM generator), or a ready :class:`Backend`.
        device: Target device; ``None`` picks CUDA, then MPS, then CPU.
        **kwargs: Backend options.
            ``auto``: ``model_name``, ``pretrained``, ``cache_dir`` and ``captioner`` for the CLIP choice,
            ``batch_size`` and ``resize_mode`` for both, every other key for the offline pack.
            ``embedded``: the ConSE encoder's options as flat keys (``top_t``, ``template_weight``,
            ``temperature``, ``image_size``, ``views``, ``centre``, ``space``, ``text_temperature``,
            ``hypernym_weight``, ``hypernym_levels``, ``colour_weight``, ``colour_threshold``, ``batch_size``,
            ``resize_mode``, ``precision``; defaults and ranges on
            :class:`~lightning_neurons.backends.embedded.ConSESettings`)
            or one ``settings`` value, plus ``generator`` (bool), ``lazy_generator`` and ``keep_basis_concepts``
            (see :func:`~lightning_neurons.backends.embedded.load_embedded_backend`); an unknown key is a
            ``TypeError`` naming the closest ones.
            ``clip``: ``model_name`` (default ``"ViT-B-16"``), ``pretrained`` (tag, checkpoint path, or ``None`` for
            random weights; default ``"laion2b_s34b_b88k"``), ``cache_dir``, ``batch_size``, ``resize_mode``,
            ``captioner`` / ``generator`` (hub id or local path, default ``None``).
            ``hf``: ``encoder`` (``"clip"`` or ``"embedded"``), ``encoder_kwargs`` (or the encoder's keys directly),
            ``captioner`` (default ``Salesforce/blip-image-captioning-base``), ``generator`` (default
            ``Qwen/Qwen2.5-0.5B-Instruct``); ``None`` leaves a part out.

    Returns:
        The loaded :class:`Backend`.

    Raises:
        ValueError: For an unknown backend name (the message lists the choices), or an option out of range.
        TypeError: For an unknown option of the embedded backend (the message names the closest options).
        ModelLoadError: If weights cannot be found; the message says where they were looked for and what to do.

    Example:
        >>> backend = load_backend("embedded", device="cpu", generator=False)  # doctest: +SKIP
        >>> clip = load_backend("clip", pretrained="/ckpt/open_clip_model.safetensors")  # doctest: +SKIP
    """
    if isinstance(spec, Backend):
        return spec
    if not isinstance(spec, str) or spec not in BACKENDS:
        raise ValueError(f"unknown backend {spec!r}; choose one of {list(BACKENDS)} or pass a Backend instance")
    dev = resolve_device(device)
    options = dict(kwargs)
    if spec == "auto":
        return _load_auto(dev, options)
    if spec == "embedded":
        from lightning_neurons.backends.embedded import load_embedded_backend

        return load_embedded_backend(dev, **options)
    if spec == "clip":
        return _load_clip(dev, options)
    return _load_hf(dev, options)
