"""The explanation half of a run: what lives across explanation rounds.

An :class:`ExplanationSession` owns the loaded backend, the embedded concept set, the drift history and the round
writers (one per logger family, :class:`~lightning_neurons.logging.base.RoundWriter`). It depends on a
:class:`~lightning_neurons.config.RunConfig` and the output interfaces only: it never imports or reads the
callback, the Trainer or the LightningModule class, so :class:`~lightning_neurons.NeuronExplainer`,
:func:`~lightning_neurons.explain` and ``evaluate_run`` all drive the same object.

Example:
    >>> config = RunConfig.from_arguments(layers=["layer4"])  # doctest: +SKIP
    >>> session = ExplanationSession(config)  # doctest: +SKIP
    >>> session.setup(class_names=["cat", "dog"])  # doctest: +SKIP
    >>> session.open("runs/x/neurons", writers=[])  # doctest: +SKIP
    >>> rnd = session.explain(model, recording, source, epoch=0)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_neurons.backends.base import Backend, encoder_label
from lightning_neurons.backends.cache import CachedImageEncoder
from lightning_neurons.concepts.concept_set import ConceptSet
from lightning_neurons.config import RunConfig
from lightning_neurons.drift.baseline import settings_warning
from lightning_neurons.drift.history import HISTORY_FILENAME, STORE_DIRNAME, RunHistory
from lightning_neurons.explanation.embedding_cache import RegionEmbeddingCache
from lightning_neurons.explanation.pipeline import explain_recording
from lightning_neurons.identity import new_run_id, round_identity, settings_fingerprint
from lightning_neurons.logging.base import RoundOutput, RoundWriter
from lightning_neurons.logging.previews import PREVIEWS_DIRNAME
from lightning_neurons.logging.tensorboard import NeuronTensorBoardLogger, select_units
from lightning_neurons.recording.samples import SampleSource
from lightning_neurons.recording.types import Recording
from lightning_neurons.results import ExplanationRound, RoundEvaluation
from lightning_neurons.sharing import WorkShare

#: File name of the HTML report inside the output directory.
REPORT_FILENAME = "report.html"


class ExplanationSession:
    """Backend, concepts, history and writers of one run.

    Under DDP every rank holds a session and explains its share of the work (see
    :class:`~lightning_neurons.sharing.WorkShare`); only the session with ``writes=True`` (global rank 0) writes.

    Args:
        config: The run's settings.
        writes: Whether this session writes the history, per-round JSON, previews, report and logger output.
    """

    def __init__(self, config: RunConfig, *, writes: bool = True) -> None:
        self.config = config
        self.writes = writes
        self.backend: Backend | None = None
        self.class_names: list[str] | None = None
        self.concepts: ConceptSet | None = None
        self.history = RunHistory()
        self.output_dir: Path | None = None
        self.writers: list[RoundWriter] = []
        self.last_output: RoundOutput | None = None
        #: Region embeddings kept across rounds (``None``: ``embedding_cache`` off); made in :meth:`setup`.
        self.cache: RegionEmbeddingCache | None = None
        self._evaluation_backend: Backend | None = None
        self._restored_path: Path | None = None  # the history store a restored checkpoint continues
        #: The run the rounds belong to (:class:`~lightning_neurons.results.RoundIdentity`); the callback sets it.
        self.run_id: str = new_run_id()
        #: Fingerprint and summary of the settings that change what a round means (set in :meth:`setup`).
        self.settings: tuple[str, dict[str, Any]] = ("", {})
        self._checkpoint_settings: dict[str, Any] | None = None
        self._foreign = False
        self._report_due = False
        #: Post hoc into a folder the caller named: a round of some layers keeps the folder's other layers at its
        #: epoch (``lightning-neurons explain -o existing``), instead of replacing the whole epoch.
        self.continues_folder = False

    # ------------------------------------------------------------------ set-up
    @property
    def is_setup(self) -> bool:
        """Whether the models and the concepts are loaded."""
        return self.backend is not None and self.concepts is not None

    def setup(self, class_names: Sequence[str] | None = None) -> None:
        """Load and check the foundation models and embed the vocabulary (a bad config fails here, early).

        Args:
            class_names: Class names read from the data when the config gives none.
        """
        from lightning_neurons.backends import load_backend
        from lightning_neurons.concepts.vocabulary import Vocabulary

        settings = self.config.backend
        backend = load_backend(settings.backend, **dict(settings.backend_kwargs))
        self.backend = backend
        cache_bytes = self.config.speed.embedding_cache_bytes
        # Embedding crops dominates a round, and consecutive rounds (and layers) share many regions.
        self.cache = RegionEmbeddingCache(cache_bytes) if cache_bytes else None
        self._evaluation_backend = backend
        if cache_bytes and not torch.cuda.is_available():
            # The evaluation probe's images are not regions of the round: keyed by their pixels (CPU only).
            self._evaluation_backend = dataclasses.replace(backend, encoder=CachedImageEncoder(backend.encoder))
        names = settings.class_names or (tuple(class_names) if class_names else None)
        self.class_names = list(names) if names else None
        vocabulary = Vocabulary(
            settings.sources(self.class_names),
            class_names=self.class_names,
            generator=backend.generator,
            exclude_general=backend.basis_concepts,
            show_progress=settings.show_progress and self.writes,
        )
        # Embedding the vocabulary here makes a broken backend fail in setup, not after an epoch of training.
        self.concepts = ConceptSet(tuple(vocabulary.concepts), vocabulary.embed(backend.encoder))
        self.settings = settings_fingerprint(
            self.config,
            class_names=self.class_names,
            concepts=self.concepts.texts,
            model=f"{backend.name}:{encoder_label(backend.encoder)}",
            crop_side=self.config.explain.for_encoder(backend.encoder).crop_side,
        )
        self._warn_settings_changed()

    def open(self, output_dir: str | Path, writers: Sequence[RoundWriter] = ()) -> None:
        """Write into ``output_dir`` (history, rounds, previews, report) and to ``writers`` (logger families).

        Raises:
            PermissionError: If ``output_dir`` cannot be created or written (checked now, not after a round).
        """
        directory = Path(output_dir)
        self.output_dir = directory
        self.writers = list(writers)
        if not self.writes:
            return
        _check_writable(directory)
        # Another run's history, and nothing restored (yet): attach only once claim_output decides.
        self._foreign = not len(self.history) and _holds_history(directory)
        if not self._foreign:
            self.history.attach(directory / STORE_DIRNAME)

    def claim_output(self, *, fresh_folder: bool) -> Path | None:
        """Make sure this run does not append to another run's history (call after any checkpoint restore).

        Args:
            fresh_folder: When the folder holds another run's history, write into a new sibling folder
                (``neurons_1``, ...) instead of refusing.

        Returns:
            The new folder when one was chosen, else ``None``.

        Raises:
            FileExistsError: If the folder holds another run's history and ``fresh_folder`` is off.
        """
        if not self._foreign or self.output_dir is None:
            return None
        self._foreign = False
        path = self.output_dir / STORE_DIRNAME
        if len(self.history) or self._restored_path == path:
            # A checkpoint restored this run's history (maybe still empty: saved while its first round was explained
            # in the background): it continues that store.
            self.history.attach(path)
            return None
        if not fresh_folder:
            raise FileExistsError(
                f"{self.output_dir / STORE_DIRNAME} holds another run's history; a new run does not append to "
                "it: pass another history_dir, remove the folder, or resume that run from its checkpoint"
            )
        n = 1
        while _holds_history(self.output_dir.parent / f"{self.output_dir.name}_{n}"):
            n += 1
        self.output_dir = self.output_dir.parent / f"{self.output_dir.name}_{n}"
        _check_writable(self.output_dir)
        self.history.attach(self.output_dir / STORE_DIRNAME)
        return self.output_dir

    def evaluation_metrics(self) -> list[str]:
        """The per-layer evaluation metrics the writers chart (none unless ``evaluate=True``)."""
        if not self.config.evaluate:
            return []
        from lightning_neurons.evaluation.harness import LAYER_METRICS

        return list(LAYER_METRICS)

    def tensorboard_writer(self, summary_writer: Any) -> RoundWriter:
        """A TensorBoard round writer on ``summary_writer`` with this run's unit selection and metrics."""
        logger = NeuronTensorBoardLogger(
            summary_writer,
            log_units=_log_units(self.config.output.log_units),
            prefix=self.config.output.prefix,
            evaluation_metrics=self.evaluation_metrics(),
        )
        return logger  # type: ignore[return-value]

    # ------------------------------------------------------------------ rounds
    def explain(
        self,
        model: nn.Module,
        recording: Recording,
        source: SampleSource,
        *,
        epoch: int | None = None,
        step: int | None = None,
        share: WorkShare | None = None,
        keep_later: bool = False,
        global_step: int | None = None,
    ) -> ExplanationRound:
        """Explain a recording, then record and log the round (history, writers, previews, report).

        The same as :meth:`explain_round` followed by :meth:`record_round`.

        Args:
            model: The recorded network (in eval mode, under ``no_grad``; the caller restores its mode).
            recording: The round's top-k samples.
            source: Gives the probe samples back by id.
            epoch: The key the round is filed under (default ``recording.epoch``).
            step: The step the loggers file the round under (default: the key).
            share: This rank's share of the work under DDP (``None``: one process does everything).
            keep_later: The round re-explains an earlier epoch: replace it in the history and keep the later
                epochs (``trainer.validate(ckpt_path=...)``) instead of rewinding the timeline.
            global_step: The trainer's global step, for loggers whose step axis is the global step (W&B, CSV).

        Raises:
            RuntimeError: If :meth:`setup` did not run.
        """
        rnd = self.explain_round(model, recording, source, epoch=epoch, share=share, global_step=global_step)
        key = recording.epoch if epoch is None else epoch
        self.record_round(
            rnd, key=key if key is not None else 0, step=step, keep_later=keep_later, global_step=global_step
        )
        return rnd

    def explain_round(
        self,
        model: nn.Module,
        recording: Recording,
        source: SampleSource,
        *,
        epoch: int | None = None,
        share: WorkShare | None = None,
        progress: bool = True,
        global_step: int | None = None,
    ) -> ExplanationRound:
        """Explain a recording (and evaluate it with ``evaluate=True``) without recording or writing anything.

        Touches neither the history nor the writers, so a background thread may run it while the main thread
        trains (:mod:`lightning_neurons.background`); :meth:`record_round` then files the round. ``progress=False``
        hides the progress bars (a background round does not draw over the trainer's). The round's identity (run,
        weights of ``model``, epoch, ``global_step``, settings) is stamped here, from the model it was explained
        with.

        Raises:
            RuntimeError: If :meth:`setup` did not run.
        """
        if self.backend is None or self.concepts is None:
            raise RuntimeError("ExplanationSession.setup must run before explain")
        start = time.perf_counter()
        key = recording.epoch if epoch is None else epoch
        explain_config = dataclasses.replace(
            self.config.explain,
            preview_units=_preview_units(recording, self.config.output.log_units),
            # The ablation check is documented for the logged units; the previews now cover the report's units.
            ablation_units=(
                self.config.explain.ablation_units
                if self.config.explain.ablation_units is not None
                else _logged_units(recording, self.config.output.log_units)
            ),
            show_progress=self.config.output.show_progress and self.writes and progress,
        )
        rnd = explain_recording(
            model,
            recording,
            source,
            self.backend,
            self.concepts,
            explain_config,
            epoch=key,
            class_names=self.class_names,
            share=share,
            cache=self.cache,
        )
        if self.config.evaluate:
            rnd.evaluation = self._evaluate(model, rnd, recording, source)
            if rnd.evaluation is not None:  # the old spelling, kept for one release
                rnd.meta["evaluation"] = rnd.evaluation.metrics
                rnd.meta["evaluation_baselines"] = rnd.evaluation.baselines
        rnd.meta.setdefault("timings", {})["total_s"] = round(time.perf_counter() - start, 3)
        rnd.identity = round_identity(self.run_id, model, epoch=key, step=global_step, settings=self.settings)
        return rnd

    def record_round(
        self,
        rnd: ExplanationRound,
        *,
        key: int,
        step: int | None = None,
        keep_later: bool = False,
        global_step: int | None = None,
    ) -> None:
        """File a round explained by :meth:`explain_round`: history, drift, previews, report and every writer.

        Args:
            rnd: The round.
            key: The key it is filed under (its epoch, or global step under step-based validation).
            step: The step the loggers file it under (default: the key).
            keep_later: Replace an earlier epoch and keep the later ones (see :meth:`explain`).
            global_step: The trainer's global step when the round was recorded.
        """
        self._record(rnd, key, step, keep_later, global_step)

    def _evaluate(
        self, model: nn.Module, rnd: ExplanationRound, recording: Recording, source: SampleSource
    ) -> RoundEvaluation | None:
        """Quality metrics of the round and of its baselines, on held-out probe samples (``None``: none left).

        The baselines are ``"random"`` (a random vocabulary concept per unit), ``"constant"`` (the vocabulary concept
        closest to the held-out images on average, for every unit) and, with labels and class names, ``"label"``
        (the most frequent class of each unit's top samples), all measured on the same held-out samples.
        """
        from lightning_neurons.evaluation import (
            constant_baseline,
            evaluate_round,
            explained_sample_ids,
            generic_concepts,
            held_out_probe,
            label_baseline,
            probe_for,
            random_baseline,
        )

        assert self.backend is not None and self.concepts is not None and self.config.evaluation is not None
        backend = self._evaluation_backend or self.backend
        config = self.config.evaluation
        seed = self.config.recording.seed
        explained = explained_sample_ids(rnd)
        data = held_out_probe(source, explained, config.max_probe_samples, seed=seed)
        if data is None:
            warnings.warn(
                f"NeuronExplainer(evaluate=True): epoch {rnd.epoch} is not evaluated: the explanations use all "
                "probe samples, none is left to evaluate them on (use a larger validation set or a smaller top_k)",
                stacklevel=2,
            )
            return None
        layers = list(recording.layers)
        # One probe (activations, image embeddings, ablation drops) serves the round and every baseline.
        exclude = None if isinstance(data, tuple) else explained  # iterable dataset: stream positions are the ids
        probe = probe_for(model, data, layers, backend, config, exclude_ids=exclude)
        texts, embeddings = list(self.concepts.texts), self.concepts.embeddings
        assert probe.image_embeddings is not None
        constant = generic_concepts(None, texts, probe.image_embeddings, n=5, text_embeddings=embeddings)
        rounds = {
            "random": random_baseline(rnd, texts, seed=seed),
            "constant": constant_baseline(rnd, constant[0], constant[1:]),
        }
        if self.class_names and recording.labels and all(i in recording.labels for i in explained):
            rounds["label"] = label_baseline(rnd, recording.labels, self.class_names)
        metrics = evaluate_round(model, rnd, probe, backend, layers, self.class_names, config=config)
        baselines: dict[str, dict[str, Any]] = {}
        with warnings.catch_warnings():
            # evaluate_round's small-probe warning spoke once, for the explanations; not again per baseline.
            warnings.simplefilter("ignore", UserWarning)
            for name, baseline in rounds.items():
                baselines[name] = evaluate_round(
                    model, baseline, probe, backend, layers, self.class_names, config=config
                )
        return RoundEvaluation(backend.name, metrics, baselines)

    def _record(
        self, rnd: ExplanationRound, key: int, step: int | None, keep_later: bool, global_step: int | None
    ) -> None:
        """Add the round to the history (every rank, so that every rank has the round's figures) and publish it."""
        if self.output_dir is None:  # post hoc without an output folder: nothing is kept
            return
        assert self.backend is not None
        if self.writes and self._foreign:  # post hoc into a folder the caller named: continue its epochs there
            self._foreign = False
            self.history = continued_history(self.output_dir, self.history)
            self.history.attach(self.output_dir / STORE_DIRNAME)
        filed = with_other_layers(self.history, rnd, key) if self.continues_folder else rnd
        drift = self.history.add_round(filed, self.backend.encode_descriptions, epoch=key, keep_later=keep_later)
        if filed is not rnd:  # the writers log this round's units; the other layers' stay as they were
            mine = {(u.layer, u.unit) for u in rnd.units}
            drift = [d for d in drift if (d.layer, d.unit) in mine]
        self.last_output = RoundOutput(
            round=rnd,
            drift=drift,
            summaries=self.history.summary(key),
            step=key if step is None else step,
            epoch=key,
            evaluation=rnd.evaluation.methods() if rnd.evaluation is not None else {},
            output_dir=self.output_dir,
            prefix=self.config.output.prefix,
            global_step=global_step,
        )
        if self.writes:
            self._publish(self.last_output)

    def _publish(self, output: RoundOutput) -> None:
        """Files first (a writer such as MLflow uploads the report and the history), then every logger family."""
        assert self.output_dir is not None
        rnd, key = output.round, output.epoch
        NeuronTensorBoardLogger.save_previews(rnd, self.output_dir / PREVIEWS_DIRNAME, epoch=key)
        rnd.to_json(self.output_dir / f"round_epoch={key}.json")
        self._report_due = True  # the HTML report is an export, written once at the end (teardown), not per round
        for writer in self.writers:
            writer.write_round(output)

    # ------------------------------------------------------------------ state
    def outputs(self) -> dict[str, Path]:
        """Where this session writes: history, report, previews (empty before :meth:`open`)."""
        if self.output_dir is None or not self.writes:
            return {}
        return {
            "History": self.output_dir / STORE_DIRNAME,
            "HTML report": self.output_dir / REPORT_FILENAME,
            "Region crops": self.output_dir / PREVIEWS_DIRNAME,
        }

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue the drift history.

        The history file, its round ids and each unit's latest record: the full history stays in the file, so a
        checkpoint does not grow with the run.
        """
        return {"history": self.history.checkpoint_state(), "settings": self.settings[1] or None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`; re-attaches the history file when the session is already open.

        Warns, naming them, when the settings that decide what a round means changed since the checkpoint (the next
        round starts a new drift baseline).
        """
        if "history" in state:
            store = state["history"].get("store") if isinstance(state["history"], dict) else None
            self._restored_path = Path(store["path"]) if isinstance(store, dict) and "path" in store else None
            self.history.load_state_dict(state["history"])
            if self.output_dir is not None and self.writes and not self._foreign:
                self.history.attach(self.output_dir / STORE_DIRNAME)
        self._checkpoint_settings = state.get("settings")
        self._warn_settings_changed()

    def _warn_settings_changed(self) -> None:
        # Once both are known: the checkpoint's settings and this session's (set up before or after the restore).
        if self._checkpoint_settings and self.settings[1]:
            message = settings_warning(self._checkpoint_settings, self.settings[1])
            if message and self.writes:
                warnings.warn(message, stacklevel=3)
            self._checkpoint_settings = None

    def write_report(self) -> Path | None:
        """Export the HTML report of the rounds written so far (once per run, at the end; ``None``: nothing new)."""
        if not self._report_due or self.output_dir is None:
            return None
        from lightning_neurons.logging.report import write_report

        self._report_due = False
        return write_report(
            self.history, self.output_dir / REPORT_FILENAME, previews_dir=self.output_dir / PREVIEWS_DIRNAME
        )

    def teardown(self) -> None:
        """Flush and close the writers and release the models (the history stays for a later run)."""
        try:
            self.write_report()
        finally:
            for writer in self.writers:
                writer.close()
            self.writers = []
        self.history.close()  # releases the history file's lock
        self.output_dir = None
        self.backend = None
        self._evaluation_backend = None
        self.concepts = None
        self.cache = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def continued_history(folder: Path, history: RunHistory) -> RunHistory:
    """The history a post-hoc session continues: the folder's history read back (``history`` when there is none)."""
    if len(history) or not _holds_history(folder):
        return history
    from lightning_neurons.drift.history import load_history

    found = load_history(folder)
    found.stable_rounds = history.stable_rounds
    return found


def with_other_layers(history: RunHistory, rnd: ExplanationRound, key: int) -> ExplanationRound:
    """``rnd`` plus the units the history holds at epoch ``key`` for layers the round does not explain.

    Filing the result replaces the epoch without dropping another layer's explanations of the same weights.
    """
    layers = {u.layer for u in rnd.units}
    kept = [r.explanation for r in history.records if r.key[2] == key and r.key[0] not in layers]
    if not kept:
        return rnd
    return dataclasses.replace(rnd, units=[*kept, *rnd.units])


def _log_units(log_units: int | tuple[int, ...] | None) -> int | list[int] | None:
    return list(log_units) if isinstance(log_units, tuple) else log_units


def _logged_units(recording: Recording, log_units: int | tuple[int, ...] | None) -> dict[str, list[int]]:
    """``{layer: units}`` that ``log_units`` selects (the per-unit logger cards and the ablation check)."""
    selection = _log_units(log_units)
    return {name: select_units(selection, name, range(layer.num_units)) for name, layer in recording.layers.items()}


def _preview_units(recording: Recording, log_units: int | tuple[int, ...] | None) -> dict[str, list[int]]:
    """The units that get crop previews (small PNG grids the HTML report shows).

    Every unit of a layer up to the units the report shows per layer (``DEFAULT_MAX_UNITS``), the logged ones
    (``log_units``, which only chooses the per-unit logger cards) first: the report never lacks a shown unit's crops
    because it was not logged.
    """
    from lightning_neurons.logging.report import DEFAULT_MAX_UNITS

    selection = _log_units(log_units)
    out = {}
    for name, layer in recording.layers.items():
        logged = select_units(selection, name, range(layer.num_units))
        chosen = set(logged)
        rest = [u for u in range(layer.num_units) if u not in chosen]
        out[name] = sorted([*logged, *rest][: max(DEFAULT_MAX_UNITS, len(logged))])
    return out


def _holds_history(directory: Path) -> bool:
    # A run's history: the round store or, from earlier versions, a non-empty history.jsonl.
    from lightning_neurons.drift.round_store import is_round_store

    legacy = directory / HISTORY_FILENAME
    return is_round_store(directory / STORE_DIRNAME) or (legacy.is_file() and legacy.stat().st_size > 0)


def _check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".write-check"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise PermissionError(
            f"cannot write the explanations to {str(directory)!r} ({err.strerror or err}); "
            "pass a writable history_dir= or fix the folder's permissions"
        ) from err


def dataset_class_names(dataset: Any) -> list[str] | None:
    """Class names from an object's ``classes`` attribute (a dataset or a data module), else ``None``."""
    classes = getattr(dataset, "classes", None)
    if isinstance(classes, (list, tuple)) and classes and all(isinstance(c, str) for c in classes):
        return list(classes)
    return None


__all__ = ["REPORT_FILENAME", "ExplanationSession", "dataset_class_names"]
