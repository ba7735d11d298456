"""The explanation half of :class:`~lightning_neurons.NeuronExplainer`.

The callback owns recording; an :class:`ExplanationSession` owns what lives across explanation rounds: the loaded
backend, the embedded concept vocabulary, the drift history and the writers (TensorBoard, history file, previews,
HTML report). It reads its settings from the callback's attributes (the callback's ``__init__`` arguments, stored
under the same names), so the post-hoc path (:func:`~lightning_neurons.explain`) reuses it unchanged.

Example:
    >>> explainer = NeuronExplainer(layers=["layer4"])  # doctest: +SKIP
    >>> explainer.session.setup_standalone(model, val_loader, "neurons")  # doctest: +SKIP
    >>> rnd = explainer.session.explain(model, recording, source)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_neurons.backends.cache import CachedImageEncoder
from lightning_neurons.drift.history import HISTORY_FILENAME, RunHistory
from lightning_neurons.explanation.pipeline import ExplainConfig, explain_recording
from lightning_neurons.logging.previews import PREVIEWS_DIRNAME
from lightning_neurons.logging.tensorboard import NeuronTensorBoardLogger, find_tensorboard_writer, select_units
from lightning_neurons.recording.samples import SampleSource
from lightning_neurons.recording.types import Recording
from lightning_neurons.results import ExplanationRound

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

    from lightning_neurons.backends.base import Backend
    from lightning_neurons.callback import NeuronExplainer

#: File name of the HTML report inside the output directory.
REPORT_FILENAME = "report.html"


class ExplanationSession:
    """Backend, vocabulary, history and writers of one run; used on global rank 0 only.

    Args:
        explainer: The callback whose settings this session follows.
    """

    def __init__(self, explainer: NeuronExplainer) -> None:
        self.explainer = explainer
        self.backend: Backend | None = None
        self.class_names: list[str] | None = None
        self.concepts: tuple[list[str], Tensor] | None = None
        self.history = RunHistory()
        self.output_dir: Path | None = None
        self.tensorboard: NeuronTensorBoardLogger | None = None
        self._own_writer: SummaryWriter | None = None

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Load and check the foundation models and the vocabulary, and open the writers (before training)."""
        self._load(self.explainer.class_names or _trainer_class_names(trainer))
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        self.output_dir = Path(self.explainer.history_dir) if self.explainer.history_dir else log_dir / "neurons"
        self.history.attach(self.output_dir / HISTORY_FILENAME)
        writer = find_tensorboard_writer(trainer)
        if writer is None:
            rank_zero_warn(
                "NeuronExplainer: the trainer has no TensorBoardLogger, so nothing goes to TensorBoard; the history "
                f"is still written to {self.output_dir / HISTORY_FILENAME} and the report to "
                f"{self.output_dir / REPORT_FILENAME}"
            )
        else:
            self.tensorboard = self._tensorboard_logger(writer)

    def setup_standalone(self, model: nn.Module, dataloader: Any, output_dir: str | Path | None) -> None:
        """Set up outside a Trainer (post hoc): models once, and writers into ``output_dir`` when given."""
        if self.backend is None:
            self._load(self.explainer.class_names or _dataset_class_names(getattr(dataloader, "dataset", None)))
        if output_dir is not None and self.output_dir is None:
            from torch.utils.tensorboard import SummaryWriter

            self.output_dir = Path(output_dir)
            self.history.attach(self.output_dir / HISTORY_FILENAME)
            self._own_writer = SummaryWriter(str(self.output_dir))
            self.tensorboard = self._tensorboard_logger(self._own_writer)

    def _tensorboard_logger(self, writer: SummaryWriter) -> NeuronTensorBoardLogger:
        """The neuron logger on ``writer``; with ``evaluate=True`` its layout charts each metric against baselines."""
        metrics: list[str] = []
        if self.explainer.evaluate:
            from lightning_neurons.evaluation.harness import LAYER_METRICS

            metrics = list(LAYER_METRICS)
        return NeuronTensorBoardLogger(writer, log_units=self.explainer.log_units, evaluation_metrics=metrics)

    def _load(self, class_names: list[str] | None) -> None:
        from lightning_neurons.backends import load_backend
        from lightning_neurons.concepts.vocabulary import Vocabulary

        explainer = self.explainer
        backend = load_backend(explainer.backend, **(explainer.backend_kwargs or {}))
        if not torch.cuda.is_available():
            # On a CPU, embedding crops dominates a round, and consecutive rounds share many crops.
            backend = dataclasses.replace(backend, encoder=CachedImageEncoder(backend.encoder))
        self.backend = backend
        self.class_names = list(class_names) if class_names else None
        sources = list(explainer.vocabulary or ["general", "classes"])
        if explainer.llm_vocabulary and "llm" not in sources:
            sources.append("llm")
        if "classes" in sources and not self.class_names:
            sources.remove("classes")
        vocabulary = Vocabulary(
            sources,
            class_names=self.class_names,
            generator=self.backend.generator,
            exclude_general=self.backend.basis_concepts,
            show_progress=explainer.show_progress,
        )
        # Embedding the vocabulary here makes a broken backend fail in setup, not after an epoch of training.
        embeddings = vocabulary.embed(self.backend.encoder)
        self.concepts = (list(vocabulary.concepts), embeddings)

    # ------------------------------------------------------------------ rounds
    def run(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, recording: Recording, source: SampleSource
    ) -> ExplanationRound:
        """Explain one recording of a training run, update the drift history, log it; returns the round."""
        return self.explain(pl_module, recording, source)

    def explain(self, model: nn.Module, recording: Recording, source: SampleSource) -> ExplanationRound:
        """Explain a recording, then record and log the round (history, TensorBoard, previews, report).

        Raises:
            RuntimeError: If the session was not set up.
        """
        if self.backend is None or self.concepts is None:
            raise RuntimeError("ExplanationSession.setup (or setup_standalone) must run before explain")
        start = time.perf_counter()
        rnd = explain_recording(
            model,
            recording,
            source,
            self.backend,
            self.concepts,
            self._config(recording),
            epoch=recording.epoch,
            class_names=self.class_names,
        )
        if self.explainer.evaluate:
            evaluation = self._evaluate(model, rnd, recording, source)
            if evaluation is not None:
                rnd.meta["evaluation"] = evaluation.pop(self.backend.name)
                rnd.meta["evaluation_baselines"] = evaluation
        rnd.meta.setdefault("timings", {})["total_s"] = round(time.perf_counter() - start, 3)
        self._write(rnd)
        return rnd

    def _config(self, recording: Recording) -> ExplainConfig:
        explainer = self.explainer
        preview_units = _preview_units(recording, explainer.log_units)
        return ExplainConfig(
            correction=explainer.correction,
            describe=explainer.describe,
            ablation=explainer.ablation,
            ablation_measure=explainer.ablation_measure,
            image_mean=tuple(explainer.image_mean) if explainer.image_mean else None,
            image_std=tuple(explainer.image_std) if explainer.image_std else None,
            token_mode=explainer.token_mode,
            output_selector=dict(explainer.output_selector) if explainer.output_selector else None,
            preview_units=preview_units,
            seed=explainer.seed,
            show_progress=explainer.show_progress,
        )

    def _evaluate(
        self, model: nn.Module, rnd: ExplanationRound, recording: Recording, source: SampleSource
    ) -> dict[str, Any] | None:
        """Quality metrics of the round and of its baselines (``evaluate=True``), on held-out probe samples.

        Returns ``{method: metrics}``: the backend's name for the round itself, then ``"random"`` (a random
        vocabulary concept per unit), ``"constant"`` (the vocabulary concept closest to the held-out images on
        average, for every unit) and, with labels and class names, ``"label"`` (the most frequent class of each
        unit's top samples), all measured on the same held-out samples; ``None`` when none is left.
        """
        from lightning_neurons.evaluation import (
            EvaluationConfig,
            constant_baseline,
            evaluate_round,
            explained_sample_ids,
            generic_concepts,
            held_out_probe,
            label_baseline,
            probe_for,
            random_baseline,
        )

        assert self.backend is not None and self.concepts is not None
        explainer = self.explainer
        config = EvaluationConfig(
            image_mean=tuple(explainer.image_mean) if explainer.image_mean else None,
            image_std=tuple(explainer.image_std) if explainer.image_std else None,
            reduction=explainer.reduction,
            token_mode=explainer.token_mode,
            input_key=explainer.input_key,
            target_key=explainer.target_key,
            seed=explainer.seed,
        )
        explained = explained_sample_ids(rnd)
        data = held_out_probe(source, explained, config.max_probe_samples, seed=explainer.seed)
        if data is None:
            rank_zero_warn(
                f"NeuronExplainer(evaluate=True): epoch {rnd.epoch} is not evaluated: the explanations use all "
                "probe samples, none is left to evaluate them on (use a larger validation set or a smaller top_k)"
            )
            return None
        layers = list(recording.layers)
        # One probe (activations, image embeddings, ablation drops) serves the round and every baseline.
        exclude = None if isinstance(data, tuple) else explained  # iterable dataset: stream positions are the ids
        probe = probe_for(model, data, layers, self.backend, config, exclude_ids=exclude)
        texts, embeddings = self.concepts
        assert probe.image_embeddings is not None
        constant = generic_concepts(None, texts, probe.image_embeddings, n=5, text_embeddings=embeddings)
        rounds = {
            self.backend.name: rnd,
            "random": random_baseline(rnd, texts, seed=explainer.seed),
            "constant": constant_baseline(rnd, constant[0], constant[1:]),
        }
        if self.class_names and recording.labels and all(i in recording.labels for i in explained):
            rounds["label"] = label_baseline(rnd, recording.labels, self.class_names)
        results: dict[str, Any] = {}
        for name, r in rounds.items():
            with warnings.catch_warnings():
                if results:  # evaluate_round's small-probe warning once, for the explanations, not per baseline
                    warnings.simplefilter("ignore", UserWarning)
                results[name] = evaluate_round(model, r, probe, self.backend, layers, self.class_names, config=config)
        return results

    def _write(self, rnd: ExplanationRound) -> None:
        epoch = rnd.epoch if rnd.epoch is not None else 0
        if self.output_dir is None:
            return
        assert self.backend is not None
        drift = self.history.add_round(rnd, self.backend.encode_descriptions, epoch=epoch)
        if self.tensorboard is not None:
            self.tensorboard.log_round(rnd, drift, self.history.summary(epoch), epoch=epoch)
            if rnd.meta.get("evaluation"):
                from lightning_neurons.evaluation import log_evaluation

                methods = {self.backend.name: rnd.meta["evaluation"], **rnd.meta.get("evaluation_baselines", {})}
                log_evaluation(self.tensorboard.writer, methods, epoch)
        NeuronTensorBoardLogger.save_previews(rnd, self.output_dir / PREVIEWS_DIRNAME)
        rnd.to_json(self.output_dir / f"round_epoch={epoch}.json")
        from lightning_neurons.logging.report import write_report

        write_report(self.history, self.output_dir / REPORT_FILENAME, previews_dir=self.output_dir / PREVIEWS_DIRNAME)

    # ------------------------------------------------------------------ state
    def outputs(self) -> dict[str, Path]:
        """Where this session writes: history, report, previews (empty before setup)."""
        if self.output_dir is None:
            return {}
        return {
            "History": self.output_dir / HISTORY_FILENAME,
            "HTML report": self.output_dir / REPORT_FILENAME,
            "Region crops": self.output_dir / PREVIEWS_DIRNAME,
        }

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue the drift history."""
        return {"history": self.history.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`; re-attaches the history file when the session is already set up."""
        if "history" in state:
            self.history.load_state_dict(state["history"])
            if self.output_dir is not None:
                self.history.attach(self.output_dir / HISTORY_FILENAME)

    def teardown(self) -> None:
        """Flush the writers and release the models."""
        if self.tensorboard is not None:
            self.tensorboard.writer.flush()
        if self._own_writer is not None:
            self._own_writer.close()
            self._own_writer = None
            self.tensorboard = None
        self.backend = None
        self.concepts = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _preview_units(recording: Recording, log_units: int | list[int] | None) -> dict[str, list[int]]:
    """The units that get crop previews: the ones logged per unit to TensorBoard."""
    return {name: select_units(log_units, name, range(layer.num_units)) for name, layer in recording.layers.items()}


def _dataset_class_names(dataset: Any) -> list[str] | None:
    classes = getattr(dataset, "classes", None)
    if isinstance(classes, (list, tuple)) and classes and all(isinstance(c, str) for c in classes):
        return list(classes)
    return None


def _trainer_class_names(trainer: pl.Trainer) -> list[str] | None:
    """Class names from the data module's or the validation dataset's ``classes`` attribute."""
    datamodule = getattr(trainer, "datamodule", None)
    names = _dataset_class_names(datamodule)
    if names:
        return names
    loaders = getattr(trainer, "val_dataloaders", None)
    loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
    return _dataset_class_names(getattr(loader, "dataset", None))
