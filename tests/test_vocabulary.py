"""Vocabulary composition, LLM answer parsing, and the disk caches."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from lightning_neurons.concepts.vocabulary import (
    Vocabulary,
    general_concepts,
    llm_concepts,
    parse_llm_concepts,
)


class CountingEncoder:
    """A deterministic text encoder that counts its calls."""

    name = "counting-encoder"

    def __init__(self) -> None:
        self.calls = 0

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(images.flatten(1)[:, :8].float(), dim=-1)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        self.calls += 1
        rows = [[float(len(t)), float(sum(map(ord, t)) % 97), 1.0] for t in texts]
        return torch.nn.functional.normalize(torch.tensor(rows), dim=-1)


class FakeGenerator:
    name = "fake-llm"

    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.prompts: list[str] = []

    def generate(self, prompt: str, max_new_tokens: int = 128) -> str:
        self.prompts.append(prompt)
        return self.answer


def test_builtin_vocabulary_is_large_and_clean() -> None:
    concepts = general_concepts()
    assert len(concepts) >= 1000
    assert len(set(concepts)) == len(concepts)
    assert all(c == c.strip().lower() and c and "#" not in c for c in concepts)
    for expected in ("red", "striped", "wood", "circle", "wheel", "dog", "kitchen", "tabby"):
        assert expected in concepts


def test_sources_dedupe_in_stable_order(tmp_path: Path) -> None:
    user = tmp_path / "mine.txt"
    user.write_text("# my concepts\nRusty Bolt\n\ncat  # duplicate of a class\nrivet\n")
    vocab = Vocabulary(["classes", str(user), "general"], class_names=["Cat", "tabby_cat", "cat"], concepts=["rivet"])
    concepts = vocab.concepts
    assert concepts[:4] == ["cat", "tabby cat", "rusty bolt", "rivet"]
    assert len(concepts) == len(set(concepts)) and len(concepts) > 1000
    assert vocab.origin("Rusty Bolt") == str(user) and vocab.origin("red") == "general"
    assert "TABBY_CAT" in vocab and vocab[0] == "cat"
    again = Vocabulary(["classes", str(user), "general"], class_names=["Cat", "tabby_cat", "cat"])
    assert again.fingerprint == vocab.fingerprint


def test_classes_source_without_class_names_is_empty_and_exclude_works() -> None:
    vocab = Vocabulary(["classes"], concepts=["sky", "object", "thing"], exclude=["object"])
    assert vocab.concepts == ["sky", "thing"]


def test_missing_user_file_is_a_clear_error(tmp_path: Path) -> None:
    vocab = Vocabulary([str(tmp_path / "nope.txt")])
    with pytest.raises(FileNotFoundError, match=r"nope\.txt.*general"):
        _ = vocab.concepts


def test_llm_source_requires_generator() -> None:
    with pytest.raises(ValueError, match="generator"):
        Vocabulary(["llm"], class_names=["cat"])


def test_parse_llm_answer() -> None:
    answer = """Sure! Here are some visual concepts:
1. Pointed ears
2) Whiskers, striped fur; WHISKERS
- **Texture:** Fur
* the green grass
• a red collar.
3. an extremely long descriptive phrase that should be dropped
4. 42
5. R2-D2
Cat:
"""
    assert parse_llm_concepts(answer) == ["pointed ears", "whiskers", "striped fur", "fur", "green grass", "red collar"]


def test_llm_concepts_are_chunked_and_cached(tmp_path: Path) -> None:
    generator = FakeGenerator("1. Wheel\n2. Windshield\n3. Wing")
    classes = ["car", "truck", "airplane", "ship", "bird"]
    first = llm_concepts(generator, classes, classes_per_prompt=2, cache_dir=tmp_path, show_progress=False)
    assert first == ["wheel", "windshield", "wing"]
    assert len(generator.prompts) == 3 and "car, truck" in generator.prompts[0]
    again = llm_concepts(generator, classes, classes_per_prompt=2, cache_dir=tmp_path, show_progress=False)
    assert again == first and len(generator.prompts) == 3  # disk cache hit: no new generation
    llm_concepts(generator, classes[:4], classes_per_prompt=2, cache_dir=tmp_path, show_progress=False)
    assert len(generator.prompts) == 5  # other classes -> other key


def test_vocabulary_with_llm_source(tmp_path: Path) -> None:
    generator = FakeGenerator("- feathers\n- beak\n- bird")
    vocab = Vocabulary(["classes", "llm"], class_names=["bird"], generator=generator, cache_dir=tmp_path)
    assert vocab.concepts == ["bird", "feathers", "beak"]
    assert vocab.origin("beak") == "llm"


def test_embedding_disk_cache_hit(tmp_path: Path) -> None:
    encoder = CountingEncoder()
    vocab = Vocabulary(["general"], cache_dir=tmp_path, show_progress=False)
    first = vocab.embed(encoder, batch_size=500)
    assert first.shape == (len(vocab), 3) and encoder.calls == (len(vocab) + 499) // 500
    calls = encoder.calls
    second = Vocabulary(["general"], cache_dir=tmp_path, show_progress=False).embed(encoder)
    assert encoder.calls == calls and torch.equal(first, second)
    Vocabulary(["general"], concepts=["brand new concept"], cache_dir=tmp_path).embed(encoder)
    assert encoder.calls > calls  # another vocabulary -> another cache entry


def test_uncacheable_encoder_is_never_cached(tmp_path: Path) -> None:
    encoder = CountingEncoder()
    encoder.cacheable = False  # type: ignore[attr-defined]
    vocab = Vocabulary(["classes"], class_names=["a", "b"])
    vocab.embed(encoder, cache_dir=tmp_path)
    vocab.embed(encoder, cache_dir=tmp_path)
    assert encoder.calls == 2 and not (tmp_path / "embeddings").exists()


def test_default_cache_dir_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIGHTNING_NEURONS_CACHE", str(tmp_path / "c"))
    Vocabulary(["classes"], class_names=["x"]).embed(CountingEncoder())
    assert list((tmp_path / "c" / "embeddings").glob("counting-encoder-*.pt"))


def test_llm_vocabulary_with_real_smollm2(tmp_path: Path) -> None:
    from lightning_neurons.backends.embedded import smollm_generator

    generator = smollm_generator("cpu")
    concepts = llm_concepts(generator, ["cat", "car"], max_new_tokens=40, cache_dir=tmp_path, show_progress=False)
    assert concepts and all(c == c.lower() and len(c.split()) <= 4 for c in concepts)
    assert list((tmp_path / "llm_vocabulary").glob("smollm2-135m-instruct-q4_1-*.json"))


def test_exclude_general_filters_the_builtin_source_only() -> None:
    """A backend's basis concepts leave the general vocabulary but stay when they are the dataset's classes."""
    general = Vocabulary(["general"])
    assert "espresso" in general and "golf ball" in general
    vocab = Vocabulary(["general", "classes"], class_names=["golf ball"], exclude_general=["Espresso", "golf_ball"])
    assert "espresso" not in vocab
    assert "golf ball" in vocab and vocab.origin("golf ball") == "classes"
    assert len(vocab) == len(general) - 1


def test_parse_keeps_the_labels_of_prose_items_small_models_write() -> None:
    """Answers recorded from SmolLM2-135M: numbered labels followed by prose, which used to be dropped whole."""
    answer = (
        "A rocket has several visible components:\n\n"
        "1. Rocket Body - The main body that supports its structure (the upper part).\n"
        "2. **Battery**: A battery is located at each end (front) with two batteries connected to it in series\n"
        "3. Eyes: The most visible part in this feline creature is their eyes that shine with an otherworldly light\n"
        "4. Texture: soft fur\n"
        "5. Surroundings:\n"
    )
    assert parse_llm_concepts(answer) == ["rocket body", "battery", "eyes", "soft fur"]
