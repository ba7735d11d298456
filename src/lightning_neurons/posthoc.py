"""Explaining a trained model after the fact: one model, one checkpoint, or a directory of checkpoints.

The post-hoc path builds the same :class:`~lightning_neurons.config.RunConfig` and
:class:`~lightning_neurons.session.ExplanationSession` as the callback, runs the same recording and the same
explanation stage, so a checkpoint's descriptions match what the callback logged for that epoch, and a directory
of checkpoints explained in epoch order gives drift without retraining. Every checkpoint is read with
``weights_only=True`` (:mod:`lightning_neurons.checkpoints`).

Example:
    >>> from lightning_neurons import explain
    >>> rnd = explain(model, val_loader, ["layer4"], top_k=16, output_dir="neurons")  # doctest: +SKIP
    >>> rnd.get("layer4", 0).description  # doctest: +SKIP
    'striped texture'
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_neurons.backends.base import Backend
from lightning_neurons.checkpoints import load_checkpoint, load_model, load_model_weights
from lightning_neurons.config import RunConfig
from lightning_neurons.recording.hooks import evaluating
from lightning_neurons.recording.recorder import collect_top_k
from lightning_neurons.recording.samples import DataLoaderSampleSource
from lightning_neurons.results import ExplanationRound
from lightning_neurons.session import ExplanationSession, dataset_class_names

LayerSpec = str | list[str] | Callable[[str, nn.Module], bool]


def explain(
    model: nn.Module,
    dataloader: DataLoader,
    layers: LayerSpec,
    *,
    top_k: int = 16,
    epoch: int | None = None,
    output_dir: str | Path | None = None,
    backend: str | Backend = "auto",
    backend_kwargs: dict[str, Any] | None = None,
    vocabulary: list[str] | None = None,
    class_names: list[str] | None = None,
    device: str | torch.device | None = None,
    explainer: Any = None,
    **settings: Any,
) -> ExplanationRound:
    """Record the top-k samples of every unit of ``layers`` on ``dataloader`` and explain them.

    Args:
        model: The trained network (any ``nn.Module``; a LightningModule works too).
        dataloader: The probe set, e.g. the validation loader (not shuffled).
        layers: Layer names, glob patterns, or a predicate ``(name, module) -> bool``.
        top_k: Top samples kept per unit.
        epoch: Epoch to file the round under (drift needs it); ``None`` files a one-off explanation as epoch 0,
            and is refused where ``output_dir`` already holds rounds (name the epoch of these weights to continue
            or replace one of them).
        output_dir: When given, the history, TensorBoard events, crop previews and the HTML report are written
            there, as the callback writes them into a run's log directory.
        backend: ``"auto"`` (open_clip when its weights are cached or can be fetched, else the offline pack with
            one warning), ``"embedded"`` (offline), ``"clip"``, ``"hf"`` or a loaded :class:`Backend`.
        backend_kwargs: Keyword arguments of the backend loader.
        vocabulary: Concept sources (``"general"``, ``"classes"``, ``"llm"`` or concept files).
        class_names: The dataset's class names (a vocabulary source and the ablation's labels).
        device: Where the model runs; default: where its parameters are.
        explainer: Deprecated: take the settings of this :class:`~lightning_neurons.NeuronExplainer`.
        **settings: Any other :class:`~lightning_neurons.NeuronExplainer` argument (``describe``,
            ``correction``, ``image_mean``, ``image_std``, ``input_key``, ``token_mode``, ``forward_fn``, ...).

    Returns:
        The :class:`~lightning_neurons.ExplanationRound`.

    Example:
        >>> from torch.utils.data import DataLoader
        >>> from lightning_neurons.demo import PhotoPatches, SmallCNN
        >>> loader = DataLoader(PhotoPatches(samples_per_class=2, image_size=32), batch_size=8)
        >>> rnd = explain(SmallCNN(num_classes=12), loader, "features.block4", top_k=2,
        ...               output_dir=getfixture("tmp_path"), show_progress=False)  # doctest: +SKIP
        >>> len(rnd.layer("features.block4")) > 0  # doctest: +SKIP
        True
    """
    if explainer is not None:
        warnings.warn(
            "explain(explainer=...) is deprecated; pass the settings as keyword arguments (or use explain_checkpoints)",
            DeprecationWarning,
            stacklevel=2,
        )
        config = explainer.config.with_output(output_dir)
    else:
        config = run_config(
            layers,
            output_dir,
            top_k=top_k,
            backend=backend,
            backend_kwargs=backend_kwargs,
            vocabulary=vocabulary,
            class_names=class_names,
            **settings,
        )
    if epoch is None and output_dir is not None:
        _check_epoch_given(Path(output_dir))
    session = open_session(config, dataloader, output_dir)
    try:
        return explain_with(session, model, dataloader, epoch=epoch, device=device)
    finally:
        session.teardown()


def explain_checkpoints(
    checkpoints: str | Path | Sequence[str | Path],
    model_class: type[nn.Module],
    dataloader: DataLoader,
    layers: LayerSpec,
    *,
    output_dir: str | Path = "neurons_posthoc",
    model_args: dict[str, Any] | None = None,
    **kwargs: Any,
) -> list[ExplanationRound]:
    """Explain a checkpoint, or every checkpoint of a directory in epoch order, into one drift history.

    Args:
        checkpoints: A ``.ckpt`` file, a directory of them, or a list of paths.
        model_class: The LightningModule class or any ``nn.Module`` class whose ``state_dict`` is under
            ``"state_dict"`` in the checkpoint (read with ``weights_only=True``).
        dataloader: The probe set.
        layers: Layer names, glob patterns, or a predicate.
        output_dir: Where history, TensorBoard events and the report go.
        model_args: Keyword arguments of ``model_class`` (override a LightningModule's saved hyperparameters).
        **kwargs: Passed on to :func:`explain`.

    Raises:
        FileNotFoundError: If no checkpoint is found.
        lightning_neurons.checkpoints.CheckpointError: If a checkpoint cannot be read safely.
    """
    paths = _checkpoint_steps(checkpoints)
    device = kwargs.pop("device", None)
    # One session for all checkpoints: models load once and the drift history runs across epochs.
    config = run_config(layers, output_dir, **kwargs)
    session = open_session(config, dataloader, output_dir)
    try:
        return [
            explain_with(
                session, _load_model(model_class, path, model_args), dataloader, epoch=epoch, device=device, step=step
            )
            for epoch, step, path in paths
        ]
    finally:
        session.teardown()


def _check_epoch_given(output_dir: Path) -> None:
    """A one-off round (no epoch) goes to epoch 0: refuse where that would replace a folder's own epoch 0."""
    from lightning_neurons.drift.history import load_history
    from lightning_neurons.session import _holds_history

    if _holds_history(output_dir):
        epochs = load_history(output_dir).epochs
        if epochs:
            raise ValueError(
                f"{output_dir} already holds the rounds of epochs {epochs}: pass epoch= (the epoch of these weights) "
                "so the round is filed where it belongs, or write to another output_dir"
            )


def run_config(layers: LayerSpec, output_dir: str | Path | None = None, **settings: Any) -> RunConfig:
    """The validated settings of a post-hoc run writing into ``output_dir`` (``NeuronExplainer``'s arguments)."""
    settings.setdefault("history_dir", str(output_dir) if output_dir is not None else None)
    return RunConfig.from_arguments(layers=layers, **settings)


def make_explainer(layers: LayerSpec, output_dir: str | Path | None = None, **settings: Any) -> Any:
    """Deprecated: a :class:`~lightning_neurons.NeuronExplainer` holding post-hoc settings; use :func:`run_config`."""
    from lightning_neurons.callback import NeuronExplainer

    warnings.warn("make_explainer is deprecated; use run_config", DeprecationWarning, stacklevel=2)
    history_dir = str(output_dir) if output_dir is not None else None
    return NeuronExplainer(layers=layers, history_dir=history_dir, **settings)


def open_session(config: RunConfig, dataloader: Any, output_dir: str | Path | None) -> ExplanationSession:
    """A set-up session for ``config``: models loaded, and writers into ``output_dir`` when given."""
    session = ExplanationSession(config)
    session.continues_folder = output_dir is not None
    session.setup(class_names=dataset_class_names(getattr(dataloader, "dataset", None)))
    if output_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(output_dir))
        session.open(output_dir, [_ClosingWriter(session.tensorboard_writer(writer), writer)])
    return session


def explain_with(
    session: ExplanationSession,
    model: nn.Module,
    dataloader: Any,
    *,
    epoch: int | None = None,
    device: str | torch.device | None = None,
    step: int | None = None,
) -> ExplanationRound:
    """Record ``model`` on ``dataloader`` with the session's settings and explain the recording.

    ``step`` is the global step of the weights (a checkpoint's), kept in the round's identity.
    """
    recording_config = session.config.recording
    if device is not None:
        model = model.to(device)
    extra: dict[str, Any] = {}
    if recording_config.forward_fn is not None:
        extra["forward_fn"] = recording_config.forward_fn
    recording = collect_top_k(
        model,
        dataloader,
        recording_config.layers,
        input_key=recording_config.input_key,
        target_key=recording_config.target_key,
        show_progress=session.config.output.show_progress,
        **recording_config.recorder_kwargs(),
        **extra,
    )
    recording.epoch = epoch
    source = DataLoaderSampleSource(
        dataloader, input_key=recording_config.input_key, target_key=recording_config.target_key
    )
    with evaluating(model), torch.no_grad():
        # keep_later: re-explaining an earlier epoch of the folder replaces that epoch and keeps the later ones.
        return session.explain(
            model, recording, source, epoch=epoch if epoch is not None else 0, keep_later=True, global_step=step
        )


class _ClosingWriter:
    """A round writer that also closes the SummaryWriter the post-hoc path opened."""

    def __init__(self, writer: Any, summary_writer: Any) -> None:
        self.writer = writer
        self.summary_writer = summary_writer

    def write_round(self, output: Any) -> None:
        self.writer.write_round(output)

    def close(self) -> None:
        self.writer.close()
        self.summary_writer.close()


def _checkpoint_steps(checkpoints: str | Path | Sequence[str | Path]) -> list[tuple[int | None, int | None, Path]]:
    """The checkpoints to explain as ``(epoch, global step, path)``, in training order."""
    return _dated_checkpoints([path for _, path in _checkpoint_paths(checkpoints, dated=False)])


def _checkpoint_paths(
    checkpoints: str | Path | Sequence[str | Path], dated: bool = True
) -> list[tuple[int | None, Path]]:
    if isinstance(checkpoints, (str, Path)):
        root = Path(checkpoints)
        if root.is_dir():
            found = sorted(root.rglob("*.ckpt"))
        elif root.is_file():
            found = [root]
        else:
            raise FileNotFoundError(f"checkpoint {str(root)!r} does not exist")
    else:
        found = [Path(p) for p in checkpoints]
    if not found:
        raise FileNotFoundError(f"no .ckpt files under {str(checkpoints)!r}")
    if not dated:
        return [(None, p) for p in found]
    return [(epoch, path) for epoch, _, path in _dated_checkpoints(found)]


def _dated_checkpoints(paths: Sequence[Path]) -> list[tuple[int | None, int | None, Path]]:
    """``(epoch, global step, path)`` in training order: by epoch, then by step (not by file name).

    By name ``step=15`` sorts before ``step=5``; by step, of two checkpoints of one epoch the later weights are filed
    last and kept.
    """
    dated = [(*_checkpoint_position(p), p) for p in paths]
    ordered = sorted(dated, key=lambda d: (d[0] is None, d[0] or 0, d[1] is None, d[1] or 0, str(d[2])))
    by_epoch: dict[int, list[Path]] = {}
    for epoch, _, path in ordered:
        if epoch is not None:
            by_epoch.setdefault(epoch, []).append(path)
    shared = {e: ps for e, ps in by_epoch.items() if len(ps) > 1}
    if shared:
        listing = "; ".join(f"epoch {e}: {', '.join(p.name for p in ps)}" for e, ps in shared.items())
        warnings.warn(
            f"several checkpoints share an epoch ({listing}); the history keeps one round per epoch, that of the "
            "latest step (each round's identity records its step)",
            stacklevel=3,
        )
    return ordered


def _checkpoint_position(path: Path) -> tuple[int | None, int | None]:
    """The checkpoint's epoch and global step (from the file, else from ``epoch=``/``step=`` in its name)."""
    state = load_checkpoint(path)
    values: list[int | None] = []
    for key in ("epoch", "global_step"):
        if isinstance(state, dict) and isinstance(state.get(key), int):
            values.append(int(state[key]))
            continue
        match = re.search(rf"{'epoch' if key == 'epoch' else 'step'}=(\d+)", path.name)
        values.append(int(match.group(1)) if match else None)
    return values[0], values[1]


def _checkpoint_epoch(path: Path) -> int | None:
    return _checkpoint_position(path)[0]


def _load_model(model_class: type[nn.Module], path: Path, model_args: dict[str, Any] | None = None) -> nn.Module:
    return load_model(model_class, path, model_args)


def evaluate_run(
    run_dir: str | Path,
    checkpoint: str | Path | None = None,
    output_dir: str | Path | None = None,
    data_args: dict[str, Any] | None = None,
) -> ExplanationRound:
    """Explain and evaluate the latest checkpoint of a ``lightning-neurons fit`` run with the run's own settings.

    The run's ``config.yaml`` (written by LightningCLI) rebuilds the model, the data module and the
    :class:`~lightning_neurons.NeuronExplainer` settings; the checkpoint's weights are loaded and the round is
    explained with ``evaluate=True``, so ``round.evaluation`` holds the quality metrics of the explanations and
    of the random, constant and label baselines.

    Args:
        run_dir: The run's log directory (holding ``config.yaml`` and ``checkpoints/``).
        checkpoint: A checkpoint to use instead of the newest one under ``run_dir``.
        output_dir: Where to write the round's history/report (default ``RUN_DIR/evaluation``).
        data_args: Data-module arguments that replace the run's, e.g. ``{"val_per_class": 96}``: a larger
            validation set leaves more samples outside the units' top-k sets to evaluate on.

    Raises:
        FileNotFoundError: If the config or a checkpoint is missing.
        ValueError: If the config has no NeuronExplainer callback, or ``data_args`` cannot apply.

    Example:
        >>> rnd = evaluate_run("runs/quickstart/version_0")  # doctest: +SKIP
        >>> rnd.evaluation.metrics["simulation"]  # doctest: +SKIP
        0.31
    """
    import lightning.pytorch as pl
    from lightning.pytorch.cli import LightningCLI

    run = Path(run_dir)
    config = run / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{config} not found: evaluate_run needs a run written by `lightning-neurons fit`")
    import yaml

    saved = yaml.safe_load(config.read_text())
    # Only what builds the objects: `fit` options such as ckpt_path and weights_only are not settings here.
    keep = ("seed_everything", "trainer", "model", "data", "optimizer", "lr_scheduler")
    settings = {key: value for key, value in saved.items() if key in keep}
    settings.setdefault("trainer", {})["logger"] = False
    if data_args:
        data = settings.get("data")
        if not isinstance(data, dict):
            raise ValueError(f"{config} has no data module whose arguments data_args could replace")
        # LightningCLI saves `data: {class_path, init_args}` for a subclass, plain arguments otherwise.
        target = data.setdefault("init_args", {}) if "class_path" in data else data
        target.update(data_args)
    cli = LightningCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        args=settings,
    )
    from lightning_neurons.callback import NeuronExplainer

    explainers = [cb for cb in cli.trainer.callbacks if isinstance(cb, NeuronExplainer)]  # type: ignore[attr-defined]
    if not explainers:
        raise ValueError(f"{config} configures no lightning_neurons.NeuronExplainer callback")
    paths = _checkpoint_steps(checkpoint if checkpoint is not None else run)
    epoch, step, path = paths[-1]
    load_model_weights(cli.model, path)
    cli.datamodule.setup("validate")
    explainer = explainers[0]
    target = Path(output_dir if output_dir is not None else run / "evaluation")
    run_settings = explainer.config.with_output(target).with_evaluation(True)
    loader = cli.datamodule.val_dataloader()
    session = open_session(run_settings, loader, target)
    try:
        return explain_with(session, cli.model.eval(), loader, epoch=epoch, step=step)
    finally:
        session.teardown()
