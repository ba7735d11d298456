from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from _rounds import PLAN, bow_embed, make_real_round, make_round
from lightning_neurons.drift.history import HISTORY_FILENAME, RunHistory
from lightning_neurons.logging.previews import PREVIEWS_DIRNAME, latest_preview, preview_grid, preview_path
from lightning_neurons.logging.tensorboard import NeuronTensorBoardLogger, find_tensorboard_writer


def write_run(log_dir, epochs=range(5), log_units=None) -> RunHistory:
    """What the callback does each explained epoch: history, TensorBoard, previews."""
    history = RunHistory()
    history.attach(log_dir / HISTORY_FILENAME)
    with SummaryWriter(log_dir) as writer:
        tb = NeuronTensorBoardLogger(writer, log_units=log_units)
        for epoch in epochs:
            rnd = make_round(epoch)
            drift = history.add_round(rnd, bow_embed)
            tb.log_round(rnd, drift, history.summary(epoch), epoch=epoch)
            tb.save_previews(rnd, log_dir / PREVIEWS_DIRNAME)
    return history


def load_events(log_dir) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0, "images": 0, "scalars": 0})
    acc.Reload()
    return acc


def text_values(acc: EventAccumulator, tag: str) -> dict[int, str]:
    return {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors(f"{tag}/text_summary")}


def test_event_files(tmp_path):
    write_run(tmp_path, log_units=None)
    acc = load_events(tmp_path)
    tags = acc.Tags()
    layers = ["features.3", "head.fc"]
    for layer in layers:
        units = [u for (ly, u) in PLAN if ly == layer]
        assert f"neurons/{layer}/table/text_summary" in tags["tensors"]
        for unit in units:
            assert f"neurons/{layer}/{unit}/description/text_summary" in tags["tensors"]
            assert f"neurons/{layer}/{unit}/top_k" in tags["images"]
            assert [e.step for e in acc.Scalars(f"neurons/{layer}/{unit}/score")] == [0, 1, 2, 3, 4]
            assert [e.step for e in acc.Scalars(f"neurons/{layer}/{unit}/drift")] == [1, 2, 3, 4]
        assert [e.step for e in acc.Scalars(f"neurons/{layer}/mean_score")] == [0, 1, 2, 3, 4]
        assert [e.step for e in acc.Scalars(f"neurons/{layer}/fraction_changed")] == [1, 2, 3, 4]
        assert sorted(text_values(acc, f"neurons/{layer}/table")) == [0, 1, 2, 3, 4]

    # Unit 0 of features.3 changes meaning at epoch 2, and only there.
    changed = [e.value for e in acc.Scalars("neurons/features.3/fraction_changed")]
    assert changed == pytest.approx([0, 1 / 3, 0, 0])
    assert [e.value for e in acc.Scalars("neurons/head.fc/fraction_changed")] == [0, 0, 0, 0]
    drift0 = {e.step: e.value for e in acc.Scalars("neurons/features.3/0/drift")}
    assert drift0[2] == pytest.approx(1.0) and drift0[1] == drift0[3] == drift0[4] == 0.0

    tables = text_values(acc, "neurons/features.3/table")
    assert "| 0 | **vertical stripes** | – | 0.700 | – | changed | red dots | 0.000 |" in tables[2]
    assert "| 0 | vertical stripes | – | 0.750 | – | – | vertical stripes | 1.000 |" in tables[3]
    assert "| 0 | red dots | – | 0.600 | – | – | – | – |" in tables[0]
    assert "1/3 changed" in tables[2]
    desc = text_values(acc, "neurons/features.3/0/description")
    assert desc[2].startswith("**vertical stripes**") and "changed from *red dots* at epoch 1" in desc[2]

    # Image grids: 4 crops of 24 px in one row with 2 px padding.
    images = acc.Images("neurons/features.3/0/top_k")
    assert [e.step for e in images] == [0, 1, 2, 3, 4]
    assert (images[0].width, images[0].height) == (4 * 24 + 5 * 2, 24 + 2 * 2)
    assert Image.open(io.BytesIO(images[0].encoded_image_string)).size == (106, 28)

    # One custom-scalars layout, with regex charts for every layer.
    assert "custom_scalars__config__" in tags["tensors"]
    assert len(acc.Tensors("custom_scalars__config__")) == 1
    assert latest_preview(tmp_path / PREVIEWS_DIRNAME, "features.3", 0).name == "epoch_4.png"
    assert latest_preview(tmp_path / PREVIEWS_DIRNAME, "features.3", 0, up_to_epoch=2).name == "epoch_2.png"

    # The history file tells the same story.
    lines = [json.loads(x) for x in (tmp_path / HISTORY_FILENAME).read_text().splitlines()]
    assert {(r["layer"], r["unit"], r["epoch"]) for r in lines if r["changed"]} == {("features.3", 0, 2)}


@pytest.mark.parametrize(
    ("log_units", "expected"),
    [
        (1, {("features.3", 0), ("head.fc", 0)}),
        ([1], {("features.3", 1), ("head.fc", 1)}),
        ({"head.fc": [0]}, {("head.fc", 0)}),
        (0, set()),
    ],
)
def test_log_units_selection(tmp_path, log_units, expected):
    write_run(tmp_path, epochs=range(2), log_units=log_units)
    tags = load_events(tmp_path).Tags()
    logged = {(t.split("/")[1], int(t.split("/")[2])) for t in tags["images"]}
    assert logged == expected
    assert {"neurons/features.3/table/text_summary", "neurons/head.fc/table/text_summary"} <= set(tags["tensors"])


def test_layout_and_validation():
    class FakeWriter:
        def __init__(self):
            self.calls = []

        def __getattr__(self, name):
            return lambda *a, **k: self.calls.append((name, a, k))

    writer = FakeWriter()
    tb = NeuronTensorBoardLogger(writer)
    tb.log_round(make_round(0), [], [], epoch=0)
    tb.log_round(make_round(1), [], [], epoch=1)
    layouts = [a[0] for name, a, _ in writer.calls if name == "add_custom_scalars"]
    assert len(layouts) == 1
    assert set(layouts[0]) == {"neurons: overview", "neurons: features.3", "neurons: head.fc"}
    assert layouts[0]["neurons: features.3"]["unit scores"] == ["Multiline", [r"^neurons/features\.3/\d+/score$"]]
    # evaluate=True: one chart per quality metric, the method and its baselines as its lines
    evaluated = FakeWriter()
    NeuronTensorBoardLogger(evaluated, evaluation_metrics=["simulation"]).log_round(make_round(0), [], [], epoch=0)
    layout = next(a[0] for name, a, _ in evaluated.calls if name == "add_custom_scalars")
    chart = layout["evaluation: explanations vs baselines"]["simulation"]
    assert chart == ["Multiline", [r"^evaluation/[^/]+/simulation$"]]
    with pytest.raises(ValueError):
        NeuronTensorBoardLogger(writer, log_units=-1)
    with pytest.raises(ValueError, match="epoch"):
        tb.log_round(make_round(0).__class__(epoch=None), [], [])


def test_find_tensorboard_writer(tmp_path):
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    kw = {"enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}
    trainer = Trainer(default_root_dir=tmp_path, logger=[CSVLogger(tmp_path), TensorBoardLogger(tmp_path)], **kw)
    assert isinstance(find_tensorboard_writer(trainer), SummaryWriter)
    assert find_tensorboard_writer(Trainer(default_root_dir=tmp_path, logger=CSVLogger(tmp_path), **kw)) is None
    assert find_tensorboard_writer(Trainer(default_root_dir=tmp_path, logger=False, **kw)) is None


def test_unit_text_names_the_classes_its_ablation_hurts():
    from lightning_neurons.logging.tensorboard import NeuronTensorBoardLogger
    from lightning_neurons.results import UnitExplanation

    unit = UnitExplanation("fc", 0, 1, "whiskers", 0.8, ablation=[("cat", 0.12), ("dog", 0.031)])
    text = NeuronTensorBoardLogger.unit_text(unit)
    assert "zeroing it hurts: cat (-0.120), dog (-0.031)" in text
    assert "hurts" not in NeuronTensorBoardLogger.unit_text(UnitExplanation("fc", 0, 1, "whiskers", 0.8))


def test_top_k_images_hold_the_pixels_of_the_preview_grids_and_files(tmp_path):
    """The logged grid is the preview file's image, pixel for pixel (both encoded once, the same way)."""
    rnd = make_real_round(1)
    with SummaryWriter(tmp_path) as writer:
        tb = NeuronTensorBoardLogger(writer)
        tb.log_round(rnd, [], [], epoch=1)
        tb.save_previews(rnd, tmp_path / PREVIEWS_DIRNAME)
    acc = load_events(tmp_path)
    assert rnd.previews
    for (layer, unit), previews in rnd.previews.items():
        (event,) = acc.Images(f"neurons/{layer}/{unit}/top_k")
        logged = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
        grid = preview_grid(previews).permute(1, 2, 0).numpy()
        assert (event.step, event.height, event.width) == (1, *grid.shape[:2])
        assert grid.std() > 10  # real photo crops, not a flat colour
        np.testing.assert_array_equal(logged, grid)
        saved = np.asarray(Image.open(preview_path(tmp_path / PREVIEWS_DIRNAME, layer, unit, 1)).convert("RGB"))
        np.testing.assert_array_equal(saved, grid)


def test_writers_other_than_pytorchs_get_the_grid_through_add_image():
    """tensorboardX's writer has protobuf classes of its own: it is handed the uint8 grid, as before."""
    class OtherWriter:  # the one call this path makes of tensorboardX's SummaryWriter
        def __init__(self):
            self.images = []

        def add_image(self, tag, grid, step, dataformats):
            self.images.append((tag, grid, step, dataformats))

        def add_text(self, *args, **kwargs):
            pass

        def add_scalar(self, *args, **kwargs):
            pass

        def add_histogram(self, *args, **kwargs):
            pass

        def add_custom_scalars(self, *args, **kwargs):
            pass

        def flush(self):
            pass

    rnd = make_real_round(0)
    writer = OtherWriter()
    NeuronTensorBoardLogger(writer).log_round(rnd, [], [], epoch=0)
    assert len(writer.images) == len(rnd.previews)
    tag, grid, step, dataformats = writer.images[0]
    assert grid.dtype == torch.uint8 and grid.shape[0] == 3 and step == 0 and dataformats == "CHW"
