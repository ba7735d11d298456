"""The :class:`NeuronExplainer` Lightning callback: a thin adapter between the Trainer and the library.

It validates its flat arguments into a :class:`~lightning_neurons.config.RunConfig`, records the top-k activating
probe samples during the scheduled validation passes (:mod:`lightning_neurons.recording`), and hands each
scheduled recording to an :class:`~lightning_neurons.session.ExplanationSession`, adapting what the Trainer
knows (loggers, run folder, class names, probe loader, ranks) into the values the session takes.

Schedules (one rule each, see the class docstring): epoch-based validation explains the validation pass at the
end of a scheduled epoch, keyed and logged by epoch; step-based validation (``check_val_every_n_epoch=None``)
counts validation passes instead and keys rounds by global step; ``trainer.validate`` explains its pass (under the
checkpoint's epoch when ``ckpt_path`` is given); ``fast_dev_run`` explains nothing. Every round is explained once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from torch.utils.data import DataLoader

from lightning_neurons.backends.base import Backend
from lightning_neurons.background import BackgroundExplainer, RoundJob, async_refusal, frozen_copy, worker_stream
from lightning_neurons.config import RunConfig
from lightning_neurons.explanation.embedding_cache import DEFAULT_CACHE_MB
from lightning_neurons.identity import new_run_id
from lightning_neurons.recording.prechecks import (
    check_log_units,
    dry_run_recording,
    warn_if_unnormalised,
    with_dataset_normalisation,
)
from lightning_neurons.recording.probe_data import check_image_sizes, check_one_size, class_names_of, setup_val_loader
from lightning_neurons.recording.recorder import ActivationRecorder
from lightning_neurons.recording.samples import DataLoaderSampleSource, batch_inputs, batch_targets
from lightning_neurons.recording.types import Recording
from lightning_neurons.results import ExplanationRound
from lightning_neurons.round_cost import TrainingClock, slow_round_message
from lightning_neurons.runs import RunBinding, weights_epoch
from lightning_neurons.session import ExplanationSession, dataset_class_names
from lightning_neurons.sharing import WorkShare

log = logging.getLogger(__name__)

#: Flat argument name -> (part of RunConfig, field): read-only views kept for code that read them off the callback.
_FLAT = {
    "layers": ("recording", "layers"),
    "top_k": ("recording", "top_k"),
    "reduction": ("recording", "reduction"),
    "token_mode": ("recording", "token_mode"),
    "output_selector": ("recording", "output_selector"),
    "input_key": ("recording", "input_key"),
    "target_key": ("recording", "target_key"),
    "reservoir_size": ("recording", "reservoir_size"),
    "seed": ("recording", "seed"),
    "forward_fn": ("recording", "forward_fn"),
    "every_n_epochs": ("schedule", "every_n_epochs"),
    "epochs": ("schedule", "epochs"),
    "explain_on_fit_end": ("schedule", "explain_on_fit_end"),
    "backend": ("backend", "backend"),
    "backend_kwargs": ("backend", "backend_kwargs"),
    "vocabulary": ("backend", "vocabulary"),
    "class_names": ("backend", "class_names"),
    "llm_vocabulary": ("backend", "llm_vocabulary"),
    "describe": ("explain", "describe"),
    "multi_concept": ("explain", "multi_concept"),
    "ablation": ("explain", "ablation"),
    "ablation_measure": ("explain", "ablation_measure"),
    "correction": ("explain", "correction"),
    "confidence_threshold": ("explain", "confidence_threshold"),
    "frequency_penalty": ("explain", "frequency_penalty"),
    "selection": ("explain", "selection"),
    "permutations": ("explain", "permutations"),
    "q_threshold": ("explain", "q_threshold"),
    "gain_margin": ("explain", "gain_margin"),
    "image_mean": ("explain", "image_mean"),
    "image_std": ("explain", "image_std"),
    "log_units": ("output", "log_units"),
    "history_dir": ("output", "history_dir"),
    "name": ("output", "name"),
    "show_progress": ("output", "show_progress"),
    "projector": ("output", "projector"),
    "async_explain": ("speed", "async_explain"),
    "when_busy": ("speed", "when_busy"),
}


class NeuronExplainer(Callback):
    r"""Explain in natural language what the units of chosen layers respond to, epoch after epoch.

    During each scheduled validation pass, forward hooks stream the top-``k`` activating validation samples of
    every unit (conv channel, token hidden dim, linear unit) with vectorised on-device merges; the memory held
    does not grow with the validation set. At the end of the pass the buffers of all DDP ranks are merged; every
    rank explains its share of the round (the crop embedding is split between ranks) and global rank 0 compares it
    with the previous round (drift) and logs it to every configured logger. Works on an unmodified
    LightningModule, in ``trainer.fit`` and ``trainer.validate``. The validation dataloader must not shuffle.

    Schedules: with epoch-based validation, the validation pass at the end of a scheduled epoch is recorded and
    explained, keyed and logged by epoch (with ``val_check_interval < 1`` the passes inside the epoch are not
    recorded). With step-based validation (``check_val_every_n_epoch=None``) ``every_n_epochs`` and ``epochs``
    count validation passes and rounds are keyed and logged by global step. ``trainer.validate`` explains its pass
    (under the checkpoint's epoch with ``ckpt_path=``). ``fast_dev_run`` explains nothing. A schedule that the
    Trainer's validation schedule cannot (fully) serve warns once in ``setup``.

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
        reservoir_size: Size of the uniform random sample of validation images used as control set and, with each
            unit's top samples, as the samples its score and significance are computed on (more samples, more power:
            the best of ~1,100 concepts under permuted activations correlates ~0.42 on 80 samples, ~0.23 on 272).
        every_n_epochs: Explain after every n-th epoch (epochs ``n-1, 2n-1, ...``, like ModelCheckpoint);
            ``None`` disables this schedule.
        epochs: Explicit 0-based epochs to explain, in addition to ``every_n_epochs``.
        explain_on_fit_end: Explain the last recorded validation pass at the end of ``fit`` if it was not explained
            yet (the end-of-epoch passes are then recorded even when not scheduled).
        backend: Foundation models: ``"auto"`` (default: open_clip when its weights are cached or can be fetched,
            else the offline pack with one warning), ``"embedded"`` (offline pack), ``"clip"``, ``"hf"`` or a
            ``Backend``.
        backend_kwargs: Extra keyword arguments for the backend loader (model names, device, ...).
        vocabulary: Concept sources: ``"general"`` (built-in), ``"classes"`` (``class_names``), ``"llm"``
            (LLM-generated domain concepts) or paths to text files with one concept a line;
            ``None`` means ``["general", "classes"]``.
        class_names: Names of the dataset's classes, by class index.
        llm_vocabulary: Also ask the text generator for domain concepts (same as adding ``"llm"``).
        describe: Run the describe stage (caption the crops, let the LLM summarise into one phrase).
        multi_concept: Also explain each unit as a weighted combination of up to 3 concepts ("stripes (0.62) +
            zebra (0.38)"), fitted to its activations on its top crops and the reservoir images; kept (shown in
            TensorBoard, the report and the history) only where it predicts held-out samples better than the
            single description.
        ablation: Run the ablation check for the logged units: zero the unit and report the classes whose true-class
            probability drops most on the reservoir samples (needs labels in the validation batches).
        ablation_measure: ``"probability"`` (drop of each class's mean true-class probability, continuous) or
            ``"accuracy"`` (drop of its top-1 accuracy, the paper's measure; steps of one image per class).
        correction: Correction for concepts that match everything: ``"control"`` (subtract the concept's mean
            similarity on control crops) or ``"soft_wpmi"`` (CLIP-Dissect's soft-WPMI).
        confidence_threshold: Units whose explanation confidence (how often the unit's best concept beats the best
            concept of a random set of its layer's top crops; 0.5 = chance) is at or below this are shown as
            "no clear concept" in TensorBoard and the report; the history keeps the best concept and its
            confidence. Calibrated on a random-weight network (the benchmark's randomisation check); ``None``:
            show every description.
        frequency_penalty: Weight of the penalty on concepts that win across a layer (each unit's concept scores
            minus this times the concept's mean score over the layer's units that do not share its top samples);
            ``0`` turns it off.
        selection: How a unit's description is chosen: ``"concept_score"`` (the corrected top-crop concept score,
            stable across seeds) or ``"correlation"`` (the concept whose image similarity correlates best with the
            unit's activations over the reservoir and its top samples).
        permutations: Permutations of each unit's activations in the per-round significance test (the smallest
            p-value is ``1 / (permutations + 1)``); ``0``: no test, every live unit is kind ``"unclear"``.
        q_threshold: Benjamini-Hochberg false discovery rate over a layer's units, in ``(0, 1]``: units with a
            q-value above it are kind ``"unclear"`` ("no clear concept").
        gain_margin: Cross-validated correlation, in ``[-1, 2)``, the concept must add beyond simple image
            statistics (colour, brightness, edges) for a significant unit to be kind ``"concept"``; at or below
            it the unit is ``"low_level"``.
        image_mean: Per-channel mean the inputs were normalised with (to show and embed them); ``None``:
            per-image min-max scaling.
        image_std: Per-channel std the inputs were normalised with.
        log_units: Units per layer whose descriptions and crops are logged individually: a count (the first
            units), an explicit list of unit indices, or ``None`` for all.
        history_dir: Directory for the JSON/CSV drift history (``None``: the run's folder of the first logger).
        on_error: What a failure inside an explanation round does: ``"warn"`` logs it and training goes on,
            ``"raise"`` stops training.
        evaluate: Also compute the quality metrics of each explanation round (``lightning_neurons.evaluation``) and
            of three baselines (random concept, constant description, top-k label) on the validation samples
            outside every unit's top-k set; logged as ``evaluation/<method>/<metric>``.
        seed: Seed of the reservoir and of any sampling in the explanation stage.
        show_progress: Show progress bars while explaining.
        name: Name of this explainer, for several explainers in one Trainer: its output folder is
            ``neurons-<name>``, its tag prefix ``neurons-<name>`` and its ``state_key`` stays the same across
            resumes whatever else changes. ``None``: one explainer writes to ``neurons``; several get names derived
            from their layers (and backend and vocabulary where those differ from the defaults).
        forward_fn: How to run the model on a batch of probe images when its ``forward`` does not take images
            (e.g. Hugging Face style ``lambda module, x: module.model(pixel_values=x)``); ``None``: ``module(x)``.
            On the command line, the import path of a function ``(module, images) -> output``.
        projector: Also write a TensorBoard Projector map of all units per layer and round (one point per unit:
            its description's text embedding; its top crop as sprite; unit, description, score, changed as
            metadata; at most 2,000 units per layer).
        async_explain: Explain each scheduled round in a background thread while training goes on. The round is
            handed off at the end of its validation pass (the recording and a frozen copy of the model) and filed
            under its own epoch and step in every logger at the first hook after it is ready; at most one round is
            in flight, the end of ``fit`` and ``teardown`` wait for it, and a failure follows ``on_error`` (with
            ``"raise"``, at the next hook). Rounds still run in the validation hook, as with ``False``, in
            ``trainer.validate``, for a compiled model, an iterable probe dataset, the explanation at fit end, or
            when a callback monitors this explainer's metrics (it must see the round in its own epoch). Under DDP
            ``True`` has rank 0 explain each round alone in its worker while every rank trains on (only rank 0 then
            holds the round's figures); ``"auto"`` (the default) keeps DDP rounds in the validation hook, shared
            between the ranks (as fast on 2 CPU processes, and every rank keeps the figures; README, "DDP"), and
            CPU rounds too, where the worker would compete with training for the same cores (measured slower on 2
            cores; README, "Speed").
        when_busy: When a scheduled round comes while the previous one is still explained in the background:
            ``"wait"`` for it, or ``"skip"`` the new round with a warning.
        embedding_cache: Keep the embeddings of region crops, control crops and whole images across rounds and
            layers, so that a region embedded once is never embedded again (the encoder is frozen; results are the
            same). Hits and misses are in each round's ``meta["embedding_cache"]``.
        embedding_cache_mb: Bound of that cache in MiB (least recently used embeddings go first; an embedding of
            the embedded backend is about 4 KiB).

    Example:
        >>> from lightning_neurons import NeuronExplainer
        >>> explainer = NeuronExplainer(layers=["layer3", "layer4"], top_k=16)
        >>> trainer = pl.Trainer(callbacks=[explainer])  # doctest: +SKIP
    """

    def __init__(
        self,
        layers: str | list[str] | Callable[[str, nn.Module], bool],
        top_k: int = 16,
        reduction: Literal["max", "mean"] = "max",
        token_mode: Literal["auto", "drop_first", "keep_all"] = "auto",
        output_selector: dict[str, int | str] | None = None,
        input_key: int | str | None = None,
        target_key: int | str | None = None,
        reservoir_size: int = 256,
        every_n_epochs: int | None = 1,
        epochs: list[int] | None = None,
        explain_on_fit_end: bool = True,
        backend: str | Backend = "auto",
        backend_kwargs: dict[str, Any] | None = None,
        vocabulary: list[str] | None = None,
        class_names: list[str] | None = None,
        llm_vocabulary: bool = False,
        describe: bool = False,
        multi_concept: bool = True,
        ablation: bool = False,
        ablation_measure: Literal["probability", "accuracy"] = "probability",
        correction: Literal["control", "soft_wpmi"] = "control",
        confidence_threshold: float | None = 0.85,
        frequency_penalty: float = 0.5,
        selection: Literal["concept_score", "correlation"] = "concept_score",
        permutations: int = 200,
        q_threshold: float = 0.05,
        gain_margin: float = 0.05,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        log_units: int | list[int] | None = 8,
        history_dir: str | None = None,
        on_error: Literal["warn", "raise"] = "warn",
        evaluate: bool = False,
        seed: int = 0,
        show_progress: bool = True,
        name: str | None = None,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        projector: bool = False,
        async_explain: bool | Literal["auto"] = "auto",
        when_busy: Literal["wait", "skip"] = "wait",
        embedding_cache: bool = True,
        embedding_cache_mb: float = DEFAULT_CACHE_MB,
    ) -> None:
        super().__init__()
        self.config = RunConfig.from_arguments(
            layers=layers,
            top_k=top_k,
            reduction=reduction,
            token_mode=token_mode,
            output_selector=output_selector,
            input_key=input_key,
            target_key=target_key,
            reservoir_size=reservoir_size,
            every_n_epochs=every_n_epochs,
            epochs=epochs,
            explain_on_fit_end=explain_on_fit_end,
            backend=backend,
            backend_kwargs=backend_kwargs,
            vocabulary=vocabulary,
            class_names=class_names,
            llm_vocabulary=llm_vocabulary,
            describe=describe,
            multi_concept=multi_concept,
            ablation=ablation,
            ablation_measure=ablation_measure,
            correction=correction,
            confidence_threshold=confidence_threshold,
            frequency_penalty=frequency_penalty,
            selection=selection,
            permutations=permutations,
            q_threshold=q_threshold,
            gain_margin=gain_margin,
            image_mean=image_mean,
            image_std=image_std,
            log_units=log_units,
            history_dir=history_dir,
            on_error=on_error,
            evaluate=evaluate,
            seed=seed,
            show_progress=show_progress,
            name=name,
            forward_fn=forward_fn,
            projector=projector,
            async_explain=async_explain,
            when_busy=when_busy,
            embedding_cache=embedding_cache,
            embedding_cache_mb=embedding_cache_mb,
        )
        self.session: ExplanationSession | None = None
        self.last_recording: Recording | None = None
        self.rounds: list[ExplanationRound] = []
        self.layer_names: list[str] | None = None
        self.last_explained_key: int | None = None
        self._recorder: ActivationRecorder | None = None
        self._recording_now = False
        self._last_recording_explained = False
        self._warned_no_validation = False
        self._checkpoint_layers: list[str] | None = None
        self._checkpoint_epoch: int | None = None
        self._session_state: dict[str, Any] | None = None
        self._outputs: dict[str, Path] = {}
        self._disabled = False
        self._outputs_checked = False
        self._val_passes = 0
        self._pass_index = 0
        self._keep_history = False
        self._run_config: RunConfig = self.config
        self._background = BackgroundExplainer(self._explain_job)
        self._pending_round: int | None = None  # a checkpoint's round that was still in the background
        self._hook_reason: str | None = None  # why rounds run in the validation hook (logged once)
        self._training_clock = TrainingClock()  # how long the epoch trained before its validation pass
        self._said_slow = False  # "training waited for a round longer than it trained" is said once per run
        # Which run the state above belongs to (see lightning_neurons.identity): the Trainer it runs in, the run id
        # its rounds carry, and the (key, global step) of the last explained pass.
        self._run = RunBinding()
        self._last_explained_step: int | None = None
        self._last_recording_step: int | None = None
        self._checkpoint_step: int | None = None
        self._recorded_any = False
        self._probe_sizes: dict[tuple[int, ...], int] = {}  # input size -> first batch index, per recorded pass

    def __getattr__(self, name: str) -> Any:
        # Read-only views of the flat arguments (``explainer.top_k``); settings live in ``self.config``.
        if name in _FLAT and "config" in self.__dict__:
            part, field = _FLAT[name]
            return getattr(getattr(self.__dict__["config"], part), field)
        if name in ("evaluate", "on_error") and "config" in self.__dict__:
            return getattr(self.__dict__["config"], name)
        if name in ("embedding_cache", "embedding_cache_mb") and "config" in self.__dict__:
            mb = self.__dict__["config"].speed.embedding_cache_mb
            return mb is not None if name == "embedding_cache" else (mb or DEFAULT_CACHE_MB)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ------------------------------------------------------------------ identity
    @property
    def identity(self) -> str:
        """The explainer's name, or one derived from what it explains (layers, non-default backend/vocabulary)."""
        if self.config.output.name:
            return self.config.output.name
        return derived_name(self.config)

    @property
    def state_key(self) -> str:
        """Distinguishes several explainers in one Trainer; stable when only non-identity settings change."""
        return self._generate_state_key(name=self.identity)

    @property
    def last_explained_epoch(self) -> int | None:
        """The key (epoch, or global step under step-based validation) of the last explained round."""
        return self.last_explained_key

    @property
    def num_hooks(self) -> int:
        """Forward hooks this callback currently has on the model (0 outside a recorded validation pass)."""
        return self._recorder.num_hooks if self._recorder is not None else 0

    def outputs(self) -> dict[str, Path]:
        """Where the explanations of the last run were written (history, HTML report, crops); empty before."""
        return dict(self.session.outputs()) if self.session is not None else dict(self._outputs)

    def recorder_settings(self) -> dict[str, Any]:
        """The recording arguments shared by the callback and :func:`~lightning_neurons.collect_top_k`."""
        return self.config.recording.recorder_kwargs()

    # ------------------------------------------------------------------ set-up / tear-down
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Resolve the layers, load the explanation models and open the outputs on every rank (fails early)."""
        from lightning_neurons.recording.hooks import LayerTaps, check_compiled

        if self._recorder is not None:
            self._recorder.detach()
        refuse_sharded_strategy(trainer.strategy)
        if self._run.is_new(trainer):  # another Trainer: a new run, whatever this object explained before
            self._start_new_run()
        self._disabled = bool(getattr(trainer, "fast_dev_run", False))
        if self._disabled:
            rank_zero_info(f"NeuronExplainer[{self.identity}]: fast_dev_run is on, so no round is explained")
            return
        taps = LayerTaps(
            pl_module,
            self.config.recording.layers,
            self.config.recording.output_selector,
            self.config.recording.token_mode,
        )
        check_compiled(pl_module)
        self._recorder = ActivationRecorder(
            pl_module,
            taps.layers,
            world_size=trainer.world_size,
            rank=trainer.global_rank,
            **self.config.recording.recorder_kwargs(),
        )
        self.layer_names = list(taps.layers)
        if self._checkpoint_layers is not None:
            self._check_layers_changed()
        if stage == TrainerFn.FITTING:
            if trainer.limit_val_batches == 0 or not is_overridden("validation_step", pl_module):
                self._warn_no_validation()
            else:
                self._warn_unreachable_schedule(trainer)
        self._outputs_checked = False
        # Every rank: reading the run folder may broadcast, and every rank explains its share of each round.
        self._run_config = with_dataset_normalisation(self._resolve_output(trainer), setup_val_loader(trainer))
        output_dir = self._output_dir(trainer)
        if self.session is None:
            session = ExplanationSession(self._run_config, writes=trainer.is_global_zero)
            session.run_id = self._run.run_id
            if self._session_state is not None:  # a later fit/validate of this callback continues its history
                session.load_state_dict(self._session_state)
                self._session_state = None
            # Loading models may draw from the global RNG (weight init before the checkpoint is read): keep training's
            # random stream as it would be without the explainer.
            with _training_rng_kept(pl_module):
                session.setup(class_names=_trainer_class_names(trainer))  # may raise: fail before training starts
            session.open(output_dir, self._writers(trainer, session) if trainer.is_global_zero else [])
            self.session = session

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove any hook left and release the explanation models (their state is kept for a later run)."""
        self._stop_recording()
        if self.session is not None:
            try:
                try:
                    self._settle(trainer)  # a round in the background is finished and filed first
                finally:
                    self._session_state = self.session.state_dict()
                    self._outputs = self.session.outputs()
            finally:
                self.session.teardown()
                self.session = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """No hook may outlive a crash; a round still in the background is dropped (no half-filed round)."""
        self._stop_recording()
        self._background.abandon()

    # ------------------------------------------------------------------ recording
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run one validation batch through the chosen layers, so that an unsupported output fails before step 0."""
        self._claim_output()
        self._check_outputs(trainer, pl_module)
        self._explain_pending(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start timing the epoch's training (a round that holds it up longer is reported once)."""
        self._training_clock.epoch_started()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Register the hooks if this validation pass is to be recorded."""
        self._drain(trainer)
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._training_clock.validation_started()
        if self._recorder is None or self._disabled or trainer.sanity_checking:
            return
        if trainer.state.fn == TrainerFn.FITTING and not _end_of_epoch_pass(trainer) and not _step_based(trainer):
            return  # a pass inside the epoch (val_check_interval < 1): the end-of-epoch pass is the one explained
        index = self._val_passes
        self._val_passes += 1
        if not self._should_record(trainer, index):
            return
        self._claim_output()
        self._check_outputs(trainer, pl_module)
        self._recorder.world_size = trainer.world_size
        self._recorder.rank = trainer.global_rank
        self._recorder.reset()
        self._probe_sizes = {}
        self._recorder.attach()
        self._recording_now = True
        self._pass_index = index

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
            inputs = batch_inputs(batch, self.config.recording.input_key)
            size: int | None = inputs.shape[0]
            self._probe_sizes.setdefault(tuple(inputs.shape[1:]), batch_idx)  # metadata only: no host sync
        except TypeError:
            size = None  # read off the first hooked output instead
        labels = batch_targets(batch, self.config.recording.target_key)
        self._recorder.begin_batch(size, labels)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Merge all ranks' buffers (every rank), then explain if the pass is scheduled."""
        if not self._recording_now or self._recorder is None:
            return
        recorder = self._recorder

        def read() -> Recording:
            # A collective: every rank must get here, so never guard it with is_global_zero.
            recorder.sync(trainer.strategy, device=pl_module.device, num_samples=_probe_size(trainer))
            check_one_size(self._probe_sizes)  # e.g. an iterable dataset, which the check before step 0 cannot sample
            return recorder.result(epoch=self._round_key(trainer))

        try:
            recording = self._guarded(read, f"reading the recording of round {self._round_key(trainer)}")
        finally:
            self._stop_recording()
        if recording is None:
            self._recorded_any = True  # a pass was recorded; reading it failed (warned): not "no validation"
            return
        self._recorded_any = True
        self._last_recording_step = self._weights_step(trainer)
        self.last_recording = recording
        self._last_recording_explained = False
        validating = trainer.state.fn == TrainerFn.VALIDATING
        if validating or (self._scheduled(trainer, self._pass_index) and not self._explained(recording)):
            self._explain(trainer, pl_module, recording)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """File a round the background worker finished (on the main thread: loggers, history, metrics)."""
        self._drain(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """File a round the background worker finished."""
        self._drain(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Wait for a round in the background, then explain the last recording if the schedule left it unexplained."""
        self._settle(trainer)
        if self._disabled:
            return
        if self.last_recording is None:
            if not self._recorded_any:
                self._warn_no_validation()
            return
        if self.config.schedule.explain_on_fit_end and not self._last_recording_explained:
            if not self._explained(self.last_recording):
                self._explain(trainer, pl_module, self.last_recording, background=False)  # fit end waits anyway
        if trainer.is_global_zero and self.session is not None and self.rounds:
            outputs = "; ".join(f"{label}: {path}" for label, path in self.session.outputs().items())
            rank_zero_info(f"NeuronExplainer[{self.identity}] wrote {outputs}")

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Layer names, last explained key, the last recording and the explanation session's history."""
        session_state = self.session.state_dict() if self.session is not None else self._session_state
        explained_key, recording_explained = self.last_explained_key, self._last_recording_explained
        explained_step = self._last_explained_step
        pending = self._background.outstanding
        if pending is not None:  # handed off, not filed: the checkpoint holds finished rounds only
            explained_key, explained_step = pending.previous_key, pending.previous_step
            recording_explained = recording_explained and self.last_recording is not pending.recording
        return {
            "name": self.identity,
            "layers": self.layer_names,
            "last_explained_epoch": explained_key,
            "last_recording": self.last_recording.to_state() if self.last_recording is not None else None,
            "last_recording_explained": recording_explained,
            # Handed to the background worker, not filed yet: a run resumed from this checkpoint explains it again.
            "pending_round": pending.key if pending is not None else None,
            "val_passes": self._val_passes,
            "run": self._run.run_id,
            "last_explained_step": explained_step,
            "last_recording_step": self._last_recording_step,
            "session": session_state or {},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state of :meth:`state_dict`; warns if the configured layers changed since."""
        self._checkpoint_layers = state_dict.get("layers")
        if self.layer_names is not None:
            self._check_layers_changed()
        self.last_explained_key = state_dict.get("last_explained_epoch")
        self._last_explained_step = state_dict.get("last_explained_step")
        self._last_recording_step = state_dict.get("last_recording_step")
        if state_dict.get("run") and not self._keep_history:  # a resumed run goes on under its own id
            self._run.run_id = str(state_dict["run"])
            if self.session is not None:
                self.session.run_id = self._run.run_id
        last = state_dict.get("last_recording")
        self.last_recording = Recording.from_state(last) if last is not None else None
        self._last_recording_explained = bool(state_dict.get("last_recording_explained", True))
        self._pending_round = state_dict.get("pending_round")
        self._val_passes = int(state_dict.get("val_passes", 0))
        session_state = state_dict.get("session") or {}
        if self._keep_history:
            self._keep_history = False
        elif self.session is not None:
            self.session.load_state_dict(session_state)
        else:
            self._session_state = session_state

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Note the checkpoint's epoch; adopt this explainer's state when only its derived name changed."""
        epoch, step = checkpoint.get("epoch"), checkpoint.get("global_step")
        self._checkpoint_epoch = int(epoch) if isinstance(epoch, int) else None
        self._checkpoint_step = int(step) if isinstance(step, int) else None
        # validate(ckpt_path=...) re-explains an older checkpoint: keep the history this explainer already has.
        self._keep_history = trainer.state.fn == TrainerFn.VALIDATING and self.session is not None and bool(
            len(self.session.history)
        )
        states = checkpoint.get("callbacks")
        if not isinstance(states, dict) or self.state_key in states:
            return
        # The derived name follows the layers: a resume with other layers looks for another key. Adopt the one
        # NeuronExplainer state that no explainer of this Trainer claims, so that drift continues (and warns).
        mine = type(self).__qualname__
        claimed = {cb.state_key for cb in trainer.callbacks if isinstance(cb, Callback)}  # type: ignore[attr-defined]
        orphans = [k for k in states if k.startswith(mine) and k not in claimed]
        explainers = [cb for cb in trainer.callbacks if isinstance(cb, NeuronExplainer)]  # type: ignore[attr-defined]
        unmatched = [cb for cb in explainers if cb.state_key not in states]
        if len(orphans) == 1 and unmatched == [self]:
            states[self.state_key] = states.pop(orphans[0])

    # ------------------------------------------------------------------ internals
    def _scheduled(self, trainer: pl.Trainer, pass_index: int) -> bool:
        if _step_based(trainer):
            return self.config.schedule.epoch_scheduled(pass_index)
        return self.config.schedule.epoch_scheduled(trainer.current_epoch)

    def _should_record(self, trainer: pl.Trainer, pass_index: int) -> bool:
        if trainer.state.fn == TrainerFn.VALIDATING or self.config.schedule.explain_on_fit_end:
            return True  # with explain_on_fit_end every end-of-epoch pass is kept, so that the last one is at hand
        return self._scheduled(trainer, pass_index)

    def _round_key(self, trainer: pl.Trainer) -> int:
        """The key a round is filed under: the epoch, the global step (step-based), or the checkpoint's epoch.

        ``trainer.validate`` without ``ckpt_path`` files the weights under the epoch that last trained them: after
        ``fit`` that is the last fitted epoch (``current_epoch`` already counts it as done), before any training 0.
        """
        if trainer.state.fn == TrainerFn.VALIDATING:
            if self._checkpoint_epoch is not None:
                return self._checkpoint_epoch
            return weights_epoch(trainer)
        if _step_based(trainer) and trainer.state.fn == TrainerFn.FITTING:
            return int(trainer.global_step)
        return int(trainer.current_epoch)

    def _weights_step(self, trainer: pl.Trainer) -> int:
        """The global step of the weights a pass records (the checkpoint's under ``validate(ckpt_path=...)``)."""
        if trainer.state.fn == TrainerFn.VALIDATING and self._checkpoint_step is not None:
            return self._checkpoint_step
        return int(trainer.global_step)

    def _explained(self, recording: Recording) -> bool:
        """Whether this pass (its key and the step of its weights) was explained already."""
        if recording.epoch != self.last_explained_key:
            return False
        step = self._last_recording_step if recording is self.last_recording else None
        return self._last_explained_step is None or step is None or step == self._last_explained_step

    def _start_new_run(self) -> None:
        """Forget the previous Trainer's run: its history, last recording and explained epochs stay with it."""
        self._run.run_id = new_run_id()
        self._session_state = None
        self.last_recording = None
        self.last_explained_key = None
        self._last_explained_step = self._last_recording_step = None
        self._last_recording_explained = False
        self._val_passes = 0
        self._checkpoint_epoch = self._checkpoint_step = None
        self.rounds = []
        self._outputs = {}
        self._said_slow = False  # said once per run, and this is another run

    def _guarded(self, work: Callable[[], Any], what: str) -> Any:
        """Run part of a round; a failure warns (``None``) or raises, as ``on_error`` says."""
        try:
            return work()
        except Exception as err:
            if self.config.on_error == "raise":
                raise
            log.exception("NeuronExplainer: %s failed", what)
            rank_zero_warn(
                f"NeuronExplainer[{self.identity}]: {what} failed ({type(err).__name__}: {err}); training continues "
                "(set on_error='raise' to stop instead)"
            )
            return None

    def _stop_recording(self) -> None:
        self._recording_now = False
        if self._recorder is not None:
            self._recorder.detach()

    def _claim_output(self) -> None:
        """After any checkpoint restore: never append to another run's history (rank 0 writes; others skip)."""
        if self.session is None or not self.session.writes:
            return
        moved = self.session.claim_output(fresh_folder=not self._run_config.output.history_dir)
        if moved is not None:
            rank_zero_warn(
                f"NeuronExplainer[{self.identity}]: the run folder already holds another run's history (no logger "
                f"gives this run its own folder); this run writes to {moved}"
            )

    def _check_outputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the chosen layers' outputs on the first validation batch (once per run)."""
        if self._outputs_checked or self._recorder is None or self._disabled:
            return
        from lightning_neurons.recording.hooks import check_layer_outputs
        from lightning_neurons.regions import check_image_inputs

        self._outputs_checked = True
        try:
            loader = _probe_loader(trainer)
        except RuntimeError:
            return  # no validation loader yet: the recorder's own checks apply at the first recorded batch
        # Starting a DataLoader iterator draws from the global RNG: keep training's random stream untouched.
        with _training_rng_kept(pl_module):
            batch = next(iter(loader), None)
            if batch is None:
                return
            inputs = batch_inputs(batch, self.config.recording.input_key)
            check_image_inputs(inputs)  # before a whole validation pass is recorded for an explanation that must fail
            check_image_sizes(loader, self.config.recording.input_key)
            check_layer_outputs(pl_module, self._recorder.taps, inputs, forward_fn=self.config.recording.forward_fn)
            probe = dry_run_recording(trainer, pl_module, self.config.recording, inputs)
            check_log_units(self.config.output.log_units, probe)
            warn_if_unnormalised(self._run_config, inputs, self.identity)

    def _explain(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, recording: Recording, background: bool = True
    ) -> None:
        """Explain a recording on every rank (each takes its share); rank 0 writes. Failures warn or raise.

        With ``async_explain`` (and ``background``) the round goes to the background worker where that is safe.
        """
        if not recording.layers:
            return  # no chosen layer ran (the recorder warned): an empty round would look like an explained one
        if self.session is not None and self._in_background(trainer, pl_module, recording, background):
            return
        self._settle(trainer)  # rounds are filed in order
        self.last_explained_key = recording.epoch
        self._last_explained_step = self._last_recording_step
        self._last_recording_explained = True
        if self.session is None:
            return
        was_training = pl_module.training
        share = (
            WorkShare(trainer.global_rank, trainer.world_size, trainer.strategy.all_gather, device=pl_module.device)
            if trainer.world_size > 1
            else None
        )
        step = recording.epoch
        try:
            source = DataLoaderSampleSource(
                _probe_loader(trainer), self.config.recording.input_key, self.config.recording.target_key
            )
            pl_module.eval()
            started = time.perf_counter()
            with torch.no_grad():
                rnd = self.session.explain(
                    pl_module,
                    recording,
                    source,
                    epoch=recording.epoch,
                    step=step,
                    share=share,
                    keep_later=trainer.state.fn == TrainerFn.VALIDATING,
                    global_step=self._last_recording_step,
                )
            self.rounds.append(rnd)
            self._publish_metrics(trainer)
            self._say_if_slow(trainer, recording.epoch, time.perf_counter() - started)
        except Exception as err:
            self._failed(recording.epoch, err)
        finally:
            pl_module.train(was_training)

    def _say_if_slow(self, trainer: pl.Trainer, key: int | None, round_s: float) -> None:
        """Once per run: training waited for this round longer than the epoch trained, and how to make it cheaper."""
        if self._said_slow or trainer.state.fn != TrainerFn.FITTING or not trainer.validating:
            return  # only a round that held training up (not the one at fit end, nor trainer.validate's)
        message = slow_round_message(self.identity, key, round_s, self._training_clock.trained_s)
        if message is not None:
            self._said_slow = True
            rank_zero_info(message)

    def _failed(self, key: int | None, err: BaseException) -> None:
        """``on_error``: raise, or log and warn (training goes on)."""
        if self.config.on_error == "raise":
            raise err
        log.error("NeuronExplainer: explaining round %s failed", key, exc_info=err)
        rank_zero_warn(
            f"NeuronExplainer[{self.identity}]: explaining round {key} failed "
            f"({type(err).__name__}: {err}); training continues (set on_error='raise' to stop instead)"
        )

    # ------------------------------------------------------------------ background rounds (async_explain)
    def _in_background(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, recording: Recording, background: bool
    ) -> bool:
        """Hand the round to the background worker if that is safe; ``True`` when handed off (or skipped)."""
        if not background or recording.epoch is None:
            return False
        mode = self.config.speed.async_explain
        refusal = async_refusal(trainer, pl_module, self._run_config.output.prefix, mode)
        if refusal is not None:
            if mode is not False and refusal != self._hook_reason:
                self._hook_reason = refusal  # said once per reason, not every round
                log.info("NeuronExplainer[%s]: rounds run in the validation hook: %s", self.identity, refusal)
            return False
        # Under DDP (async_explain=True) rank 0 explains the round alone in its worker and the other ranks go on
        # training: every rank must still take the same decisions (skip, hand off), or a later round shared through
        # collectives would wait for a rank that never comes. Rank 0's decisions are broadcast (on the main thread).
        busy = self._from_rank_zero(trainer, self._background.busy)
        if busy and self.config.speed.when_busy == "skip":
            rank_zero_warn(
                f"NeuronExplainer[{self.identity}]: round {recording.epoch} is skipped: round "
                f"{self._background.outstanding.key if self._background.outstanding else '?'} is still being "
                "explained in the background (when_busy='skip'; 'wait' explains every round)"
            )
            return True
        job = self._round_job(trainer, pl_module, recording, recording.epoch) if trainer.global_rank == 0 else None
        if not self._from_rank_zero(trainer, job is not None):
            return False
        self.last_explained_key = recording.epoch
        self._last_explained_step = self._last_recording_step
        self._last_recording_explained = True
        if job is not None:
            self._background.submit(job)
        return True

    def _round_job(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, recording: Recording, key: int
    ) -> RoundJob | None:
        """The background worker's job for the round ``key`` (``None``: it cannot run there, explain it in the hook)."""
        self._settle(trainer)
        try:
            model = frozen_copy(pl_module)  # the weights of this epoch, whatever training does next
            source = DataLoaderSampleSource(
                _probe_loader(trainer), self.config.recording.input_key, self.config.recording.target_key
            )
        except Exception as err:  # noqa: BLE001 - e.g. a module that cannot be deep-copied: explain here instead
            log.info("NeuronExplainer: explaining round %s in the validation hook (%s)", recording.epoch, err)
            return None
        return RoundJob(
            key=key,
            step=key,
            global_step=self._last_recording_step,
            keep_later=False,
            recording=recording,
            model=model,
            source=source,
            previous_key=self.last_explained_key,
            previous_step=self._last_explained_step,
            stream=worker_stream(pl_module.device),
        )

    @staticmethod
    def _from_rank_zero(trainer: pl.Trainer, decision: bool) -> bool:
        """Rank 0's ``decision`` on every rank (one broadcast under DDP; the decision itself in one process)."""
        if trainer.world_size <= 1:
            return decision
        return bool(trainer.strategy.broadcast(decision, src=0))

    def _explain_job(self, job: RoundJob) -> ExplanationRound:
        """The worker's work: explain the round on the frozen copy; nothing is recorded or written here."""
        session = self.session
        if session is None or job.model is None:
            raise RuntimeError("the explanation session was closed before the background round ran")
        return session.explain_round(
            job.model, job.recording, job.source, epoch=job.key, progress=False, global_step=job.global_step
        )

    def _drain(self, trainer: pl.Trainer) -> None:
        """File the rounds the worker finished, on the main thread; a failed one follows ``on_error``."""
        for finished in self._background.collect():
            job = finished.job
            if finished.error is not None:
                self._failed(job.key, finished.error)
                continue
            if self.session is None:
                continue
            try:
                self.session.record_round(
                    finished.result, key=job.key, step=job.step, keep_later=job.keep_later, global_step=job.global_step
                )
                self.rounds.append(finished.result)
                self._publish_metrics(trainer)
            except Exception as err:
                self._failed(job.key, err)

    def _explain_pending(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """On resume: explain the round the checkpoint saved while it was still in the background.

        Only when the checkpoint's weights are the recording's (saved at the end of the same epoch, or at the same
        global step under step-based validation), restricted to the layers this explainer explains now.
        """
        key, self._pending_round = self._pending_round, None
        recording = self.last_recording
        if key is None or recording is None or recording.epoch != key or self._disabled:
            return
        saved_at = self._checkpoint_step if _step_based(trainer) else self._checkpoint_epoch
        layers = {name: lt for name, lt in recording.layers.items() if name in (self.layer_names or [])}
        if saved_at != key or not layers:
            rank_zero_warn(
                f"NeuronExplainer[{self.identity}]: round {key} was still being explained when the checkpoint was "
                "saved, and cannot be explained again on resume (the checkpoint's weights or layers differ)"
            )
            return
        self._explain(trainer, pl_module, dataclasses.replace(recording, layers=layers))

    def _settle(self, trainer: pl.Trainer) -> None:
        """Wait for the round in the background and file it."""
        self._background.wait()
        self._drain(trainer)

    def _publish_metrics(self, trainer: pl.Trainer) -> None:
        """Put the round's per-layer figures into ``trainer.callback_metrics`` (EarlyStopping, ModelCheckpoint)."""
        if self.session is None:
            return
        from lightning_neurons.logging.metrics import round_metrics

        output = self.session.last_output
        if output is None:
            return
        metrics = round_metrics(output)
        trainer.callback_metrics.update({k: torch.tensor(float(v)) for k, v in metrics.items()})

    def _resolve_output(self, trainer: pl.Trainer) -> RunConfig:
        """The run config with this explainer's name fixed: several explainers in one Trainer each get their own."""
        explainers = [cb for cb in trainer.callbacks if isinstance(cb, NeuronExplainer)]  # type: ignore[attr-defined]
        if len(explainers) > 1 and not self.config.output.name:
            output = dataclasses.replace(self.config.output, name=self.identity)
            return dataclasses.replace(self.config, output=output)
        return self.config

    def _output_dir(self, trainer: pl.Trainer) -> Path:
        """The run's output folder (read on every rank: ``trainer.log_dir`` may broadcast)."""
        from lightning_neurons.logging.writers import run_output_dir

        if self._run_config.output.history_dir:
            return Path(self._run_config.output.history_dir)
        run_dir = Path(run_output_dir(trainer.loggers, trainer.default_root_dir))
        return run_dir / self._run_config.output.folder

    def _writers(self, trainer: pl.Trainer, session: ExplanationSession) -> list[Any]:
        """One round writer per logger family of the Trainer (rank 0 only)."""
        from lightning_neurons.logging.writers import round_writers

        return list(
            round_writers(
                trainer.loggers,
                log_units=self._run_config.output.log_units,
                prefix=self._run_config.output.prefix,
                evaluation_metrics=session.evaluation_metrics(),
                projector=self._run_config.output.projector,
                embed=session.backend.encode_descriptions if session.backend is not None else None,
            )
        )

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

    def _warn_unreachable_schedule(self, trainer: pl.Trainer) -> None:
        """Warn once when the explainer's epochs are epochs without validation."""
        every = trainer.check_val_every_n_epoch
        if every is None or every <= 1:
            return
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs > 0 else 10 * every
        scheduled = [e for e in range(max_epochs) if self.config.schedule.epoch_scheduled(e)]
        validated = {e for e in range(max_epochs) if (e + 1) % every == 0}
        missed = [e for e in scheduled if e not in validated]
        if not missed:
            return
        served = [e for e in scheduled if e in validated]
        rank_zero_warn(
            f"NeuronExplainer[{self.identity}]: epochs {missed} are scheduled for explanation but have no validation "
            f"pass (check_val_every_n_epoch={every}); "
            + (f"only epochs {served} will be explained" if served else "no epoch will be explained")
            + f"; use every_n_epochs={every} or epochs={sorted(validated)[:5]}..."
        )


def derived_name(config: RunConfig) -> str:
    """A folder- and tag-safe name from what an explainer explains (layers; backend and vocabulary if not default).

    Example:
        >>> derived_name(RunConfig.from_arguments(layers=["layer3", "layer4"]))
        'layer3,layer4'
    """
    from lightning_neurons.config import DEFAULT_VOCABULARY

    parts = [config.recording.layer_label]
    if config.backend.backend_label not in ("auto", "embedded"):  # the default, and the default before it
        parts.append(config.backend.backend_label)
    if tuple(config.backend.vocabulary) != DEFAULT_VOCABULARY or config.backend.llm_vocabulary:
        parts.append(
            "+".join(Path(v).stem for v in config.backend.vocabulary)
            + ("+llm" if config.backend.llm_vocabulary else "")
        )
    name = re.sub(r"[^A-Za-z0-9_.,+-]+", "_", "-".join(parts)).strip("_") or "explainer"
    if len(name) > 64:  # keep folder names short, and distinct
        name = name[:55] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return name


#: Strategies that shard parameters across ranks: one rank cannot run the model alone on probe samples.
_SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy")


def refuse_sharded_strategy(strategy: Any) -> None:
    """Refuse strategies that shard the parameters (FSDP, DeepSpeed, model parallel), before anything runs.

    The explanation stage runs the model on probe samples outside the Trainer's loops; with sharded parameters that
    forward needs every rank in lock step inside the strategy's own collectives, which is not supported yet, and a
    hang is worse than an error.

    Raises:
        ValueError: Naming the strategy and what to use instead.

    Example:
        >>> from lightning.pytorch.strategies import DDPStrategy
        >>> refuse_sharded_strategy(DDPStrategy())
    """
    names = {cls.__name__ for cls in type(strategy).__mro__}
    sharded = sorted(names.intersection(_SHARDED_STRATEGIES))
    if sharded:
        raise ValueError(
            f"NeuronExplainer does not support {sharded[0]} (it shards the parameters, so the explanation forward "
            "would need all ranks in lock step); use strategy='ddp' for the explained run, or explain a saved "
            "checkpoint afterwards with lightning_neurons.explain_checkpoints / `lightning-neurons explain`"
        )


@contextlib.contextmanager
def _training_rng_kept(pl_module: pl.LightningModule) -> Iterator[None]:
    """Work in the block draws from a fork of the global RNG, so the training's random stream stays as it was."""
    devices = [pl_module.device] if pl_module.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def _step_based(trainer: pl.Trainer) -> bool:
    """Validation every n training batches across epochs (``check_val_every_n_epoch=None``)."""
    return trainer.check_val_every_n_epoch is None


def _end_of_epoch_pass(trainer: pl.Trainer) -> bool:
    """Whether this fit validation pass runs at the end of the training epoch (not inside it)."""
    epoch_loop = trainer.fit_loop.epoch_loop
    progress = getattr(epoch_loop, "batch_progress", None)
    return bool(getattr(progress, "is_last_batch", True))


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


def _trainer_class_names(trainer: pl.Trainer) -> list[str] | None:
    """Class names from the data module's or the validation dataset's ``classes`` attribute.

    The validation loader passed to ``fit(model, train, val)`` is read too: at ``setup`` Lightning has not built
    ``trainer.val_dataloaders`` yet (:func:`~lightning_neurons.recording.probe_data.setup_val_loader`).
    """
    names = dataset_class_names(getattr(trainer, "datamodule", None))
    if names:
        return names
    loader = setup_val_loader(trainer)
    return class_names_of(getattr(loader, "dataset", None))


__all__ = ["NeuronExplainer", "derived_name", "refuse_sharded_strategy"]
