"""Any other Lightning logger (``CSVLogger`` included): scalars through ``log_metrics``, tables as files.

Lightning's base ``Logger`` has no text or image API, so this writer logs the numbers of
:func:`~lightning_neurons.logging.metrics.round_metrics` with ``logger.log_metrics`` and writes each layer's table
as ``<output_dir>/tables/<layer>_epoch_<epoch>.csv`` (``_step_<step>`` under step-based validation; the row every sink
shows, :func:`~lightning_neurons.logging.rows.unit_row`) and its concept distribution as
``<layer>_concepts_epoch_<epoch>.csv`` into the
run's ``neurons`` folder, beside the history, the crop previews and the HTML report that the session writes there.

Step axis: the trainer's global step (``output.global_step``, else ``output.step``), the step every other metric of
such a logger is filed under, with the epoch as the value ``epoch`` (as Lightning itself logs it); a ``CSVLogger``
row of a round thus sits beside the training rows of that step.

Example:
    >>> from lightning.pytorch.loggers import CSVLogger
    >>> from lightning_neurons.results import ExplanationRound, UnitExplanation
    >>> import tempfile
    >>> logger = CSVLogger(tempfile.mkdtemp())
    >>> rnd = ExplanationRound(0, [UnitExplanation("fc", 0, 0, "dots", 0.8, activations=[1.0])])
    >>> LoggerRoundWriter(logger).write_round(RoundOutput(rnd, [], [], step=0, epoch=0))
    >>> logger.save()
    >>> "neurons/fc/dead_units" in open(f"{logger.log_dir}/metrics.csv").readline()
    True
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_neurons.files import write_text_atomic
from lightning_neurons.logging.base import RoundOutput
from lightning_neurons.logging.metrics import round_metrics, unit_metrics
from lightning_neurons.logging.rows import distribution_csv, layer_distribution, layer_rows, round_label, rows_csv
from lightning_neurons.logging.tensorboard import LogUnits, select_units

if TYPE_CHECKING:
    from lightning.fabric.loggers import Logger as FabricLogger
    from lightning.pytorch.loggers import Logger

#: Folder of the per-layer table files inside ``output.output_dir``.
TABLES_DIRNAME = "tables"


class LoggerRoundWriter:
    """Logs explanation rounds to any Lightning logger through ``log_metrics``.

    Args:
        logger: A ``lightning.pytorch.loggers.Logger`` (``CSVLogger``, a custom logger, ...).
        log_units: Units that also get ``<prefix>/<layer>/<unit>/score`` and ``drift`` scalars.
        write_tables: Write the per-layer CSV tables into ``output.output_dir``.
    """

    def __init__(self, logger: Logger | FabricLogger, log_units: LogUnits = 0, write_tables: bool = True) -> None:
        self.logger = logger
        self.log_units = log_units
        self.write_tables = write_tables

    def write_round(self, output: RoundOutput) -> None:
        """Log the round's scalars and write its tables."""
        metrics = round_metrics(output, first_round_changed=None)
        for layer in output.round.layers:
            logged = select_units(self.log_units, layer, output.round.units_of(layer))
            metrics.update(unit_metrics(output, layer, logged))
            if self.write_tables and output.output_dir is not None:
                path = output.output_dir / TABLES_DIRNAME / f"{layer}_{round_label(output)}.csv"
                write_text_atomic(path, rows_csv(layer_rows(output, layer)))  # a reader never sees half a table
                dist = output.output_dir / TABLES_DIRNAME / f"{layer}_concepts_{round_label(output)}.csv"
                write_text_atomic(dist, distribution_csv(layer_distribution(output, layer)))
        metrics["epoch"] = float(output.epoch)
        step = output.global_step if output.global_step is not None else output.step
        self.logger.log_metrics(metrics, step=step)

    def close(self) -> None:
        """Let the logger write what it buffers (``CSVLogger`` keeps rows in memory until ``save``)."""
        self.logger.save()


__all__ = ["TABLES_DIRNAME", "LoggerRoundWriter"]
