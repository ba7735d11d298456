"""The ConSE encoder's options on the real offline pack: test-time views, centring, class space, WordNet hypernyms."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

embedded = pytest.importorskip("lightning_neurons.backends.embedded")


class _MemoText:
    """The real MiniLM, embedding each text once per test module (every encoder re-embeds 1,000 names)."""

    def __init__(self, text: Any) -> None:
        self.text = text
        self.memo: dict[str, torch.Tensor] = {}

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        todo = list(dict.fromkeys(t for t in texts if t not in self.memo))
        if todo:
            self.memo.update(zip(todo, self.text.encode_texts(todo)))
        return torch.stack([self.memo[t] for t in texts])


@pytest.fixture(scope="module")
def parts() -> tuple[torch.nn.Module, _MemoText, list[str]]:
    try:
        classifier, text = embedded.load_mobilenet("cpu"), embedded.load_minilm("cpu")
    except embedded.ModelLoadError as err:
        pytest.skip(f"embedded pack unavailable: {err}")
    return classifier, _MemoText(text), embedded.imagenet_class_names()


#: Classic ConSE in MiniLM's text space (the default compares class distributions).
TEXT_SPACE = {"space": "text", "hypernym_weight": 0.0}


def _encoder(parts: tuple[Any, Any, list[str]], **kwargs: Any) -> Any:
    classifier, text, names = parts
    return embedded.ConSEEncoder(classifier, text, names, **kwargs)


def _one_hot(index: int) -> torch.Tensor:
    probs = torch.full((1, 1000), 1e-6)
    probs[0, index] = 1.0
    return probs / probs.sum()


def test_views_average_the_probabilities_of_the_mirrored_and_zoomed_image(parts: Any) -> None:
    plain, tta = _encoder(parts), _encoder(parts, views=("none", "flip", "zoom"))
    assert plain.name != tta.name and "none+flip+zoom" in tta.name
    images = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    expected = sum(plain.view_probabilities(images, v) for v in ("none", "flip", "zoom")) / 3
    assert torch.allclose(tta.class_probabilities(images), expected, atol=1e-6)
    assert not torch.allclose(plain.view_probabilities(images, "zoom"), plain.view_probabilities(images, "none"))
    # A mirror-symmetric image looks the same flipped.
    symmetric = torch.cat([images[:, :, :, :24], images[:, :, :, :24].flip(-1)], dim=-1)
    assert torch.allclose(plain.view_probabilities(symmetric, "flip"), plain.view_probabilities(symmetric), atol=1e-5)
    assert embedded.test_time_view(images, "zoom").shape[-2:] == (36, 36)
    with pytest.raises(ValueError, match="views"):
        _encoder(parts, views=("rotate",))


def test_centring_removes_the_mean_class_name_from_both_sides(parts: Any) -> None:
    plain, centred = _encoder(parts, **TEXT_SPACE), _encoder(parts, **TEXT_SPACE, centre=True)
    assert "centred" in centred.name and "centred" not in plain.name
    mean = plain.class_embeddings.mean(0)
    assert torch.allclose(centred.centre_vector, mean)
    raw = plain.encode_texts(["a cat", "a brick wall"])
    assert torch.allclose(centred.encode_texts(["a cat", "a brick wall"]), torch.nn.functional.normalize(raw - mean))
    # Uncentred, every ConSE image shares the mean direction; centred, that shared part is gone.
    probs = torch.rand(8, 1000, generator=torch.Generator().manual_seed(1)).softmax(-1)
    direction = torch.nn.functional.normalize(mean, dim=0)
    assert float((plain.embed_probabilities(probs) @ direction).mean()) > 0.5
    assert float((centred.embed_probabilities(probs) @ direction).abs().mean()) < 0.2


def test_class_space_compares_distributions_over_imagenet_classes(parts: Any) -> None:
    encoder = _encoder(parts, space="classes", text_temperature=0.1, hypernym_weight=0.0, colour_weight=0.0)
    assert "classes0.1" in encoder.name and "wordnet" not in encoder.name and "colour" not in encoder.name
    names = encoder.class_names
    texts = encoder.encode_texts(["tabby cat", "airliner", "volcano"])
    assert texts.shape == (3, 1000) and bool((texts >= 0).all())
    assert torch.allclose(texts.norm(dim=-1), torch.ones(3), atol=1e-5)
    images = encoder.embed_probabilities(torch.cat([_one_hot(names.index(n)) for n in ("tabby", "airliner")]))
    assert images.shape == (2, 1000)
    sims = images @ texts.T
    assert sims.argmax(1).tolist() == [0, 1]  # each one-hot image is closest to its own class's text
    sharper = _encoder(parts, text_temperature=0.02, hypernym_weight=0.0, colour_weight=0.0).encode_texts(["tabby cat"])
    assert float(sharper.max()) > float(texts[0].max())  # a lower text temperature concentrates the text
    with pytest.raises(ValueError, match="space"):
        _encoder(parts, space="pixels")


def test_wordnet_hypernyms_give_general_concepts_mass(parts: Any) -> None:
    hypernyms = embedded.imagenet_hypernyms(3)
    names = embedded.imagenet_class_names()
    assert len(hypernyms) == 1000
    assert hypernyms[names.index("sorrel")][:2] == ["horse", "equine"]
    assert "dog" in hypernyms[names.index("Chihuahua")] and "clock" in hypernyms[names.index("wall clock")]
    plain, general = _encoder(parts, **TEXT_SPACE), _encoder(parts, **{**TEXT_SPACE, "hypernym_weight": 0.5})
    assert "wordnet0.5x3" in general.name
    image = _one_hot(names.index("sorrel"))
    horse, truck = plain.encode_texts(["horse", "truck"])
    # The sorrel's embedding moves toward "horse", its hypernym, and keeps away from an unrelated word.
    assert float(general.embed_probabilities(image)[0] @ horse) > float(plain.embed_probabilities(image)[0] @ horse)
    assert float(general.embed_probabilities(image)[0] @ horse) > float(general.embed_probabilities(image)[0] @ truck)


def test_default_is_class_space_with_hypernyms_and_colours(parts: Any) -> None:
    encoder = _encoder(parts)
    assert (encoder.space, encoder.hypernym_weight, encoder.colour_weight, encoder.template_weight) == (
        "classes",
        0.5,
        0.1,
        0.5,
    )
    assert encoder.name == (
        "embedded:mobilenet_v2-conse10-T4-classes0.1-wordnet0.5x3-colour0.1@0.6-t0.5+all-MiniLM-L6-v2"
    )
    assert encoder.encode_texts(["a cat"]).shape == (1, 1011)


def test_loaders_pass_the_options_and_keep_settings_apart() -> None:
    try:
        plain = embedded.load_conse_encoder("cpu", template_weight=0.0)
        tta = embedded.load_conse_encoder("cpu", template_weight=0.0, views=["none", "flip"])
    except embedded.ModelLoadError as err:
        pytest.skip(f"embedded pack unavailable: {err}")
    assert tta.views == ("none", "flip") and plain.views == ("none",) and plain.name != tta.name
    assert embedded.load_conse_encoder("cpu", template_weight=0.0) is not plain  # a copy of the cached one
    assert embedded.load_conse_encoder("cpu", template_weight=0.0).class_embeddings is plain.class_embeddings


def test_colour_terms_of_plain_and_black_and_white_images() -> None:
    names = list(embedded.COLOURS)
    blue = torch.zeros(1, 3, 40, 40)
    blue[:, 2] = 0.9
    board = ((torch.arange(40)[:, None] // 8 + torch.arange(40)[None, :] // 8) % 2).float().expand(1, 3, 40, 40)
    shares = embedded.colour_names_of(torch.cat([blue, board]))
    assert shares.shape == (2, len(names)) and torch.allclose(shares.sum(1), torch.ones(2))
    assert names[int(shares[0].argmax())] == "blue"
    assert sorted(names[i] for i in shares[1].topk(2).indices.tolist()) == ["black", "white"]


def test_class_space_colour_part_matches_colour_texts_only(parts: Any) -> None:
    encoder = _encoder(parts, space="classes", text_temperature=0.1, colour_weight=0.2, colour_threshold=0.6)
    plain = _encoder(parts, space="classes", text_temperature=0.1, colour_weight=0.0)
    assert "colour0.2@0.6" in encoder.name
    texts = encoder.encode_texts(["a plain blue surface", "a plain yellow surface", "a cat's face"])
    assert texts.shape == (3, 1000 + len(embedded.COLOURS))
    colour_mass = texts[:, 1000:].norm(dim=1)
    assert float(colour_mass[2]) < 0.7 * float(colour_mass[0])  # a text without a colour puts less mass there
    blue = torch.zeros(2, 3, 64, 64)
    blue[:, 2] = torch.tensor([0.8, 0.95])[:, None, None]
    sims = encoder.encode_images(blue) @ texts[:2].T
    assert bool((sims[:, 0] > sims[:, 1]).all())  # blue images: "blue" beats "yellow"
    assert encoder.encode_images(blue).shape == (2, 1011) and plain.encode_images(blue).shape == (2, 1000)
    with pytest.raises(ValueError, match="colour"):
        encoder.embed_probabilities(torch.rand(1, 1000).softmax(-1))


def _photos(size: int = 96) -> torch.Tensor:
    skdata = pytest.importorskip("skimage.data")
    images = []
    for name in ("chelsea", "coffee", "rocket", "astronaut", "horse", "brick"):
        pixels = torch.as_tensor(getattr(skdata, name)()).float() / 255
        pixels = pixels.unsqueeze(-1).expand(*pixels.shape[:2], 3) if pixels.ndim == 2 else pixels[..., :3]
        images.append(torch.nn.functional.interpolate(pixels.permute(2, 0, 1)[None], size=(size, size)))
    return torch.cat(images)


def test_precision_auto_is_bfloat16_only_on_a_cpu_with_native_bfloat16(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert embedded.resolve_precision("float32", cpu) == torch.float32
    assert embedded.resolve_precision("bfloat16", cpu) == torch.bfloat16
    assert embedded.resolve_precision("auto", cuda) == torch.float32  # not measured on a GPU: float32 stays
    for native in (True, False):
        monkeypatch.setattr(embedded, "native_bfloat16", lambda device, native=native: native)
        assert embedded.resolve_precision("auto", cpu) == (torch.bfloat16 if native else torch.float32)
    with pytest.raises(ValueError, match="precision must be one of"):
        embedded.resolve_precision("half", cpu)


def test_bfloat16_embeddings_stay_close_to_float32_and_never_share_a_cache_key(parts: Any) -> None:
    from lightning_neurons.explanation.embedding_cache import encoder_key

    full, half = _encoder(parts, precision="float32"), _encoder(parts, precision="bfloat16")
    assert full.compute_dtype == torch.float32 and half.compute_dtype == torch.bfloat16
    assert full.name == half.name  # a per-call option: the concepts and texts are the same
    assert encoder_key(full) != encoder_key(half)  # but a cached crop embedding is never mixed across precisions
    photos = _photos()
    p_full, p_half = full.class_probabilities(photos), half.class_probabilities(photos)
    assert not torch.equal(p_full, p_half)  # really computed in bfloat16
    # Close, not equal: near ties among the top classes may swap, and ConSE's tempered top-10 mixture moves with them
    # (on these photos the cosine of the two embeddings was 0.92-1.0; the quality benchmark's figures moved by less
    # than the seeds do: benchmarks/results/encoder_precision.json).
    top3 = p_half.topk(3, dim=1).indices
    assert all(int(c) in row for c, row in zip(p_full.argmax(1), top3.tolist()))
    cosine = torch.nn.functional.cosine_similarity(full.encode_images(photos), half.encode_images(photos))
    assert cosine.mean() > 0.95 and cosine.min() > 0.85, cosine
    # The float32 path is the folded classifier itself; the bfloat16 copy is made once and shared by copies.
    assert full._classifier_in(torch.float32) is full.classifier
    assert half._classifier_in(torch.bfloat16) is half._classifier_in(torch.bfloat16)
    assert next(full.classifier.parameters()).dtype == torch.float32


def test_the_bfloat16_classifier_runs_its_activations_inside_the_convs_and_gives_the_same_probabilities(
    parts: Any,
) -> None:
    import copy

    from lightning_neurons.backends.fused_conv import FusedConv2d, _fused_kernel

    if _fused_kernel() is None:
        pytest.skip("this PyTorch has no oneDNN fused convolution")
    half, full = _encoder(parts, precision="bfloat16"), _encoder(parts, precision="float32")
    fused = half._classifier_in(torch.bfloat16)
    convs = [m for m in fused.modules() if isinstance(m, FusedConv2d)]
    assert len(convs) == 52 and sum(m.post_op == "hardtanh" for m in convs) == 35  # every ReLU6 moved into its conv
    outside = [c for m in fused.modules() if not isinstance(m, FusedConv2d) for c in m.children()]
    assert not any(isinstance(m, torch.nn.ReLU6) for m in outside)  # each one runs inside its conv's kernel
    assert not any(isinstance(m, FusedConv2d) for m in full._classifier_in(torch.float32).modules())  # no faster
    eager = copy.deepcopy(half.classifier).to(torch.bfloat16)
    pixels = embedded.prepare_images(_photos(), 224, embedded._IMAGENET_MEAN, embedded._IMAGENET_STD, "shortest")
    pixels = pixels.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        got, expected = fused(pixels).float().softmax(-1), eager(pixels).float().softmax(-1)
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=0)


def test_batch_size_auto_is_a_small_batch_on_a_cpu_and_the_old_64_on_a_gpu() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert embedded.resolve_batch_size("auto", 224, cpu) == 8  # activations of small batches stay in the caches
    assert embedded.resolve_batch_size("auto", 128, cpu) == 24
    assert embedded.resolve_batch_size("auto", 32, cpu) == 64  # never more than on a GPU
    assert embedded.resolve_batch_size("auto", 4096, cpu) == 1
    assert embedded.resolve_batch_size("auto", 224, cuda) == 64
    assert embedded.resolve_batch_size(5, 224, cuda) == 5  # an explicit size is kept everywhere
    for bad in (0, "big", 2.5, True):
        with pytest.raises(ValueError, match="batch_size must be 'auto' or an integer >= 1"):
            embedded.resolve_batch_size(bad, 224, cpu)  # type: ignore[arg-type]


def test_the_batch_size_changes_how_fast_not_what_a_crop_embeds(parts: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    auto, one = _encoder(parts, precision="float32"), _encoder(parts, precision="float32", batch_size=64)
    assert auto.compute_batch_size == 8 and one.compute_batch_size == 64
    calls: list[int] = []
    forward = auto.classifier.forward
    monkeypatch.setattr(auto.classifier, "forward", lambda x: calls.append(x.shape[0]) or forward(x))
    photos = _photos().repeat(3, 1, 1, 1)[:13]
    small, large = auto.encode_images(photos), one.encode_images(photos)
    assert calls == [8, 5]  # the classifier saw batches of the resolved size
    torch.testing.assert_close(small, large, atol=1e-4, rtol=1e-4)
