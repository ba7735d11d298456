"""The :class:`NeuronExplainer` Lightning callback.

It records, during validation, the top-k activating probe samples of chosen units (the recording half,
:mod:`lightning_neurons.recording`) and hands each scheduled recording to an
:class:`~lightning_neurons.session.ExplanationSession` (the explanation half) on global rank 0.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from torch.utils.data import DataLoader

from lightning_neurons.backends.base import Backend
from lightning_neurons.recording.layers import resolve_layers
from lightning_neurons.recording.recorder import ActivationRecorder
from lightning_neurons.recording.samples import DataLoaderSampleSource, batch_inputs, batch_targets
from lightning_neurons.recording.types import Recording
from lightning_neurons.results import ExplanationRound
from lightning_neurons.session import ExplanationSession

log = logging.getLogger(__name__)

_VOCABULARY_SOURCES = ("general", "classes", "llm")


class NeuronExplainer(Callback):
    r"""Explain in natural language what the units of chosen layers respond to, epoch after epoch.

    During each scheduled validation pass, forward hooks stream the top-``k`` activating validation samples of
    every unit (conv channel, token hidden dim, linear unit) with vectorised on-device merges; the memory held
    does not grow with the validation set. At the end of the pass the buffers of all DDP ranks are merged and,
    on global rank 0, the recording is explained (concept scoring, optional describe stage and ablation), scored,
    compared with the previous round (drift) and logged. Works on an unmodified LightningModule, in
    ``trainer.fit`` and ``trainer.validate``. The validation dataloader must not shuffle.

    Args:
        layers: Layers to explain: a module name from ``named_modules()`` (``"layer4"``), a glob pattern
            (``"layer*.1.conv2"``), a list of those, or a predicate ``(name, module) -> bool``.
        top_k: Top activating validation samples kept per unit.
        reduction: How a unit's activation map becomes one value per sample: spatial ``"max"`` or ``"mean"``.
        token_mode: For ``[B, T, D]`` (ViT) outputs: ``"auto"`` drops a leading class token when the rest forms a
            square patch grid, ``"drop_first"`` always drops the first token, ``"keep_all"`` keeps all tokens.
        output_selector: For layers that return a tuple or dict: ``{layer name or glob: index or key}`` of the
            tensor to record.
        input_key: Index or dict key of the images in a validation batch (``None``: first item or a usual key).
        target_key: Index or dict key of the integer class labels in a batch (``None``: second item or a usual
            key; labels are optional and only used for the ablation check).
        reservoir_size: Size of the uniform random sample of validation images used as control set.
        every_n_epochs: Explain after every n-th epoch (epochs ``n-1, 2n-1, ...``, like ModelCheckpoint);
            ``None`` disables this schedule.
        epochs: Explicit 0-based epochs to explain, in addition to ``every_n_epochs``.
        explain_on_fit_end: Explain the last validation pass at the end of ``fit`` if it was not explained yet.
        backend: Foundation models: ``"embedded"`` (offline pack), ``"clip"``, ``"hf"`` or a ``Backend``.
        backend_kwargs: Extra keyword arguments for the backend loader (model names, device, ...).
        vocabulary: Concept sources: ``"general"`` (built-in), ``"classes"`` (``class_names``), ``"llm"``
            (LLM-generated domain concepts) or paths to text files with one concept a line;
            ``None`` means ``["general", "classes"]``.
        class_names: Names of the dataset's classes, by class index.
        llm_vocabulary: Also ask the text generator for domain concepts (same as adding ``"llm"``).
        describe: Run the describe stage (caption the crops, let the LLM summarise into one phrase).
        ablation: Run the ablation check for the logged units: zero the unit and report the classes whose true-class
            probability drops most on the reservoir samples (needs labels in the validation batches).
        ablation_measure: ``"probability"`` (drop of each class's mean true-class probability, continuous) or
            ``"accuracy"`` (drop of its top-1 accuracy, the paper's measure; steps of one image per class).
        correction: Correction for concepts that match everything: ``"control"`` (subtract the concept's mean
            similarity on control crops) or ``"soft_wpmi"`` (CLIP-Dissect's soft-WPMI).
        image_mean: Per-channel mean the inputs were normalised with (to show and embed them); ``None``:
            per-image min-max scaling.
        image_std: Per-channel std the inputs were normalised with.
        log_units: Units per layer whose descriptions and crops are logged individually: a count (the first
            units), an explicit list of unit indices, or ``None`` for all.
        history_dir: Directory for the JSON/CSV drift history (``None``: the logger's directory).
        on_error: What a failure inside an explanation round does: ``"warn"`` logs it and training goes on,
            ``"raise"`` stops training.
        evaluate: Also compute the quality metrics of each explanation round (``lightning_neurons.evaluation``) and
            of three baselines (random concept, constant description, top-k label) on the validation samples
            outside every unit's top-k set; logged as ``evaluation/<method>/<metric>``.
        seed: Seed of the reservoir and of any sampling in the explanation stage.
        show_progress: Show progress bars while explaining.

    Example:
        >>> from lightning_neurons import NeuronExplainer
        >>> explainer = NeuronExplainer(layers=["layer3", "layer4"], top_k=16)
        >>> trainer = pl.Trainer(callbacks=[explainer])  # doctest: +SKIP
    """

    #: The explanation half; a class attribute so that tests or subclasses can swap it.
    session_class: type[ExplanationSession] = ExplanationSession

    def __init__(
        self,
        layers: str | list[str] | Callable[[str, nn.Module], bool],
        top_k: int = 16,
        reduction: Literal["max", "mean"] = "max",
        token_mode: Literal["auto", "drop_first", "keep_all"] = "auto",
        output_selector: dict[str, int | str] | None = None,
        input_key: int | str | None = None,
        target_key: int | str | None = None,
        reservoir_size: int = 64,
        every_n_epochs: int | None = 1,
        epochs: list[int] | None = None,
        explain_on_fit_end: bool = True,
        backend: str | Backend = "embedded",
        backend_kwargs: dict[str, Any] | None = None,
        vocabulary: list[str] | None = None,
        class_names: list[str] | None = None,
        llm_vocabulary: bool = False,
        describe: bool = False,
        ablation: bool = False,
        ablation_measure: Literal["probability", "accuracy"] = "probability",
        correction: Literal["control", "soft_wpmi"] = "control",
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        log_units: int | list[int] | None = 8,
        history_dir: str | None = None,
        on_error: Literal["warn", "raise"] = "warn",
        evaluate: bool = False,
        seed: int = 0,
        show_progress: bool = True,
    ) -> None:
        super().__init__()
        _validate_layers(layers)
        _check(isinstance(top_k, int) and top_k >= 1, f"top_k must be an integer >= 1, got {top_k!r}")
        _check_choice("reduction", reduction, ("max", "mean"))
        _check_choice("token_mode", token_mode, ("auto", "drop_first", "keep_all"))
        _check_choice("correction", correction, ("control", "soft_wpmi"))
        _check_choice("ablation_measure", ablation_measure, ("probability", "accuracy"))
        _check_choice("on_error", on_error, ("warn", "raise"))
        if output_selector is not None:
            _check(
                isinstance(output_selector, dict)
                and all(isinstance(k, str) and isinstance(v, (int, str)) for k, v in output_selector.items()),
                f"output_selector must be a dict {{layer name: index or key}}, got {output_selector!r}",
            )
        for name, key in (("input_key", input_key), ("target_key", target_key)):
            _check(key is None or isinstance(key, (int, str)), f"{name} must be an int, a str or None, got {key!r}")
        _check(
            isinstance(reservoir_size, int) and reservoir_size >= 0,
            f"reservoir_size must be an integer >= 0, got {reservoir_size!r}",
        )
        _check(
            every_n_epochs is None or (isinstance(every_n_epochs, int) and every_n_epochs >= 1),
            f"every_n_epochs must be an integer >= 1 or None, got {every_n_epochs!r}",
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
            backend_kwargs is None or isinstance(backend_kwargs, dict),
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

        # Every argument is kept under its own name: the ExplanationSession reads them from here.
        self.layers = layers
        self.top_k = top_k
        self.reduction = reduction
        self.token_mode = token_mode
        self.output_selector = output_selector
        self.input_key = input_key
        self.target_key = target_key
        self.reservoir_size = reservoir_size
        self.every_n_epochs = every_n_epochs
        self.epochs = list(epochs) if epochs is not None else None
        self.explain_on_fit_end = explain_on_fit_end
        self.backend = backend
        self.backend_kwargs = backend_kwargs
        self.vocabulary = vocabulary
        self.class_names = class_names
        self.llm_vocabulary = llm_vocabulary
        self.describe = describe
        self.ablation = ablation
        self.ablation_measure = ablation_measure
        self.correction = correction
        self.image_mean = image_mean
        self.image_std = image_std
        self.log_units = log_units
        self.history_dir = history_dir
        self.on_error = on_error
        self.evaluate = evaluate
        self.seed = seed
        self.show_progress = show_progress

        self.session: ExplanationSession | None = None
        self.last_recording: Recording | None = None
        self.rounds: list[ExplanationRound] = []
        self.layer_names: list[str] | None = None
        self.last_explained_epoch: int | None = None
        self._recorder: ActivationRecorder | None = None
        self._recording_now = False
        self._last_recording_explained = False
        self._warned_no_validation = False
        self._checkpoint_layers: list[str] | None = None
        self._session_state: dict[str, Any] | None = None
        self._outputs: dict[str, Path] = {}

    # ------------------------------------------------------------------ identity
    @property
    def state_key(self) -> str:
        """Distinguishes several explainers in one Trainer (as ModelCheckpoint does)."""
        layers = self.layers if isinstance(self.layers, (str, list, tuple)) else getattr(self.layers, "__name__", "fn")
        return self._generate_state_key(layers=layers, top_k=self.top_k, reduction=self.reduction)

    @property
    def num_hooks(self) -> int:
        """Forward hooks this callback currently has on the model (0 outside a recorded validation pass)."""
        return self._recorder.num_hooks if self._recorder is not None else 0

    def outputs(self) -> dict[str, Path]:
        """Where the explanations of the last run were written (history, HTML report, crops); empty before."""
        return dict(self.session.outputs()) if self.session is not None else dict(self._outputs)

    def recorder_settings(self) -> dict[str, Any]:
        """The recording arguments shared by the callback and :func:`~lightning_neurons.collect_top_k`."""
        return {
            "top_k": self.top_k,
            "reduction": self.reduction,
            "token_mode": self.token_mode,
            "output_selector": self.output_selector,
            "reservoir_size": self.reservoir_size,
            "seed": self.seed,
        }

    def ensure_session(self) -> ExplanationSession:
        """The explanation session, created if needed (the post-hoc path uses it without a Trainer)."""
        if self.session is None:
            self.session = self.session_class(self)
        return self.session

    # ------------------------------------------------------------------ set-up / tear-down
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Resolve the layers against the model and load the explanation models on rank 0 (fails early)."""
        if self._recorder is not None:
            self._recorder.detach()
        layers = resolve_layers(pl_module, self.layers)
        self._recorder = ActivationRecorder(
            pl_module, layers, world_size=trainer.world_size, rank=trainer.global_rank, **self.recorder_settings()
        )
        self.layer_names = list(layers)
        if self._checkpoint_layers is not None:
            self._check_layers_changed()
        if stage == TrainerFn.FITTING and (
            trainer.limit_val_batches == 0 or not is_overridden("validation_step", pl_module)
        ):
            self._warn_no_validation()
        if trainer.is_global_zero and self.session is None:
            session = self.session_class(self)
            if self._session_state is not None:  # a later fit/validate of this callback continues its history
                session.load_state_dict(self._session_state)
                self._session_state = None
            session.setup(trainer, pl_module)  # may raise: a bad config must fail before training starts
            self.session = session

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove any hook left and release the explanation models (their state is kept for a later run)."""
        self._stop_recording()
        if self.session is not None:
            try:
                self._session_state = self.session.state_dict()
                self._outputs = self.session.outputs()
            finally:
                self.session.teardown()
                self.session = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """No hook may outlive a crash."""
        self._stop_recording()

    # ------------------------------------------------------------------ recording
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Register the hooks if this validation pass is to be recorded."""
        if self._recorder is None or not self._should_record(trainer):
            return
        self._recorder.world_size = trainer.world_size
        self._recorder.rank = trainer.global_rank
        self._recorder.reset()
        self._recorder.attach()
        self._recording_now = True

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Give the batch's samples their ids (only the first validation dataloader is the probe set)."""
        if not self._recording_now or self._recorder is None:
            return
        if dataloader_idx != 0:
            self._recorder.skip_batch()
            return
        try:
            size: int | None = batch_inputs(batch, self.input_key).shape[0]
        except TypeError:
            size = None  # read off the first hooked output instead
        labels = batch_targets(batch, self.target_key)
        self._recorder.begin_batch(size, labels)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Merge all ranks' buffers (every rank), then explain on rank 0 if the epoch is scheduled."""
        if not self._recording_now or self._recorder is None:
            return
        try:
            # A collective: every rank must get here, so never guard it with is_global_zero.
            self._recorder.sync(trainer.strategy, device=pl_module.device, num_samples=_probe_size(trainer))
        finally:
            self._stop_recording()
        recording = self._recorder.result(epoch=trainer.current_epoch)
        self.last_recording = recording
        self._last_recording_explained = False
        validating = trainer.state.fn == TrainerFn.VALIDATING
        # Several validation passes per epoch (val_check_interval < 1): explain the epoch once.
        if validating or (self._scheduled(recording.epoch) and recording.epoch != self.last_explained_epoch):
            self._explain(trainer, pl_module, recording)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Explain the last recording if the schedule left it unexplained."""
        if self.last_recording is None:
            self._warn_no_validation()
            return
        if self.explain_on_fit_end and not self._last_recording_explained:
            self._explain(trainer, pl_module, self.last_recording)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Layer names, last explained epoch, the last recording and the explanation session's history."""
        session_state = self.session.state_dict() if self.session is not None else self._session_state
        return {
            "layers": self.layer_names,
            "last_explained_epoch": self.last_explained_epoch,
            "last_recording": self.last_recording.to_state() if self.last_recording is not None else None,
            "last_recording_explained": self._last_recording_explained,
            "session": session_state or {},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state of :meth:`state_dict`; warns if the configured layers changed since."""
        self._checkpoint_layers = state_dict.get("layers")
        if self.layer_names is not None:
            self._check_layers_changed()
        self.last_explained_epoch = state_dict.get("last_explained_epoch")
        last = state_dict.get("last_recording")
        self.last_recording = Recording.from_state(last) if last is not None else None
        self._last_recording_explained = bool(state_dict.get("last_recording_explained", True))
        session_state = state_dict.get("session") or {}
        if self.session is not None:
            self.session.load_state_dict(session_state)
        else:
            self._session_state = session_state

    # ------------------------------------------------------------------ internals
    def _scheduled(self, epoch: int | None) -> bool:
        if epoch is None:
            return False
        if self.epochs is not None and epoch in self.epochs:
            return True
        return self.every_n_epochs is not None and (epoch + 1) % self.every_n_epochs == 0

    def _should_record(self, trainer: pl.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        if trainer.state.fn == TrainerFn.VALIDATING or self.explain_on_fit_end:
            return True  # with explain_on_fit_end every pass is kept, so that the last one is at hand
        return self._scheduled(trainer.current_epoch)

    def _stop_recording(self) -> None:
        self._recording_now = False
        if self._recorder is not None:
            self._recorder.detach()

    def _explain(self, trainer: pl.Trainer, pl_module: pl.LightningModule, recording: Recording) -> None:
        self.last_explained_epoch = recording.epoch
        self._last_recording_explained = True
        if not trainer.is_global_zero or self.session is None:
            return
        was_training = pl_module.training
        try:
            source = DataLoaderSampleSource(_probe_loader(trainer), self.input_key, self.target_key)
            pl_module.eval()
            with torch.no_grad():
                rnd = self.session.run(trainer, pl_module, recording, source)
            self.rounds.append(rnd)
        except Exception as err:
            if self.on_error == "raise":
                raise
            log.exception("NeuronExplainer: explaining epoch %s failed", recording.epoch)
            rank_zero_warn(
                f"NeuronExplainer: explaining epoch {recording.epoch} failed ({type(err).__name__}: {err}); "
                "training continues (set on_error='raise' to stop instead)"
            )
        finally:
            pl_module.train(was_training)

    def _check_layers_changed(self) -> None:
        if self._checkpoint_layers is not None and self._checkpoint_layers != self.layer_names:
            rank_zero_warn(
                f"NeuronExplainer layers changed from {self._checkpoint_layers} (checkpoint) to {self.layer_names}; "
                "drift is only tracked for the layers present in both"
            )
        self._checkpoint_layers = None

    def _warn_no_validation(self) -> None:
        if not self._warned_no_validation:
            self._warned_no_validation = True
            rank_zero_warn(
                "NeuronExplainer records during validation, but no validation loop runs "
                "(no val_dataloader/validation_step or limit_val_batches=0); nothing will be explained"
            )


def _probe_loader(trainer: pl.Trainer) -> DataLoader:
    loaders = trainer.val_dataloaders
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    elif isinstance(loaders, dict):
        loaders = next(iter(loaders.values()), None)
    if not isinstance(loaders, DataLoader):
        raise RuntimeError("the validation dataloader is not available to fetch the probe samples")
    return loaders


def _probe_size(trainer: pl.Trainer) -> int | None:
    """Size of the probe set when DDP may have padded it with duplicates (else ``None``: no filtering)."""
    if trainer.world_size <= 1:
        return None
    try:
        loader = _probe_loader(trainer)
        return len(loader.dataset)  # type: ignore[arg-type]
    except (RuntimeError, TypeError):
        return None


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    _check(value in choices, f"{name} must be one of {list(choices)}, got {value!r}")


def _validate_layers(layers: Any) -> None:
    if callable(layers) and not isinstance(layers, str):
        return
    names = [layers] if isinstance(layers, str) else layers
    _check(
        isinstance(names, (list, tuple)) and len(names) > 0 and all(isinstance(n, str) and n for n in names),
        f"layers must be a non-empty layer name, a list of names/glob patterns, or a predicate; got {layers!r}",
    )


def _validate_vocabulary(vocabulary: list[str] | None) -> None:
    if vocabulary is None:
        return
    _check(
        isinstance(vocabulary, (list, tuple)) and all(isinstance(v, (str, os.PathLike)) for v in vocabulary),
        f"vocabulary must be a list of sources, got {vocabulary!r}",
    )
    for source in vocabulary:
        _check(
            source in _VOCABULARY_SOURCES or os.path.isfile(source),
            f"vocabulary source {source!r} is neither one of {list(_VOCABULARY_SOURCES)} nor an existing file",
        )


def _validate_normalisation(mean: list[float] | None, std: list[float] | None) -> None:
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


__all__ = ["NeuronExplainer"]
