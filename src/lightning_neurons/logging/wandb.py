"""Weights & Biases logging of explanation rounds (``pip install lightning-neurons[wandb]``).

Per round, one ``run.log`` call (one W&B step) with:

- ``<prefix>/<layer>/table``: a ``wandb.Table`` of every unit of the layer, the row every sink shows
  (:func:`~lightning_neurons.logging.rows.unit_row`: the shown description, kind, score, q-value, combination,
  changed / gained / lost, previous description, similarity, ...), and the unit's top crop as a ``wandb.Image``
  (``None`` for units without previews).
- ``<prefix>/<layer>/concepts``: a ``wandb.Table`` of the layer's concept distribution (units per shown text).
- ``<prefix>/<layer>/<unit>/top_k``: the crop grid of each unit selected by ``log_units``, a ``wandb.Image``.
- the scalars of :func:`~lightning_neurons.logging.metrics.round_metrics` (``<prefix>/<layer>/fraction_changed``,
  ``fraction_gained``, ``fraction_lost``, ``top_concept_share``, ``mean_score``, ...,
  ``evaluation/<method>/<metric>``) and ``<prefix>/<layer>/<unit>/score`` / ``drift``.

Step axis: Lightning's ``WandbLogger`` declares ``trainer/global_step`` as the x-axis of every metric
(``define_metric("*", step_metric="trainer/global_step")``) and lets W&B count its own step. The writer therefore
never passes ``step=`` to ``run.log`` (a step below W&B's counter would be dropped); it logs
``trainer/global_step`` (the trainer's global step when the session gives it, else ``output.step``) and the epoch
as the value ``epoch``, so a chart can use either as its x-axis.

Example:
    >>> from lightning.pytorch.loggers import WandbLogger  # doctest: +SKIP
    >>> writer = WandbRoundWriter(WandbLogger(project="neurons", offline=True), log_units=8)  # doctest: +SKIP
    >>> writer.write_round(output)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning_neurons.logging.base import RoundOutput
from lightning_neurons.logging.metrics import round_metrics, unit_metrics
from lightning_neurons.logging.previews import preview_grid
from lightning_neurons.logging.rows import ROW_COLUMNS, hwc, layer_distribution, layer_rows, top_crop
from lightning_neurons.logging.tensorboard import LogUnits, select_units

if TYPE_CHECKING:
    from lightning.pytorch.loggers import WandbLogger

#: Columns of the per-layer ``wandb.Table``: the shared rows plus the top crop.
TABLE_COLUMNS = (*ROW_COLUMNS, "top_crop")


def _import_wandb() -> Any:
    try:
        import wandb
    except ImportError as err:  # pragma: no cover - the dev extra installs it
        raise ImportError("WandbRoundWriter needs the wandb package: pip install 'lightning-neurons[wandb]'") from err
    return wandb


class WandbRoundWriter:
    """Logs explanation rounds to the run of a Lightning ``WandbLogger``.

    Call :meth:`write_round` on global rank 0 (other ranks hold Lightning's dummy experiment).

    Args:
        logger: The trainer's ``lightning.pytorch.loggers.WandbLogger``.
        log_units: Units that get a crop grid and per-unit scalars (as ``NeuronTensorBoardLogger``'s); every unit
            is in the table either way.
        preview_nrow: Crops per row of a grid.
        table_images: Put each unit's top crop into the table (one small image file per unit and round).
    """

    def __init__(
        self, logger: WandbLogger, log_units: LogUnits = None, preview_nrow: int = 8, table_images: bool = True
    ) -> None:
        self.logger = logger
        self.log_units = log_units
        self.preview_nrow = preview_nrow
        self.table_images = table_images

    def write_round(self, output: RoundOutput) -> None:
        """Log the round's tables, grids and scalars as one W&B step."""
        wandb = _import_wandb()
        prefix = output.prefix
        payload: dict[str, Any] = {}
        for layer in output.round.layers:
            table = wandb.Table(columns=list(TABLE_COLUMNS))
            for row in layer_rows(output, layer):
                crop = top_crop(output, layer, row["unit"]) if self.table_images else None
                image = wandb.Image(hwc(crop), caption=row["description"]) if crop is not None else None
                table.add_data(*[row[c] for c in ROW_COLUMNS], image)
            payload[f"{prefix}/{layer}/table"] = table
            dist = layer_distribution(output, layer)  # units per shown text: a collapse onto one word is visible
            concepts = wandb.Table(columns=["description", "units", "share"])
            for r in dist.table(len(dist.counts)):
                concepts.add_data(r["description"], r["units"], r["share"])
            payload[f"{prefix}/{layer}/concepts"] = concepts
            rows = {row["unit"]: row for row in layer_rows(output, layer)}
            logged = select_units(self.log_units, layer, output.round.units_of(layer))
            payload.update(unit_metrics(output, layer, logged))
            for unit in logged:
                previews = output.round.previews.get((layer, unit))
                if previews is not None and previews.numel() > 0:
                    grid = preview_grid(previews, nrow=self.preview_nrow)
                    payload[f"{prefix}/{layer}/{unit}/top_k"] = wandb.Image(
                        hwc(grid), caption=rows[unit]["description"]
                    )
        payload.update(round_metrics(output, first_round_changed=None))
        payload["epoch"] = output.epoch
        payload["trainer/global_step"] = output.global_step if output.global_step is not None else output.step
        self.logger.experiment.log(payload)

    def close(self) -> None:
        """Nothing is buffered here (the ``WandbLogger`` finishes the run)."""


__all__ = ["TABLE_COLUMNS", "WandbRoundWriter"]
