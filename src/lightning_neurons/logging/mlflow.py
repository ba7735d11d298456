"""MLflow logging of explanation rounds (``pip install lightning-neurons[mlflow]``).

Per round, on the run of a Lightning ``MLFlowLogger``:

- metrics through ``logger.log_metrics(..., step=output.step)``: the names of
  :func:`~lightning_neurons.logging.metrics.round_metrics` (``<prefix>/<layer>/fraction_changed``, ``mean_score``,
  ..., ``evaluation/<method>/<metric>``), ``<prefix>/<layer>/<unit>/score`` and ``drift`` for the ``log_units``
  selection; the step is ``output.step`` (the epoch, as TensorBoard's), not Lightning's global step, so that
  the image slider and the charts count explained rounds;
- artifacts ``<prefix>/<layer>/table_epoch_<epoch>.csv`` and ``.json`` (``table_step_<step>`` when rounds are filed by
  global step): every unit's row, the one every sink shows (see
  :func:`~lightning_neurons.logging.rows.unit_row`: shown description, kind, score, q-value, changed / gained / lost,
  ...), and ``<prefix>/<layer>/concepts_epoch_<epoch>.csv``: the layer's concept distribution (units per shown text);
- artifacts ``<prefix>/history/round-*.parquet`` (the history store, each round file once), and
  ``<prefix>/report.html`` and ``<prefix>/history.jsonl``: the session's HTML report and a JSON Lines history, when
  ``output.output_dir`` holds them (replaced each round);
- images through ``MlflowClient.log_image(key=..., step=output.step)``: the crop grid of each selected unit under
  the key ``<prefix>/<layer>/<unit>/top_k``, shown by the MLflow UI's image panel with a step slider.

A local store needs no server: ``MLFlowLogger(tracking_uri="sqlite:///mlflow.db")``, or a file store
``tracking_uri="file:./mlruns"``, which recent MLflow refuses unless ``MLFLOW_ALLOW_FILE_STORE=true`` is set.

Example:
    >>> from lightning.pytorch.loggers import MLFlowLogger  # doctest: +SKIP
    >>> writer = MLflowRoundWriter(MLFlowLogger(tracking_uri="sqlite:///mlflow.db"), log_units=8)  # doctest: +SKIP
    >>> writer.write_round(output)  # doctest: +SKIP
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from lightning_neurons.drift.store import STORE_DIRNAME
from lightning_neurons.logging.base import RoundOutput
from lightning_neurons.logging.metrics import round_metrics, unit_metrics
from lightning_neurons.logging.previews import preview_grid
from lightning_neurons.logging.rows import (
    distribution_csv,
    hwc,
    layer_distribution,
    layer_rows,
    round_label,
    rows_csv,
    rows_json,
)
from lightning_neurons.logging.tensorboard import LogUnits, select_units

if TYPE_CHECKING:
    from lightning.pytorch.loggers import MLFlowLogger

#: Session files uploaded as artifacts after each round, when present in ``output.output_dir``.
RUN_FILES = ("report.html", "history.jsonl")


def image_key(*parts: object) -> str:
    """An MLflow image key from tag parts (MLflow allows alphanumerics, ``_ - . /`` and spaces only).

    Example:
        >>> image_key("neurons", "blocks[0]", 3, "top_k")
        'neurons/blocks_0_/3/top_k'
    """
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", "/".join(map(str, parts)))


class MLflowRoundWriter:
    """Logs explanation rounds to the run of a Lightning ``MLFlowLogger``.

    Call :meth:`write_round` on global rank 0 (other ranks hold Lightning's dummy experiment).

    Args:
        logger: The trainer's ``lightning.pytorch.loggers.MLFlowLogger``.
        log_units: Units that get per-unit scalars and a crop grid image (every unit is in the table).
        preview_nrow: Crops per row of a grid.
        upload_files: Upload the session's HTML report and history (:data:`RUN_FILES`) after each round.
    """

    def __init__(
        self, logger: MLFlowLogger, log_units: LogUnits = None, preview_nrow: int = 8, upload_files: bool = True
    ) -> None:
        self.logger = logger
        self.log_units = log_units
        self.preview_nrow = preview_nrow
        self.upload_files = upload_files
        self._uploaded: set[str] = set()

    def write_round(self, output: RoundOutput) -> None:
        """Log the round's metrics, tables, images and the session's report."""
        client = self.logger.experiment
        run_id = self.logger.run_id
        prefix, step = output.prefix, output.step
        metrics = round_metrics(output, first_round_changed=None)
        for layer in output.round.layers:
            rows = layer_rows(output, layer)
            client.log_text(run_id, rows_csv(rows), f"{prefix}/{layer}/table_{round_label(output)}.csv")
            client.log_text(run_id, rows_json(rows), f"{prefix}/{layer}/table_{round_label(output)}.json")
            dist = distribution_csv(layer_distribution(output, layer))  # units per shown text
            client.log_text(run_id, dist, f"{prefix}/{layer}/concepts_{round_label(output)}.csv")
            logged = select_units(self.log_units, layer, output.round.units_of(layer))
            metrics.update(unit_metrics(output, layer, logged))
            for unit in logged:
                previews = output.round.previews.get((layer, unit))
                if previews is not None and previews.numel() > 0:
                    grid = hwc(preview_grid(previews, nrow=self.preview_nrow))
                    key = image_key(prefix, layer, unit, "top_k")
                    client.log_image(run_id, grid, key=key, step=step, synchronous=True)
        self.logger.log_metrics(metrics, step=step)
        if self.upload_files and output.output_dir is not None:
            for name in RUN_FILES:
                path = output.output_dir / name
                if path.is_file():
                    client.log_artifact(run_id, str(path), artifact_path=prefix)
            # The round store: each round file once (a file never changes once written).
            for path in sorted((output.output_dir / STORE_DIRNAME).glob("round-*.parquet")):
                if path.name not in self._uploaded:
                    client.log_artifact(run_id, str(path), artifact_path=f"{prefix}/{STORE_DIRNAME}")
                    self._uploaded.add(path.name)

    def close(self) -> None:
        """Nothing is buffered here (the ``MLFlowLogger`` ends the run)."""


__all__ = ["RUN_FILES", "MLflowRoundWriter", "image_key"]
