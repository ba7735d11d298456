"""ConSESettings: the embedded encoder's options as one validated value, passed down by every loader.

The encoders here are the real MobileNetV2 and MiniLM restricted to a few ImageNet classes, MiniLM embedding each
text once per module (the full 1,000-name encoder takes ~20 s to embed its class names on one CPU thread); the
loaders get the same small pack and a cache of their own, so nothing leaks into other tests' cached encoders.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Any

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

embedded = pytest.importorskip("lightning_neurons.backends.embedded")
from lightning_neurons.backends import load_backend  # noqa: E402

ConSESettings = embedded.ConSESettings

#: Today's defaults, written out once here so that a changed default fails a test.
DEFAULTS = {
    "top_t": 10,
    "template_weight": 0.5,
    "temperature": 4.0,
    "image_size": 224,
    "views": ("none",),
    "centre": False,
    "space": "classes",
    "text_temperature": 0.1,
    "hypernym_weight": 0.5,
    "hypernym_levels": 3,
    "colour_weight": 0.1,
    "colour_threshold": 0.6,
    "batch_size": "auto",
    "resize_mode": "shortest",
    "precision": "auto",
}
CLASSES = ["tabby", "airliner", "volcano", "goldfish", "espresso"]


class _MemoText:
    """The real MiniLM, embedding each text once per test module."""

    def __init__(self, text: Any) -> None:
        self.text, self.name = text, text.name
        self.memo: dict[str, torch.Tensor] = {}

    def encode_texts(self, texts: Any) -> torch.Tensor:
        todo = list(dict.fromkeys(t for t in texts if t not in self.memo))
        if todo:
            self.memo.update(zip(todo, self.text.encode_texts(todo)))
        return torch.stack([self.memo[t] for t in texts])


class _Subset(nn.Module):
    """The ImageNet classifier's logits of a few classes only (their names are the encoder's class names)."""

    def __init__(self, classifier: nn.Module, indices: list[int]) -> None:
        super().__init__()
        self.classifier = classifier
        self.register_buffer("indices", torch.tensor(indices))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)[:, self.indices]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """One torch thread: the CPU is shared, and two threads made MobileNetV2 ten times slower here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pack() -> tuple[nn.Module, Any, list[str]]:
    try:
        classifier, text = embedded.load_mobilenet("cpu"), embedded.load_minilm("cpu")
    except embedded.ModelLoadError as err:
        pytest.skip(f"embedded pack unavailable: {err}")
    names = embedded.imagenet_class_names()
    return _Subset(classifier, [names.index(n) for n in CLASSES]), _MemoText(text), list(CLASSES)


@pytest.fixture
def small_loaders(pack: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """load_conse_encoder / load_embedded_backend on the small pack, with a cache of encoders of their own."""
    classifier, text, names = pack
    own: dict[Any, Any] = {}

    def cached(key: tuple[Any, ...], factory: Any) -> Any:
        assert key[0] == "conse", key  # the models themselves come from the fixture
        if key not in own:
            own[key] = factory()
        return own[key]

    monkeypatch.setattr(embedded, "cached_model", cached)
    monkeypatch.setattr(embedded, "load_mobilenet", lambda device=None: classifier)
    monkeypatch.setattr(embedded, "load_minilm", lambda device=None: text)
    monkeypatch.setattr(embedded, "imagenet_class_names", lambda: list(names))


def _images() -> torch.Tensor:
    return torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(0))


def test_the_defaults_are_todays_and_held_once() -> None:
    assert dataclasses.asdict(ConSESettings()) == DEFAULTS
    fields = {f.name for f in dataclasses.fields(ConSESettings)}
    assert fields == set(DEFAULTS)
    # No loader repeats an option with a default of its own: they all take **options and a settings value.
    for function in (embedded.ConSEEncoder.__init__, embedded.load_conse_encoder, embedded.load_embedded_backend):
        parameters = inspect.signature(function).parameters
        assert not fields & set(parameters), function.__qualname__
        assert "settings" in parameters and parameters["settings"].default is None


def test_every_entry_point_has_the_same_defaults(pack: Any, small_loaders: None) -> None:
    encoder = embedded.ConSEEncoder(*pack)
    loaded = embedded.load_conse_encoder("cpu")
    backend = embedded.load_embedded_backend("cpu", generator=False)
    via_registry = load_backend("embedded", device="cpu", generator=False)
    assert encoder.settings == loaded.settings == backend.encoder.settings == via_registry.encoder.settings
    assert encoder.settings == ConSESettings()
    assert encoder.name == loaded.name == backend.encoder.name
    # The attributes existing code reads come from the settings.
    assert (encoder.top_t, encoder.temperature, encoder.views, encoder.image_size) == (10, 4.0, ("none",), 224)


def test_flat_options_and_a_settings_value_give_the_same_encoder(pack: Any, small_loaders: None) -> None:
    options = {"space": "text", "template_weight": 1.0, "top_t": 3, "views": ["none", "flip"], "image_size": 32}
    settings = ConSESettings(**options)
    assert settings.views == ("none", "flip")  # a list (JSON, YAML) becomes the hashable tuple
    flat, valued = embedded.ConSEEncoder(*pack, **options), embedded.ConSEEncoder(*pack, settings)
    assert flat.settings == valued.settings == settings and flat.name == valued.name
    assert "conse3" in flat.name and "flip" in flat.name and "-t1+" in flat.name
    texts = ["a cat", "a volcano"]
    assert torch.equal(flat.encode_texts(texts), valued.encode_texts(texts))
    assert torch.equal(flat.encode_images(_images()), valued.encode_images(_images()))
    # Options given with a settings value replace its fields.
    assert embedded.ConSEEncoder(*pack, settings, top_t=2).settings == dataclasses.replace(settings, top_t=2)

    by_backend = load_backend("embedded", device="cpu", generator=False, **options)
    by_value = embedded.load_embedded_backend("cpu", settings=settings, generator=False)
    assert by_backend.encoder.settings == by_value.encoder.settings == settings
    assert by_backend.encoder.name == flat.name
    assert torch.equal(by_backend.encoder.encode_images(_images()), flat.encode_images(_images()))


def test_per_call_options_share_the_cached_encoder(small_loaders: None) -> None:
    small = embedded.load_conse_encoder("cpu", image_size=64, batch_size=2, resize_mode="squash")
    default = embedded.load_conse_encoder("cpu")
    assert small.class_embeddings is default.class_embeddings  # one cache entry: per-call options are not in the key
    assert small.settings == ConSESettings(image_size=64, batch_size=2, resize_mode="squash")
    assert default.settings == ConSESettings()
    assert (small.image_size, small.batch_size, small.resize_mode) == (64, 2, "squash")
    other = embedded.load_conse_encoder("cpu", top_t=2)
    assert other.class_embeddings is not default.class_embeddings and other.top_t == 2


def test_encoder_attributes_are_read_only_except_the_per_call_ones(pack: Any) -> None:
    encoder = embedded.ConSEEncoder(*pack, image_size=64)
    with pytest.raises(AttributeError, match="top_t is fixed at construction"):
        encoder.top_t = 3
    encoder.image_size = 96  # per call: validated, and the settings value follows
    assert encoder.image_size == 96 and encoder.settings.image_size == 96
    with pytest.raises(ValueError, match="image_size must be an integer >= 16, got 8"):
        encoder.image_size = 8
    # Text space has no colour part, whatever colour_weight says.
    assert embedded.ConSEEncoder(*pack, space="text", image_size=64).colour_weight == 0.0


def test_positional_options_still_work_deprecated(pack: Any) -> None:
    with pytest.warns(DeprecationWarning, match="by position"):
        legacy = embedded.ConSEEncoder(*pack, 3, 0.0)
    assert legacy.settings == ConSESettings(top_t=3, template_weight=0.0)
    with pytest.raises(TypeError, match="multiple values for 'top_t'"):
        embedded.ConSEEncoder(*pack, 3, top_t=4)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"top_t": 0}, "top_t must be an integer >= 1, got 0"),
        ({"top_t": 2.5}, "top_t must be an integer >= 1, got 2.5"),
        ({"template_weight": 1.5}, r"template_weight must be a number in \[0, 1\], got 1.5"),
        ({"temperature": 0.0}, "temperature must be a number > 0, got 0.0"),
        ({"text_temperature": -1}, "text_temperature must be a number > 0, got -1"),
        ({"image_size": 8}, "image_size must be an integer >= 16, got 8"),
        ({"views": ("none", "rotate")}, r"views must be a non-empty subset of \('none', 'flip', 'zoom'\), got"),
        ({"views": ()}, "views must be a non-empty subset"),
        ({"views": "flip"}, "views must be a list of view names from"),
        ({"centre": "yes"}, "centre must be True or False, got 'yes'"),
        ({"space": "pixels"}, "space must be 'classes' or 'text', got 'pixels'"),
        ({"hypernym_weight": -0.1}, r"hypernym_weight must be a number in \[0, 1\], got -0.1"),
        ({"hypernym_levels": -1}, "hypernym_levels must be an integer >= 0, got -1"),
        ({"colour_weight": 1.0}, r"colour_weight must be a number in \[0, 1\), got 1.0"),
        ({"colour_threshold": None}, "colour_threshold must be a number, got None"),
        ({"batch_size": 0}, "batch_size must be 'auto' or an integer >= 1, got 0"),
        ({"batch_size": "big"}, "batch_size must be 'auto' or an integer >= 1, got 'big'"),
        ({"resize_mode": "crop"}, "resize_mode must be 'shortest' or 'squash', got 'crop'"),
        ({"precision": "half"}, "precision must be 'auto' or 'float32' or 'bfloat16', got 'half'"),
    ],
)
def test_validation_says_what_was_given_and_what_is_allowed(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ConSESettings(**options)
    with pytest.raises(ValueError, match=message):
        ConSESettings.from_options(ConSESettings(), **options)
    with pytest.raises(ValueError, match=message):  # before any model is loaded
        load_backend("embedded", device="cpu", generator=False, **options)


def test_the_edges_of_the_ranges_are_allowed() -> None:
    edge = ConSESettings(
        top_t=1, template_weight=0, hypernym_weight=1, hypernym_levels=0, colour_weight=0, image_size=16, batch_size=1
    )
    assert edge.top_t == 1 and edge.image_size == 16
    assert ConSESettings(template_weight=1.0, views=["zoom"], resize_mode="squash").views == ("zoom",)


def test_an_unknown_option_names_the_closest_ones() -> None:
    with pytest.raises(TypeError, match="unknown ConSE encoder option 'temprature'; did you mean 'temperature'"):
        ConSESettings.from_options(temprature=2.0)
    with pytest.raises(TypeError, match="settings must be a ConSESettings, got dict"):
        ConSESettings.from_options({"top_t": 3})  # type: ignore[arg-type]
    # Through the registry (backend_kwargs of a config), before any model is loaded.
    with pytest.raises(TypeError, match="unknown embedded backend option 'color_weight'; did you mean 'colour_weight'"):
        load_backend("embedded", device="cpu", color_weight=0.2)
    with pytest.raises(TypeError, match="'keep_basis_concept'; did you mean 'keep_basis_concepts'"):
        load_backend("embedded", device="cpu", keep_basis_concept=True)
    with pytest.raises(TypeError, match="did you mean 'top_t'"):
        load_backend("hf", device="cpu", encoder="embedded", captioner=None, generator=None, topt=3)


def test_an_unknown_option_of_the_encoder(pack: Any) -> None:
    with pytest.raises(TypeError, match="'hypernym_level'; did you mean 'hypernym_levels' or 'hypernym_weight'"):
        embedded.ConSEEncoder(*pack, hypernym_level=2)


def test_the_embedded_encoder_says_the_side_crops_are_cut_at():
    """The quickstart's encoder resizes to 128 px: its crops are cut at 128 px, not at 224 and resized again."""
    from lightning_neurons.backends.base import encoder_input_side
    from lightning_neurons.explanation.settings import ExplainConfig

    small = load_backend("embedded", device="cpu", generator=False, image_size=128).encoder
    assert encoder_input_side(small) == 128 and ExplainConfig().for_encoder(small).crop_side == 128
    assert encoder_input_side(load_backend("embedded", device="cpu", generator=False).encoder) == 224
