"""Optional describe stage: caption a unit's top crops and merge captions and top concepts into one phrase.

Describe-and-Dissect's pipeline in small: a captioner writes one caption per crop, a text generator is asked
for the one short phrase the captions and the best concepts have in common, and the answer is cleaned up to a
few words. The pipeline re-scores the phrase like any concept and keeps it only when it scores higher.

Example:
    >>> clean_phrase('Answer: "Red and white stripes." The neuron...')
    'red and white stripes'
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lightning_neurons.backends.base import Captioner, TextGenerator

_PREFIXES = re.compile(
    r"^(answer|phrase|output|response|concept|the common (concept|theme|feature) is|common concept|"
    r"they (all )?(show|contain|depict)|it is|these are|this is)\s*[:\-]?\s*",
    re.IGNORECASE,
)
_ARTICLES = {"a", "an", "the"}


def build_prompt(captions: Sequence[str], concepts: Sequence[str], max_words: int = 6) -> str:
    """The instruction given to the text generator for one unit.

    Example:
        >>> "stripes" in build_prompt(["a zebra"], ["stripes"])
        True
    """
    lines = "\n".join(f"- {c.strip()}" for c in captions if c.strip())
    return (
        "Several image regions all strongly activate the same neuron of a vision network.\n"
        f"Captions of the regions:\n{lines}\n"
        f"Concepts that match the regions best: {', '.join(concepts)}.\n"
        f"In at most {max_words} words, name the one visual concept the regions have in common. "
        "Answer with the phrase only."
    )


def clean_phrase(text: str, max_words: int = 6) -> str:
    """Reduce a generator answer to a short lower-case phrase.

    Keeps the first non-empty line and its first sentence, drops answer prefixes, quotes, leading articles
    and trailing punctuation, and keeps at most ``max_words`` words. Returns ``""`` when nothing is left.
    """
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = _PREFIXES.sub("", line)
    line = re.split(r"(?<=[A-Za-z0-9])[.!?][\"']?(?:\s|$)", line, maxsplit=1)[0]
    line = re.sub(r"[\"'`*_#<>\[\](){}]", "", line)
    words = [w for w in re.split(r"\s+", line.strip().lower()) if w]
    while words and words[0] in _ARTICLES:
        words = words[1:]
    phrase = " ".join(words[:max_words])
    return phrase.strip(" .,;:!?-")


def describe_units(
    captioner: Captioner,
    generator: TextGenerator,
    unit_crops: Sequence[Sequence[int]],
    load_crops: Callable[[list[int]], Tensor],
    unit_concepts: Sequence[Sequence[str]],
    *,
    max_words: int = 6,
    max_new_tokens: int = 24,
    batch_size: int = 32,
) -> list[str]:
    """One short phrase per unit from the captions of its top crops and its top concepts.

    Every unique crop is captioned once, however many units use it.

    Args:
        captioner: Writes one caption per image.
        generator: Merges captions and concepts into a phrase.
        unit_crops: Per unit, the unique-crop indices of its top crops to caption.
        load_crops: Returns the float ``[n, 3, s, s]`` images of unique-crop indices.
        unit_concepts: Per unit, its best concepts (best first).
        max_words: Phrase length limit.
        max_new_tokens: Generation budget per unit.
        batch_size: Crops per captioner call.

    Returns:
        One phrase per unit; an empty string where the answer could not be cleaned into a phrase.

    Example:
        >>> class Cap:
        ...     name = "c"
        ...     def caption(self, images): return ["a striped shirt"] * len(images)
        >>> class Gen:
        ...     name = "g"
        ...     def generate(self, prompt, max_new_tokens=128): return "Striped fabric."
        >>> describe_units(Cap(), Gen(), [[0, 1]], lambda ids: torch.zeros(len(ids), 3, 8, 8), [["stripes"]])
        ['striped fabric']
    """
    wanted = sorted({int(i) for crops in unit_crops for i in crops})
    captions: dict[int, str] = {}
    for start in range(0, len(wanted), batch_size):
        ids = wanted[start : start + batch_size]
        with torch.no_grad():
            texts = captioner.caption(load_crops(ids))
        captions.update(zip(ids, texts))
    phrases = []
    for crops, concepts in zip(unit_crops, unit_concepts):
        prompt = build_prompt([captions[int(i)] for i in crops], list(concepts), max_words)
        phrases.append(clean_phrase(generator.generate(prompt, max_new_tokens=max_new_tokens), max_words))
    return phrases


__all__ = ["build_prompt", "clean_phrase", "describe_units"]
