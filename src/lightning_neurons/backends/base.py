"""The small interfaces every foundation-model backend implements.

A backend is three optional parts: an image-text encoder (required: scoring needs it), a captioner and
a text generator (only for the describe stage and the LLM vocabulary). Each model family lives in its own
module (``embedded``, ``clip``, ``hf``) and returns a :class:`Backend`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor


class ModelLoadError(RuntimeError):
    """A foundation model could not be loaded; the message says which, where it was looked for, and what to do."""


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
    """

    name: str
    encoder: ImageTextEncoder
    captioner: Captioner | None = None
    generator: TextGenerator | None = None
    text_encoder: ImageTextEncoder | None = None

    def encode_descriptions(self, texts: Sequence[str]) -> Tensor:
        """Embed descriptions for drift similarity (text-text)."""
        return (self.text_encoder or self.encoder).encode_texts(texts)
