"""Offline MLflow and W&B for the logger tests (test_loggers.py, test_sink_agreement.py): no server, no network."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch.loggers import WandbLogger


def offline_store_env(mp: pytest.MonkeyPatch, root: Path) -> None:
    """Allow MLflow file stores and keep W&B's data, cache, config and artifact folders under ``root``."""
    mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        mp.setenv(var, str(root / var.lower()))


def offline_wandb_logger(root: Path) -> WandbLogger:
    """An offline, quiet W&B logger saving under ``root`` (no system stats, metadata, git or console capture)."""
    import wandb

    settings = wandb.Settings(
        x_disable_stats=True,
        x_disable_meta=True,
        x_disable_machine_info=True,
        disable_git=True,
        console="off",
        silent=True,
    )
    return WandbLogger(save_dir=str(root), offline=True, project="neurons", settings=settings)
