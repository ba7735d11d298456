"""Explaining a trained model after the fact: one model, one checkpoint, or a directory of checkpoints.

The post-hoc path runs the same recording and the same explanation stage as the callback (it builds a
:class:`~lightning_neurons.NeuronExplainer` to hold the settings), so a checkpoint's descriptions match what the
callback logged for that epoch, and a directory of checkpoints explained in epoch order gives drift without
retraining.

Example:
    >>> from lightning_neurons import explain
    >>> rnd = explain(model, val_loader, ["layer4"], top_k=16, output_dir="neurons")  # doctest: +SKIP
    >>> rnd.get("layer4", 0).description  # doctest: +SKIP
    'striped texture'
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_neurons.backends.base import Backend
from lightning_neurons.callback import NeuronExplainer
from lightning_neurons.checkpoints import load_checkpoint, load_model, load_model_weights
from lightning_neurons.recording.recorder import collect_top_k
from lightning_neurons.recording.samples import DataLoaderSampleSource
from lightning_neurons.results import ExplanationRound

LayerSpec = str | list[str] | Callable[[str, nn.Module], bool]


def explain(
    model: nn.Module,
    dataloader: DataLoader,
    layers: LayerSpec,
    *,
    top_k: int = 16,
    epoch: int | None = None,
    output_dir: str | Path | None = None,
    backend: str | Backend = "embedded",
    backend_kwargs: dict[str, Any] | None = None,
    vocabulary: list[str] | None = None,
    class_names: list[str] | None = None,
    device: str | torch.device | None = None,
    explainer: NeuronExplainer | None = None,
    **settings: Any,
) -> ExplanationRound:
    """Record the top-k samples of every unit of ``layers`` on ``dataloader`` and explain them.

    Args:
        model: The trained network (any ``nn.Module``; a LightningModule works too).
        dataloader: The probe set, e.g. the validation loader (not shuffled).
        layers: Layer names, glob patterns, or a predicate ``(name, module) -> bool``.
        top_k: Top samples kept per unit.
        epoch: Epoch to file the round under (drift needs it); ``None`` for a one-off explanation.
        output_dir: When given, the history (JSON Lines), TensorBoard events, crop previews and the HTML
            report are written there, as the callback writes them into a run's log directory.
        backend: ``"embedded"`` (offline), ``"clip"``, ``"hf"`` or a loaded :class:`Backend`.
        backend_kwargs: Keyword arguments of the backend loader.
        vocabulary: Concept sources (``"general"``, ``"classes"``, ``"llm"`` or concept files).
        class_names: The dataset's class names (a vocabulary source and the ablation's labels).
        device: Where the model runs; default: where its parameters are.
        explainer: Reuse the settings, loaded models and history of this explainer (e.g. across checkpoints).
        **settings: Any other :class:`~lightning_neurons.NeuronExplainer` argument (``describe``,
            ``correction``, ``image_mean``, ``image_std``, ``input_key``, ``token_mode``, ...).

    Returns:
        The :class:`~lightning_neurons.ExplanationRound`.
    """
    if explainer is None:
        explainer = make_explainer(
            layers,
            output_dir,
            top_k=top_k,
            backend=backend,
            backend_kwargs=backend_kwargs,
            vocabulary=vocabulary,
            class_names=class_names,
            **settings,
        )
    if device is not None:
        model = model.to(device)
    session = explainer.ensure_session()
    session.setup_standalone(model, dataloader, output_dir)
    recording = collect_top_k(
        model,
        dataloader,
        explainer.layers,
        input_key=explainer.input_key,
        target_key=explainer.target_key,
        show_progress=explainer.show_progress,
        **explainer.recorder_settings(),
    )
    recording.epoch = epoch
    source = DataLoaderSampleSource(dataloader, input_key=explainer.input_key, target_key=explainer.target_key)
    return session.explain(model, recording, source)


def explain_checkpoints(
    checkpoints: str | Path | Sequence[str | Path],
    model_class: type[nn.Module],
    dataloader: DataLoader,
    layers: LayerSpec,
    *,
    output_dir: str | Path = "neurons_posthoc",
    **kwargs: Any,
) -> list[ExplanationRound]:
    """Explain a checkpoint, or every checkpoint of a directory in epoch order, into one drift history.

    Args:
        checkpoints: A ``.ckpt`` file, a directory of them, or a list of paths.
        model_class: The LightningModule class (``load_from_checkpoint`` is used) or any ``nn.Module`` class whose
            ``state_dict`` is under ``"state_dict"`` in the checkpoint.
        dataloader: The probe set.
        layers: Layer names, glob patterns, or a predicate.
        output_dir: Where history, TensorBoard events and the report go.
        **kwargs: Passed on to :func:`explain`.

    Raises:
        FileNotFoundError: If no checkpoint is found.
    """
    paths = _checkpoint_paths(checkpoints)
    device = kwargs.pop("device", None)
    # One explainer for all checkpoints: models load once and the drift history runs across epochs.
    explainer = make_explainer(layers, output_dir, **kwargs)
    rounds = []
    for epoch, path in paths:
        model = _load_model(model_class, path)
        rounds.append(
            explain(model, dataloader, layers, epoch=epoch, output_dir=output_dir, device=device, explainer=explainer)
        )
    return rounds


def make_explainer(layers: LayerSpec, output_dir: str | Path | None = None, **settings: Any) -> NeuronExplainer:
    """A :class:`~lightning_neurons.NeuronExplainer` holding post-hoc settings (writes into ``output_dir``)."""
    history_dir = str(output_dir) if output_dir is not None else None
    return NeuronExplainer(layers=layers, history_dir=history_dir, **settings)


def _checkpoint_paths(checkpoints: str | Path | Sequence[str | Path]) -> list[tuple[int | None, Path]]:
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
    dated = [(_checkpoint_epoch(p), p) for p in found]
    return sorted(dated, key=lambda item: (item[0] is None, item[0] if item[0] is not None else 0, str(item[1])))


def _checkpoint_epoch(path: Path) -> int | None:
    state = load_checkpoint(path)
    if isinstance(state, dict) and isinstance(state.get("epoch"), int):
        return int(state["epoch"])
    match = re.search(r"epoch=(\d+)", path.name)
    return int(match.group(1)) if match else None


def _load_model(model_class: type[nn.Module], path: Path) -> nn.Module:
    return load_model(model_class, path)


def evaluate_run(
    run_dir: str | Path,
    checkpoint: str | Path | None = None,
    output_dir: str | Path | None = None,
    data_args: dict[str, Any] | None = None,
) -> ExplanationRound:
    """Explain and evaluate the latest checkpoint of a ``lightning-neurons fit`` run with the run's own settings.

    The run's ``config.yaml`` (written by LightningCLI) rebuilds the model, the data module and the
    :class:`~lightning_neurons.NeuronExplainer` settings; the checkpoint's weights are loaded and the round is
    explained with ``evaluate=True``, so ``round.meta["evaluation"]`` holds the quality metrics and
    ``round.meta["evaluation_baselines"]`` the same metrics of the random, constant and label baselines.

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
        >>> rnd.meta["evaluation"]["simulation"]  # doctest: +SKIP
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
    explainers = [cb for cb in cli.trainer.callbacks if isinstance(cb, NeuronExplainer)]  # type: ignore[attr-defined]
    if not explainers:
        raise ValueError(f"{config} configures no lightning_neurons.NeuronExplainer callback")
    paths = _checkpoint_paths(checkpoint if checkpoint is not None else run)
    epoch, path = paths[-1]
    load_model_weights(cli.model, path)
    cli.datamodule.setup("validate")
    explainer = explainers[0]
    explainer.evaluate = True
    explainer.history_dir = str(output_dir if output_dir is not None else run / "evaluation")
    return explain(
        cli.model.eval(),
        cli.datamodule.val_dataloader(),
        explainer.layers,
        epoch=epoch,
        output_dir=explainer.history_dir,
        explainer=explainer,
    )
