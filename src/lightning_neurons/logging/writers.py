"""Pick one round writer per configured Lightning logger, and the per-run output folder.

:func:`round_writers` dispatches by ``isinstance`` over ``trainer.loggers`` (Lightning's base ``Logger`` has no text
or image API, so each family gets its own writer): ``TensorBoardLogger`` ->
:class:`~lightning_neurons.logging.tensorboard.NeuronTensorBoardLogger` (plus, with ``projector=True``, a
:class:`~lightning_neurons.logging.projector.ProjectorWriter`), ``WandbLogger`` ->
:class:`~lightning_neurons.logging.wandb.WandbRoundWriter`, ``MLFlowLogger`` ->
:class:`~lightning_neurons.logging.mlflow.MLflowRoundWriter`, any other logger (``CSVLogger`` included) ->
:class:`~lightning_neurons.logging.generic.LoggerRoundWriter`.

:func:`run_output_dir` gives the folder of *this* run (the session writes its ``neurons`` folder inside it):

========================  ====================================================================================
first logger              folder
========================  ====================================================================================
TensorBoard, CSV          ``logger.log_dir`` (the version folder, e.g. ``lightning_logs/version_3``)
W&B                       ``run.dir`` (``<save_dir>/wandb/run-<date>-<id>/files``: W&B uploads it with the run)
MLflow                    ``<default_root_dir>/neurons_mlflow/<run_id>`` (not inside the tracking store: a file
                          store reads every folder at its root as an experiment and warns it is malformed)
any other                 ``logger.log_dir``, else ``<save_dir>/<name>/<version>``, else ``default_root_dir``
none                      ``default_root_dir``
========================  ====================================================================================

``trainer.log_dir`` is not used: with a W&B or MLflow logger first it is the logger's ``save_dir`` (``.`` or
``./mlruns``), shared by every run, so a new run would append to the previous run's history.

Collectives and ranks (checked against Lightning 2.6): :func:`run_output_dir` calls no collective.
``TensorBoardLogger.log_dir`` / ``CSVLogger.log_dir`` compute the version from the file system on every rank (no
broadcast; ``trainer.log_dir`` is what broadcasts) and create nothing; on rank 0 the ``CSVLogger``'s writer is opened
(its folder created) first, so that it does not warn about the session's files in it. ``WandbLogger.experiment`` and
``MLFlowLogger.experiment`` (``run_id``) are ``rank_zero_experiment`` properties: on global rank 0 they create the
W&B run / the MLflow run, on other ranks they return Lightning's ``_DummyExperiment`` and create nothing, and
``MLFlowLogger.run_id`` stays ``None``. So only rank 0's answer is the real folder; other ranks get a placeholder
(for W&B and MLflow ``default_root_dir``; for TensorBoard/CSV a version number computed from the file system, which
can differ from rank 0's when rank 0 has already created its version folder). A caller that needs the folder on
every rank broadcasts rank 0's value, e.g. ``trainer.strategy.broadcast(str(path))`` (called on every rank).

Example:
    >>> from lightning.pytorch.loggers import CSVLogger
    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> logger = CSVLogger(root, name="run")
    >>> [type(w).__name__ for w in round_writers([logger], log_units=4)]
    ['LoggerRoundWriter']
    >>> run_output_dir([logger], root).relative_to(root).as_posix()
    'run/version_0'
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.rank_zero import rank_zero_only

from lightning_neurons.logging.base import RoundWriter
from lightning_neurons.logging.tensorboard import _WRITER_METHODS, LogUnits, NeuronTensorBoardLogger


def _rank() -> int:
    # Lightning sets it in every process (the ``rank_zero_experiment`` properties read the same value).
    return int(getattr(rank_zero_only, "rank", 0))


#: Folder under ``default_root_dir`` that holds one folder per MLflow run id.
MLFLOW_RUNS_DIRNAME = "neurons_mlflow"


def _is_tensorboard(logger: Any) -> bool:
    from lightning.fabric.loggers.tensorboard import TensorBoardLogger

    return isinstance(logger, TensorBoardLogger)


def _is_csv(logger: Any) -> bool:
    from lightning.fabric.loggers.csv_logs import CSVLogger

    return isinstance(logger, CSVLogger)


def _is_wandb(logger: Any) -> bool:
    from lightning.pytorch.loggers.wandb import WandbLogger

    return isinstance(logger, WandbLogger)


def _is_mlflow(logger: Any) -> bool:
    from lightning.pytorch.loggers.mlflow import MLFlowLogger

    return isinstance(logger, MLFlowLogger)


def round_writers(
    loggers: Sequence[Any],
    *,
    log_units: LogUnits = None,
    prefix: str = "neurons",
    evaluation_metrics: Sequence[str] = (),
    preview_nrow: int = 8,
    projector: bool = False,
    projector_max_units: int | None = 2000,
    embed: Callable[[list[str]], Any] | None = None,
) -> list[RoundWriter]:
    """One round writer per logger, chosen by the logger's type, so that every configured logger gets the round.

    Call it on global rank 0 only (writers are rank-0 objects); on other ranks it returns ``[]`` without touching
    any logger. It opens the TensorBoard writers (``logger.experiment``); the W&B and MLflow runs are opened by
    their first round.

    Args:
        loggers: The trainer's loggers (``trainer.loggers``).
        log_units: Units that get per-unit tags / grids / scalars (``None`` all, an int, ids, or a layer mapping).
        prefix: First tag component of the TensorBoard writer (the others read ``RoundOutput.prefix``).
        evaluation_metrics: Metrics that get a custom-scalars chart in TensorBoard (``evaluate=True``).
        preview_nrow: Crops per row of a grid.
        projector: Also write TensorBoard Projector maps of all units (one per layer and explained epoch).
        projector_max_units: Cap of units per layer in a projector map (``None``: no cap).
        embed: Text embedder of the projector points (e.g. ``backend.encode_descriptions``); ``None`` uses each
            unit's concept-score vector.

    Returns:
        The writers, in the order of ``loggers``.

    Example:
        >>> round_writers([])
        []
    """
    if _rank() > 0:
        return []
    writers: list[RoundWriter] = []
    for logger in loggers:
        if _is_tensorboard(logger):
            experiment = logger.experiment
            if all(callable(getattr(experiment, m, None)) for m in _WRITER_METHODS):
                writers.append(
                    NeuronTensorBoardLogger(
                        experiment,
                        log_units=log_units,
                        prefix=prefix,
                        preview_nrow=preview_nrow,
                        evaluation_metrics=evaluation_metrics,
                    )
                )
                if projector:
                    from lightning_neurons.logging.projector import ProjectorWriter

                    writers.append(ProjectorWriter(experiment, max_units=projector_max_units, embed=embed))
                continue
        if _is_wandb(logger):
            from lightning_neurons.logging.wandb import WandbRoundWriter

            writers.append(WandbRoundWriter(logger, log_units=log_units, preview_nrow=preview_nrow))
        elif _is_mlflow(logger):
            from lightning_neurons.logging.mlflow import MLflowRoundWriter

            writers.append(MLflowRoundWriter(logger, log_units=log_units, preview_nrow=preview_nrow))
        else:
            from lightning_neurons.logging.generic import LoggerRoundWriter

            writers.append(LoggerRoundWriter(logger, log_units=log_units))
    return writers


def run_output_dir(loggers: Sequence[Any], default_root_dir: str | Path) -> Path:
    """The folder of this run, from the first logger (see the table in this module's documentation).

    Calls no collective. Only global rank 0's answer is the run's folder; see the module documentation for what
    other ranks get and how to share rank 0's value.

    Args:
        loggers: The trainer's loggers (``trainer.loggers``).
        default_root_dir: The trainer's ``default_root_dir`` (used without loggers, for MLflow, and on ranks > 0).

    Example:
        >>> run_output_dir([], "runs")
        PosixPath('runs')
    """
    root = Path(default_root_dir)
    if not loggers:
        return root
    logger = loggers[0]
    if _is_csv(logger) and _rank() == 0:
        # Open the CSV writer now: it warns that it will delete "previous log files" when its folder already holds
        # files, which the session's neurons folder would be by the time Lightning opens it.
        _ = logger.experiment
    if _is_tensorboard(logger) or _is_csv(logger):
        return Path(logger.log_dir)
    if _is_wandb(logger):
        if _rank() > 0:
            return root
        return Path(logger.experiment.dir)
    if _is_mlflow(logger):
        if _rank() > 0:
            return root
        return root / MLFLOW_RUNS_DIRNAME / str(logger.run_id)
    log_dir = getattr(logger, "log_dir", None)
    if isinstance(log_dir, (str, Path)) and str(log_dir):
        return Path(log_dir)
    save_dir, name, version = (getattr(logger, a, None) for a in ("save_dir", "name", "version"))
    if save_dir and name is not None and version is not None:
        return Path(save_dir) / str(name) / (version if isinstance(version, str) else f"version_{version}")
    return root


__all__ = ["MLFLOW_RUNS_DIRNAME", "round_writers", "run_output_dir"]
