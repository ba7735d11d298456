"""The TensorBoard table of a big layer: capped at table_rows, changed units first, then by score, read back from a
real event file."""

from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from _rounds import bow_embed
from lightning_neurons.drift.history import RunHistory
from lightning_neurons.logging.tensorboard import NeuronTensorBoardLogger
from lightning_neurons.results import ExplanationRound, UnitExplanation


def _round(epoch: int, units: int = 40) -> ExplanationRound:
    # Units 5 and 17 change meaning at epoch 1; scores rise with the unit index (unit 3 has none).
    return ExplanationRound(
        epoch,
        [
            UnitExplanation(
                "blocks.0",
                u,
                epoch,
                "stripes" if epoch and u in (5, 17) else "sky",
                float("nan") if u == 3 else u / 100,
            )
            for u in range(units)
        ],
    )


def _table(log_dir, step: int) -> str:
    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    (event,) = [e for e in acc.Tensors("neurons/blocks.0/table/text_summary") if e.step == step]
    return event.tensor_proto.string_val[0].decode()


def test_big_layer_table_is_capped_changed_units_first(tmp_path):
    history = RunHistory()
    with SummaryWriter(tmp_path) as writer:
        tb = NeuronTensorBoardLogger(writer, log_units=0, table_rows=10)
        for epoch in range(2):
            rnd = _round(epoch)
            drift = history.add_round(rnd, bow_embed)
            tb.log_round(rnd, drift, history.summary(epoch), epoch=epoch)
    rows = [line for line in _table(tmp_path, 1).splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [int(r.split("|")[1]) for r in rows] == [17, 5, 39, 38, 37, 36, 35, 34, 33, 32]
    assert rows[0] == "| 17 | **stripes** | – | 0.170 | – | changed | sky | 0.000 |"
    assert "30 more units of this layer (of 40; changed units first, then by score)" in _table(tmp_path, 1)
    assert "40 units" in _table(tmp_path, 0).splitlines()[0]  # the summary line still counts every unit


def test_small_layer_table_lists_every_unit_in_unit_order():
    rnd = _round(0, units=6)
    table = NeuronTensorBoardLogger.table(rnd.units, {}, rows=6)
    assert [int(line.split("|")[1]) for line in table.splitlines()[2:]] == list(range(6))
    assert "more units" not in table
    assert len(NeuronTensorBoardLogger.table(rnd.units, {}, rows=2).splitlines()) == 2 + 2 + 2
    with pytest.raises(ValueError, match="table_rows"):
        NeuronTensorBoardLogger(writer=None, table_rows=0)
