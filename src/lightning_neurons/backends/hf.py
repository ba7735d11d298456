"""transformers backends: a BLIP captioner and a causal-LM text generator, by hub id or local path.

Example:
    >>> from lightning_neurons.backends.hf import load_blip_captioner, load_text_generator
    >>> captioner = load_blip_captioner("Salesforce/blip-image-captioning-base")  # doctest: +SKIP
    >>> generator = load_text_generator("Qwen/Qwen2.5-0.5B-Instruct")  # doctest: +SKIP
    >>> generator.generate("Name three textures.")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_neurons.backends.base import cached_model, model_load_error, prepare_images, resolve_device

DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-base"
DEFAULT_GENERATOR = "Qwen/Qwen2.5-0.5B-Instruct"


def is_local_source(source: str | os.PathLike[str]) -> bool:
    """Whether ``source`` names a local path rather than a hub id (``org/name``).

    Example:
        >>> is_local_source("/models/blip"), is_local_source("Salesforce/blip-image-captioning-base")
        (True, False)
    """
    text = os.fspath(source)
    if Path(text).expanduser().exists():
        return True
    return text.startswith(("/", ".", "~")) or "\\" in text or text.count("/") > 1


def hub_location(source: str, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """Human-readable description of where a hub id or path is looked for (for error messages)."""
    if is_local_source(source):
        return f"local path {Path(source).expanduser()}"
    if cache_dir is None:
        from huggingface_hub import constants

        cache_dir = constants.HF_HUB_CACHE
    return f"Hugging Face Hub id {source!r} (cache dir {cache_dir})"


def default_dtype(device: torch.device) -> torch.dtype:
    """Half precision on CUDA (bf16 where supported), float32 elsewhere."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class BlipCaptioner:
    """Captions images with a transformers BLIP model (``BlipForConditionalGeneration``).

    Args:
        model: The loaded BLIP model (eval mode, on ``device``).
        processor: Its ``BlipProcessor`` (image size, normalisation and tokenizer are read from it).
        name: Identifier used in logs and caches.
        prompt: Optional caption prefix such as ``"a photo of"``; it is removed from the returned captions.
        max_new_tokens: Caption length limit.
        batch_size: Images per forward pass.

    Example:
        >>> captioner = load_blip_captioner("Salesforce/blip-image-captioning-base")  # doctest: +SKIP
        >>> captioner.caption(torch.rand(2, 3, 64, 64))  # doctest: +SKIP
        ['a blurry photo of ...', '...']
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        name: str,
        prompt: str | None = None,
        max_new_tokens: int = 30,
        batch_size: int = 32,
    ) -> None:
        self.model = model
        self.processor = processor
        self.name = name
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        image_processor = processor.image_processor
        size = image_processor.size
        self.size = (size["height"], size["width"]) if "height" in size else (size["shortest_edge"],) * 2
        self.mean = tuple(image_processor.image_mean)
        self.std = tuple(image_processor.image_std)

    @property
    def device(self) -> torch.device:
        """The model's device."""
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def caption(self, images: Tensor) -> list[str]:
        """Caption float ``[N, 3, H, W]`` images in ``[0, 1]``; returns one stripped caption per image."""
        dtype = next(self.model.parameters()).dtype
        captions: list[str] = []
        for start in range(0, images.shape[0], self.batch_size):
            chunk = images[start : start + self.batch_size].to(self.device)
            # BLIP's processor squashes to a fixed square, so do the same on tensors.
            pixels = prepare_images(chunk, self.size, self.mean, self.std, resize_mode="squash").to(dtype)
            kwargs: dict[str, Any] = {"pixel_values": pixels, "max_new_tokens": self.max_new_tokens, "do_sample": False}
            if self.prompt:
                tokens = self.processor.tokenizer([self.prompt] * len(chunk), return_tensors="pt")
                kwargs["input_ids"] = tokens["input_ids"].to(self.device)
                kwargs["attention_mask"] = tokens["attention_mask"].to(self.device)
            out = self.model.generate(**kwargs)
            texts = self.processor.tokenizer.batch_decode(out, skip_special_tokens=True)
            captions.extend(self._strip_prompt(t) for t in texts)
        return captions

    def _strip_prompt(self, text: str) -> str:
        text = " ".join(text.split())
        if self.prompt and text.lower().startswith(self.prompt.lower()):
            text = text[len(self.prompt) :]
        return text.strip()


class CausalLMGenerator:
    """Answers prompts with a transformers causal LM, using its chat template when it has one.

    Decoding is greedy (deterministic), so cached LLM vocabularies are reproducible.

    Args:
        model: The loaded ``AutoModelForCausalLM`` (eval mode).
        tokenizer: Its tokenizer.
        name: Identifier used in logs and caches.
        repetition_penalty: Discourages the loops small models fall into (1.0 disables it).
        system_prompt: Optional system message for chat models.

    Example:
        >>> generator = load_text_generator("Qwen/Qwen2.5-0.5B-Instruct")  # doctest: +SKIP
        >>> generator.generate("List three colours.", max_new_tokens=20)  # doctest: +SKIP
        'red, green, blue'
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        name: str,
        repetition_penalty: float = 1.1,
        system_prompt: str | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.repetition_penalty = repetition_penalty
        self.system_prompt = system_prompt

    @property
    def device(self) -> torch.device:
        """The model's device."""
        return next(self.model.parameters()).device

    def _encode(self, prompt: str) -> dict[str, Tensor]:
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}]
            if self.system_prompt:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            encoded = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
        else:
            encoded = self.tokenizer(prompt, return_tensors="pt")
        return {k: v.to(self.device) for k, v in encoded.items() if k in ("input_ids", "attention_mask")}

    @torch.inference_mode()
    def generate(self, prompt: str, max_new_tokens: int = 128) -> str:
        """Answer one user prompt; returns only the newly generated text, stripped."""
        from transformers import GenerationConfig

        inputs = self._encode(prompt)
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = eos[0] if isinstance(eos, list) else eos
        # An explicit config: greedy, without the sampling defaults some checkpoints ship (avoids warnings).
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            repetition_penalty=self.repetition_penalty,
            eos_token_id=eos,
            pad_token_id=pad,
        )
        out = self.model.generate(**inputs, generation_config=config)
        new_tokens = out[0, inputs["input_ids"].shape[1] :]
        return self.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def load_blip_captioner(
    source: str = DEFAULT_CAPTIONER,
    device: str | torch.device | None = None,
    *,
    prompt: str | None = None,
    max_new_tokens: int = 30,
    dtype: torch.dtype | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> BlipCaptioner:
    """Load a BLIP captioner from a hub id or a local directory (``save_pretrained`` layout), once per process.

    Args:
        source: Hub id (default ``Salesforce/blip-image-captioning-base``) or local directory.
        device: Target device; ``None`` picks the best available.
        prompt: Optional caption prefix (conditional captioning).
        max_new_tokens: Caption length limit.
        dtype: Weight dtype; default half precision on CUDA, float32 otherwise.
        cache_dir: Hugging Face cache directory override.

    Raises:
        ModelLoadError: If the weights cannot be found or read; the message says where they were looked for.

    Example:
        >>> captioner = load_blip_captioner("/models/blip-base", device="cpu")  # doctest: +SKIP
    """
    from lightning_neurons.backends.base import ModelLoadError

    dev = resolve_device(device)
    dtype = dtype or default_dtype(dev)
    source = os.fspath(source)

    def build() -> tuple[Any, Any]:
        from transformers import BlipForConditionalGeneration, BlipProcessor

        path = _checked_path(source)
        processor = BlipProcessor.from_pretrained(path, cache_dir=cache_dir)
        model = BlipForConditionalGeneration.from_pretrained(path, cache_dir=cache_dir, dtype=dtype)
        return model.to(dev).eval(), processor  # type: ignore[arg-type]

    try:
        model, processor = cached_model(("blip", source, str(dev), str(dtype), str(cache_dir)), build)
    except (OSError, ValueError, FileNotFoundError) as exc:
        message = model_load_error(
            "BLIP captioner", source, hub_location(source, cache_dir), "captioner", "/path/to/blip_dir", exc
        )
        raise ModelLoadError(message) from exc
    return BlipCaptioner(model, processor, name=f"blip:{source}", prompt=prompt, max_new_tokens=max_new_tokens)


def load_text_generator(
    source: str = DEFAULT_GENERATOR,
    device: str | torch.device | None = None,
    *,
    gguf_file: str | None = None,
    dtype: torch.dtype | None = None,
    repetition_penalty: float = 1.1,
    system_prompt: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    name: str | None = None,
) -> CausalLMGenerator:
    """Load any transformers causal LM (hub id, local directory, or a directory plus a GGUF file) once per process.

    Args:
        source: Hub id or local directory.
        device: Target device; ``None`` picks the best available.
        gguf_file: Name of a GGUF file inside ``source`` (transformers de-quantises it; needs ``gguf``).
        dtype: Weight dtype; default half precision on CUDA, float32 otherwise.
        repetition_penalty: Passed to :class:`CausalLMGenerator`.
        system_prompt: Passed to :class:`CausalLMGenerator`.
        cache_dir: Hugging Face cache directory override.
        name: Identifier for logs and caches; default ``causal_lm:<source>[/<gguf_file>]``.

    Raises:
        ModelLoadError: If the model cannot be found or read.

    Example:
        >>> generator = load_text_generator("HuggingFaceTB/SmolLM2-360M-Instruct")  # doctest: +SKIP
    """
    from lightning_neurons.backends.base import ModelLoadError

    dev = resolve_device(device)
    dtype = dtype or default_dtype(dev)
    source = os.fspath(source)

    def build() -> tuple[Any, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = _checked_path(source)
        extra: dict[str, Any] = {"cache_dir": cache_dir}
        if gguf_file is not None:
            extra["gguf_file"] = gguf_file
        tokenizer = AutoTokenizer.from_pretrained(path, **extra)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra)
        return model.to(dev).eval(), tokenizer  # type: ignore[arg-type]

    key = ("causal_lm", source, gguf_file, str(dev), str(dtype), str(cache_dir))
    try:
        model, tokenizer = cached_model(key, build)
    except (OSError, ValueError, FileNotFoundError) as exc:
        shown = source if gguf_file is None else f"{source} ({gguf_file})"
        message = model_load_error(
            "text generator", shown, hub_location(source, cache_dir), "generator", "/path/to/causal_lm_dir", exc
        )
        raise ModelLoadError(message) from exc
    name = name or f"causal_lm:{source}" + (f"/{gguf_file}" if gguf_file else "")
    return CausalLMGenerator(
        model, tokenizer, name=name, repetition_penalty=repetition_penalty, system_prompt=system_prompt
    )


def _checked_path(source: str) -> str:
    """A hub id as it is, or a local path expanded and checked to exist."""
    if not is_local_source(source):
        return source
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no such directory: {source}")
    return str(path)
