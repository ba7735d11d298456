"""One frozen, validated settings value for a whole explanation run.

:class:`RunConfig` is what :class:`~lightning_neurons.NeuronExplainer` builds from its flat ``__init__`` arguments and
what :func:`~lightning_neurons.explain`, :func:`~lightning_neurons.explain_checkpoints` and ``evaluate_run`` build
directly. Every choice is validated once, here, by :meth:`RunConfig.from_arguments`, with the messages users see;
the parts are handed down to the module that needs them (recording, backend and vocabulary, explanation stage,
evaluation, output, schedule), never read back out of the callback. Variations are made with
:func:`dataclasses.replace`, not by mutation.

Example:
    >>> config = RunConfig.from_arguments(layers=["layer4"], top_k=8, every_n_epochs=2)
    >>> config.recording.top_k, config.schedule.every_n_epochs
    (8, 2)
    >>> RunConfig.from_arguments(layers=["layer4"], top_k=0)
    Traceback (most recent call last):
    ...
    ValueError: top_k must be an integer >= 1, got 0
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from torch import nn

from lightning_neurons.explanation.embedding_cache import DEFAULT_CACHE_MB
from lightning_neurons.explanation.pipeline import ExplainConfig

if TYPE_CHECKING:
    from lightning_neurons.backends.base import Backend
    from lightning_neurons.evaluation.harness import EvaluationConfig

#: A layer specification: a name, a glob pattern, a list of those, or a predicate ``(name, module) -> bool``.
LayerSpec = str | Sequence[str] | Callable[[str, nn.Module], bool]
#: How the model is run on probe images: ``forward_fn(model, images)``; ``None`` calls ``model(images)``.
ForwardFn = Callable[[nn.Module, Any], Any]

VOCABULARY_SOURCES = ("general", "classes", "llm")
DEFAULT_VOCABULARY = ("general", "classes")


@dataclass(frozen=True)
class RecordingConfig:
    """What is recorded during validation (see :class:`~lightning_neurons.recording.recorder.ActivationRecorder`).

    Args:
        layers: Layer names, glob patterns, or a predicate ``(name, module) -> bool``.
        top_k: Top activating samples kept per unit.
        reduction: ``"max"`` or ``"mean"`` of a unit's map.
        token_mode: Class-token handling of ``[B, T, D]`` outputs.
        output_selector: ``{layer name or glob: index or key}`` of the tensor to record from tuple/dict outputs.
        input_key: Index/key of the images in a batch (``None``: first item or a usual key).
        target_key: Index/key of the integer labels in a batch (``None``: second item or a usual key).
        reservoir_size: Size of the uniform random control sample.
        seed: Seed of the reservoir.
        forward_fn: ``forward_fn(model, images)`` runs the model on probe images where ``model(images)`` does not.
    """

    layers: LayerSpec
    top_k: int = 16
    reduction: Literal["max", "mean"] = "max"
    token_mode: Literal["auto", "drop_first", "keep_all"] = "auto"
    output_selector: Mapping[str, int | str] | None = None
    input_key: int | str | None = None
    target_key: int | str | None = None
    reservoir_size: int = 256
    seed: int = 0
    forward_fn: ForwardFn | None = None

    @property
    def layer_label(self) -> str:
        """A stable, readable label of the layer spec (a predicate is labelled by its qualified name)."""
        if isinstance(self.layers, str):
            return self.layers
        if callable(self.layers):
            label = getattr(self.layers, "__qualname__", None) or type(self.layers).__name__
            code = getattr(self.layers, "__code__", None)  # two lambdas of one function differ by their line
            return f"{label}@{code.co_firstlineno}" if code is not None else label
        return ",".join(self.layers)

    def recorder_kwargs(self) -> dict[str, Any]:
        """The keyword arguments shared by the recorder and :func:`~lightning_neurons.collect_top_k`."""
        return {
            "top_k": self.top_k,
            "reduction": self.reduction,
            "token_mode": self.token_mode,
            "output_selector": dict(self.output_selector) if self.output_selector else None,
            "reservoir_size": self.reservoir_size,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class BackendConfig:
    """The foundation models and the concept vocabulary.

    Args:
        backend: ``"auto"`` (open_clip when its weights are cached or can be fetched, else the offline pack with
            one warning), ``"embedded"``, ``"clip"``, ``"hf"`` or a loaded :class:`~lightning_neurons.Backend`.
        backend_kwargs: Keyword arguments of the backend loader.
        vocabulary: Concept sources (``"general"``, ``"classes"``, ``"llm"`` or concept-file paths).
        class_names: The dataset's class names, by class index (``None``: read from the data when possible).
        llm_vocabulary: Also ask the text generator for domain concepts (adds ``"llm"``).
        show_progress: Progress bars while the vocabulary is generated and embedded.
    """

    backend: str | Backend = "auto"
    backend_kwargs: Mapping[str, Any] = field(default_factory=dict)
    vocabulary: tuple[str, ...] = DEFAULT_VOCABULARY
    class_names: tuple[str, ...] | None = None
    llm_vocabulary: bool = False
    show_progress: bool = True

    def sources(self, class_names: Sequence[str] | None) -> list[str]:
        """The vocabulary sources to build, given the class names known at set-up."""
        sources = list(self.vocabulary)
        if self.llm_vocabulary and "llm" not in sources:
            sources.append("llm")
        if "classes" in sources and not class_names:
            sources.remove("classes")
        return sources

    @property
    def backend_label(self) -> str:
        """A readable label of the backend choice."""
        return self.backend if isinstance(self.backend, str) else getattr(self.backend, "name", "backend")


@dataclass(frozen=True)
class OutputConfig:
    """Where and what a run writes.

    Args:
        name: The explainer's name: its output folder ``neurons`` or ``neurons-<name>`` and its tag prefix.
        history_dir: Directory of the history, per-round JSON, previews and report (``None``: the run's folder).
        log_units: Units per layer with per-unit logger cards: a count, unit indices, or ``None`` for all.
        show_progress: Progress bars while explaining.
        projector: Also write TensorBoard Projector maps of all units (one point per unit and round).
    """

    name: str | None = None
    history_dir: str | None = None
    log_units: int | tuple[int, ...] | None = 8
    show_progress: bool = True
    projector: bool = False

    @property
    def prefix(self) -> str:
        """The first component of every logged tag."""
        return "neurons" if not self.name else f"neurons-{self.name}"

    @property
    def folder(self) -> str:
        """The folder name inside the run's directory."""
        return self.prefix


@dataclass(frozen=True)
class ScheduleConfig:
    """When rounds are explained (see :class:`~lightning_neurons.NeuronExplainer`).

    Args:
        every_n_epochs: Explain after every n-th epoch (``None``: off).
        epochs: Explicit 0-based epochs to explain as well.
        explain_on_fit_end: Explain the last validation pass at the end of ``fit`` if it was not explained.
        every_n_val_passes: With step-based validation (``check_val_every_n_epoch=None``), explain every n-th
            validation pass (``None``: use the epoch schedule on the pass' epoch).
    """

    every_n_epochs: int | None = 1
    epochs: tuple[int, ...] | None = None
    explain_on_fit_end: bool = True
    every_n_val_passes: int | None = None

    def epoch_scheduled(self, epoch: int | None) -> bool:
        """Whether ``epoch`` is an explaining epoch."""
        if epoch is None:
            return False
        if self.epochs is not None and epoch in self.epochs:
            return True
        return self.every_n_epochs is not None and (epoch + 1) % self.every_n_epochs == 0


@dataclass(frozen=True)
class SpeedConfig:
    """How rounds are run so that training waits as little as possible (README, "Speed").

    Args:
        async_explain: Explain in a background thread while training continues, where that is safe (one process,
            ``trainer.fit``, an uncompiled model, a map-style probe dataset, no callback monitoring this explainer's
            metrics); elsewhere rounds run in the validation hook as before. ``"auto"`` (the default): in the
            background where the model trains on an accelerator, in the validation hook where it trains on the CPU
            (there the worker and the training steps share the same cores, and the fit was slower; README,
            "Speed").
        when_busy: When a scheduled round comes while the previous one is still being explained in the background:
            ``"wait"`` for it (every scheduled round is explained) or ``"skip"`` the new one with a warning.
        embedding_cache_mb: Bound in MiB of the cache of region embeddings kept across rounds (least recently
            used first out); ``None``: no cache.

    Example:
        >>> SpeedConfig().async_explain, SpeedConfig().embedding_cache_bytes > 0
        ('auto', True)
    """

    async_explain: bool | Literal["auto"] = "auto"
    when_busy: Literal["wait", "skip"] = "wait"
    embedding_cache_mb: float | None = DEFAULT_CACHE_MB

    @property
    def embedding_cache_bytes(self) -> int:
        """The cache bound in bytes (0: no cache)."""
        return int(self.embedding_cache_mb * 2**20) if self.embedding_cache_mb else 0


@dataclass(frozen=True)
class RunConfig:
    """Every setting of an explanation run, validated once.

    Args:
        recording: What is recorded.
        backend: Foundation models and vocabulary.
        explain: The explanation stage's settings (:class:`~lightning_neurons.ExplainConfig`).
        evaluation: Settings of the per-round quality evaluation; ``None`` when ``evaluate=False``.
        output: Where and what is written.
        schedule: When rounds are explained.
        on_error: ``"warn"`` (a failed round is logged, training goes on) or ``"raise"``.
        speed: Background explanation and the region-embedding cache.
    """

    recording: RecordingConfig
    backend: BackendConfig = field(default_factory=BackendConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)
    evaluation: EvaluationConfig | None = None
    output: OutputConfig = field(default_factory=OutputConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    on_error: Literal["warn", "raise"] = "warn"
    speed: SpeedConfig = field(default_factory=SpeedConfig)

    @property
    def evaluate(self) -> bool:
        """Whether each round is also evaluated."""
        return self.evaluation is not None

    def with_output(self, history_dir: str | os.PathLike[str] | None) -> RunConfig:
        """A copy writing into ``history_dir``."""
        output = dataclasses.replace(self.output, history_dir=str(history_dir) if history_dir is not None else None)
        return dataclasses.replace(self, output=output)

    def with_evaluation(self, evaluate: bool = True) -> RunConfig:
        """A copy with the per-round evaluation switched on (or off)."""
        return dataclasses.replace(
            self, evaluation=_evaluation_config(self.recording, self.explain) if evaluate else None
        )

    @classmethod
    def from_arguments(
        cls,
        layers: LayerSpec,
        top_k: int = 16,
        reduction: str = "max",
        token_mode: str = "auto",
        output_selector: Mapping[str, int | str] | None = None,
        input_key: int | str | None = None,
        target_key: int | str | None = None,
        reservoir_size: int = 256,
        every_n_epochs: int | None = 1,
        epochs: Sequence[int] | None = None,
        explain_on_fit_end: bool = True,
        every_n_val_passes: int | None = None,
        backend: str | Backend = "auto",
        backend_kwargs: Mapping[str, Any] | None = None,
        vocabulary: Sequence[str | os.PathLike[str]] | None = None,
        class_names: Sequence[str] | None = None,
        llm_vocabulary: bool = False,
        describe: bool = False,
        multi_concept: bool = True,
        ablation: bool = False,
        ablation_measure: str = "probability",
        correction: Any = "control",
        confidence_threshold: float | None = 0.85,
        frequency_penalty: float = 0.5,
        selection: str = "concept_score",
        permutations: int = 200,
        q_threshold: float = 0.05,
        gain_margin: float = 0.05,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        log_units: int | Sequence[int] | None = 8,
        history_dir: str | os.PathLike[str] | None = None,
        on_error: str = "warn",
        evaluate: bool = False,
        seed: int = 0,
        show_progress: bool = True,
        name: str | None = None,
        forward_fn: ForwardFn | None = None,
        projector: bool = False,
        async_explain: bool | Literal["auto"] = "auto",
        when_busy: str = "wait",
        embedding_cache: bool = True,
        embedding_cache_mb: float = DEFAULT_CACHE_MB,
    ) -> RunConfig:
        """Validate the flat arguments of :class:`~lightning_neurons.NeuronExplainer` and build the value.

        Raises:
            ValueError: For any invalid argument, with a message that names it and what it accepts.
        """
        from lightning_neurons.backends.base import Backend

        _validate_layers(layers)
        _check(
            isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 1,
            f"top_k must be an integer >= 1, got {top_k!r}",
        )
        _check_choice("reduction", reduction, ("max", "mean"))
        _check_choice("token_mode", token_mode, ("auto", "drop_first", "keep_all"))
        if isinstance(correction, str):
            _check_choice("correction", correction, ("control", "soft_wpmi"))
        _check_choice("ablation_measure", ablation_measure, ("probability", "accuracy"))
        _check(
            confidence_threshold is None
            or (
                isinstance(confidence_threshold, (int, float))
                and not isinstance(confidence_threshold, bool)
                and 0.0 <= confidence_threshold <= 1.0
            ),
            f"confidence_threshold must be a number in [0, 1] or None, got {confidence_threshold!r}",
        )
        _check(
            isinstance(frequency_penalty, (int, float))
            and not isinstance(frequency_penalty, bool)
            and frequency_penalty >= 0.0,
            f"frequency_penalty must be a number >= 0, got {frequency_penalty!r}",
        )
        _check_choice("selection", selection, ("concept_score", "correlation"))
        _check(
            isinstance(permutations, int) and not isinstance(permutations, bool) and permutations >= 0,
            f"permutations must be an integer >= 0, got {permutations!r}",
        )
        _check(
            _is_number(q_threshold) and 0.0 < q_threshold <= 1.0,
            f"q_threshold must be a number in (0, 1], got {q_threshold!r}",
        )
        _check(
            _is_number(gain_margin) and -1.0 <= gain_margin < 2.0,
            f"gain_margin must be a number in [-1, 2), got {gain_margin!r}",
        )
        _check_choice("on_error", on_error, ("warn", "raise"))
        if output_selector is not None:
            _check(
                isinstance(output_selector, Mapping)
                and all(isinstance(k, str) and isinstance(v, (int, str)) for k, v in output_selector.items()),
                f"output_selector must be a dict {{layer name: index or key}}, got {output_selector!r}",
            )
        for arg, key in (("input_key", input_key), ("target_key", target_key)):
            _check(key is None or isinstance(key, (int, str)), f"{arg} must be an int, a str or None, got {key!r}")
        _check(
            isinstance(reservoir_size, int) and reservoir_size >= 0,
            f"reservoir_size must be an integer >= 0, got {reservoir_size!r}",
        )
        _check(
            every_n_epochs is None or (isinstance(every_n_epochs, int) and every_n_epochs >= 1),
            f"every_n_epochs must be an integer >= 1 or None, got {every_n_epochs!r}",
        )
        _check(
            every_n_val_passes is None or (isinstance(every_n_val_passes, int) and every_n_val_passes >= 1),
            f"every_n_val_passes must be an integer >= 1 or None, got {every_n_val_passes!r}",
        )
        _check(
            epochs is None
            or (isinstance(epochs, (list, tuple)) and all(isinstance(e, int) and e >= 0 for e in epochs)),
            f"epochs must be a list of 0-based epoch indices (integers >= 0), got {epochs!r}",
        )
        _check(
            isinstance(backend, (str, Backend)) and backend != "",
            f"backend must be a backend name ('embedded', 'clip', 'hf') or a Backend instance, got {backend!r}",
        )
        _check(
            backend_kwargs is None or isinstance(backend_kwargs, Mapping),
            f"backend_kwargs must be a dict, got {backend_kwargs!r}",
        )
        _validate_vocabulary(vocabulary)
        _check(
            class_names is None
            or (isinstance(class_names, (list, tuple)) and all(isinstance(c, str) for c in class_names)),
            "class_names must be a list of strings",
        )
        _validate_normalisation(image_mean, image_std)
        _check(
            log_units is None
            or (isinstance(log_units, int) and log_units >= 0)
            or (isinstance(log_units, (list, tuple)) and all(isinstance(u, int) and u >= 0 for u in log_units)),
            f"log_units must be an integer >= 0, a list of unit indices or None, got {log_units!r}",
        )
        _check(history_dir is None or isinstance(history_dir, (str, os.PathLike)), "history_dir must be a path")
        _check(isinstance(seed, int), f"seed must be an integer, got {seed!r}")
        _check(
            name is None or (isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) is not None),
            f"name must be letters, digits, '_', '.' or '-' (it names a folder and a tag prefix), got {name!r}",
        )
        _check(forward_fn is None or callable(forward_fn), f"forward_fn must be a callable, got {forward_fn!r}")
        _check(isinstance(multi_concept, bool), f"multi_concept must be True or False, got {multi_concept!r}")
        _check(
            isinstance(async_explain, bool) or async_explain == "auto",
            f"async_explain must be True, False or 'auto', got {async_explain!r}",
        )
        _check_choice("when_busy", when_busy, ("wait", "skip"))
        _check(isinstance(embedding_cache, bool), f"embedding_cache must be True or False, got {embedding_cache!r}")
        _check(
            isinstance(embedding_cache_mb, (int, float))
            and not isinstance(embedding_cache_mb, bool)
            and embedding_cache_mb > 0,
            f"embedding_cache_mb must be a number > 0 (MiB), got {embedding_cache_mb!r}",
        )

        recording = RecordingConfig(
            layers=list(layers) if isinstance(layers, (list, tuple)) else layers,
            top_k=top_k,
            reduction=reduction,  # type: ignore[arg-type]
            token_mode=token_mode,  # type: ignore[arg-type]
            output_selector=dict(output_selector) if output_selector else None,
            input_key=input_key,
            target_key=target_key,
            reservoir_size=reservoir_size,
            seed=seed,
            forward_fn=forward_fn,
        )
        explain = ExplainConfig(
            correction=correction,  # type: ignore[arg-type]
            confidence_threshold=None if confidence_threshold is None else float(confidence_threshold),
            frequency_penalty=float(frequency_penalty),
            selection=selection,  # type: ignore[arg-type]
            permutations=permutations,
            q_threshold=float(q_threshold),
            gain_margin=float(gain_margin),
            describe=describe,
            multi_concept=multi_concept,
            ablation=ablation,
            ablation_measure=ablation_measure,  # type: ignore[arg-type]
            image_mean=tuple(float(v) for v in image_mean) if image_mean else None,
            image_std=tuple(float(v) for v in image_std) if image_std else None,
            token_mode=token_mode,  # type: ignore[arg-type]
            output_selector=dict(output_selector) if output_selector else None,
            seed=seed,
            show_progress=show_progress,
        )
        if forward_fn is not None:
            explain = dataclasses.replace(explain, forward_fn=forward_fn)
        return cls(
            recording=recording,
            backend=BackendConfig(
                backend=backend,
                backend_kwargs=dict(backend_kwargs or {}),
                vocabulary=tuple(str(v) for v in vocabulary) if vocabulary is not None else DEFAULT_VOCABULARY,
                class_names=tuple(class_names) if class_names else None,
                llm_vocabulary=llm_vocabulary,
                show_progress=show_progress,
            ),
            explain=explain,
            evaluation=_evaluation_config(recording, explain) if evaluate else None,
            output=OutputConfig(
                name=name,
                history_dir=str(history_dir) if history_dir is not None else None,
                log_units=tuple(log_units) if isinstance(log_units, (list, tuple)) else log_units,  # type: ignore[arg-type]
                show_progress=show_progress,
                projector=bool(projector),
            ),
            schedule=ScheduleConfig(
                every_n_epochs=every_n_epochs,
                epochs=tuple(epochs) if epochs is not None else None,
                explain_on_fit_end=explain_on_fit_end,
                every_n_val_passes=every_n_val_passes,
            ),
            on_error=on_error,  # type: ignore[arg-type]
            speed=SpeedConfig(
                async_explain=async_explain,
                when_busy=when_busy,  # type: ignore[arg-type]
                embedding_cache_mb=float(embedding_cache_mb) if embedding_cache else None,
            ),
        )


def _evaluation_config(recording: RecordingConfig, explain: ExplainConfig) -> EvaluationConfig:
    from lightning_neurons.evaluation.harness import EvaluationConfig

    config = EvaluationConfig(
        image_mean=explain.image_mean,
        image_std=explain.image_std,
        reduction=recording.reduction,
        token_mode=recording.token_mode,
        input_key=recording.input_key,
        target_key=recording.target_key,
        seed=recording.seed,
    )
    return dataclasses.replace(
        config,
        output_selector=dict(recording.output_selector) if recording.output_selector else None,
        forward_fn=recording.forward_fn,
    )


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    _check(value in choices, f"{name} must be one of {list(choices)}, got {value!r}")


def _is_number(value: Any) -> bool:
    # bool is an int subclass, but True is no threshold; NaN fails the range checks that follow.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _validate_layers(layers: Any) -> None:
    if callable(layers) and not isinstance(layers, str):
        return
    names = [layers] if isinstance(layers, str) else layers
    _check(
        isinstance(names, (list, tuple)) and len(names) > 0 and all(isinstance(n, str) and n for n in names),
        f"layers must be a non-empty layer name, a list of names/glob patterns, or a predicate; got {layers!r}",
    )


def _validate_vocabulary(vocabulary: Sequence[str | os.PathLike[str]] | None) -> None:
    if vocabulary is None:
        return
    _check(
        isinstance(vocabulary, (list, tuple)) and all(isinstance(v, (str, os.PathLike)) for v in vocabulary),
        f"vocabulary must be a list of sources, got {vocabulary!r}",
    )
    for source in vocabulary:
        _check(
            source in VOCABULARY_SOURCES or os.path.isfile(source),
            f"vocabulary source {source!r} is neither one of {list(VOCABULARY_SOURCES)} nor an existing file",
        )


def _validate_normalisation(mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
    for name, values in (("image_mean", mean), ("image_std", std)):
        _check(
            values is None
            or (
                isinstance(values, (list, tuple))
                and len(values) in (1, 3)
                and all(isinstance(v, (int, float)) for v in values)
            ),
            f"{name} must be a list of 1 or 3 numbers, got {values!r}",
        )
    _check((mean is None) == (std is None), "give image_mean and image_std together")
    _check(std is None or all(v > 0 for v in std), f"image_std must be positive, got {std!r}")


__all__ = [
    "BackendConfig",
    "ForwardFn",
    "LayerSpec",
    "OutputConfig",
    "RecordingConfig",
    "RunConfig",
    "ScheduleConfig",
    "SpeedConfig",
]
