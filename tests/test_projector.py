"""TensorBoard Projector map of all units: files written, and served by TensorBoard's own projector plugin."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
from google.protobuf import text_format
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.data_provider import MultiplexerDataProvider
from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
from tensorboard.plugins import projector
from tensorboard.plugins.base_plugin import TBContext
from tensorboard.plugins.projector.projector_plugin import ProjectorPlugin
from werkzeug.test import Client

from _explained import LAYER, ColourEncoder, explained_outputs
from lightning_neurons.logging.projector import METADATA_COLUMNS, PROJECTOR_FILENAME, ProjectorWriter
from lightning_neurons.logging.writers import round_writers


@pytest.fixture(scope="module")
def outputs():
    return explained_outputs(epochs=2)


@pytest.fixture(scope="module")
def projector_run(outputs, tmp_path_factory):
    """Two rounds through round_writers(projector=True) on a real TensorBoardLogger."""
    logger = TensorBoardLogger(tmp_path_factory.mktemp("tb"), name="run")
    writers = round_writers([logger], projector=True, embed=ColourEncoder().encode_texts)
    for out in outputs:
        for writer in writers:
            writer.write_round(out)
    for writer in writers:
        writer.close()
    return logger.log_dir


def _config(log_dir) -> projector.ProjectorConfig:
    config = projector.ProjectorConfig()
    text_format.Parse((log_dir / PROJECTOR_FILENAME).read_text(), config)
    return config


def test_projector_files(projector_run):
    from pathlib import Path

    log_dir = Path(projector_run)
    config = _config(log_dir)
    assert [e.tensor_name for e in config.embeddings] == [f"neurons/{LAYER}:00000", f"neurons/{LAYER}:00001"]
    second = config.embeddings[1]
    tensors = np.loadtxt(log_dir / second.tensor_path, delimiter="\t", ndmin=2)
    assert tensors.shape == (4, 4) and list(second.tensor_shape) == [4, 4]
    # Text embeddings of the descriptions: unit 0 became "green" at epoch 1, unit 3 (dead) is described as "red".
    assert np.argmax(tensors[0]) == 1 and np.argmax(tensors[2]) == 2
    rows = (log_dir / second.metadata_path).read_text().splitlines()
    assert rows[0].split("\t") == list(METADATA_COLUMNS)
    cells = [dict(zip(METADATA_COLUMNS, r.split("\t"))) for r in rows[1:]]
    assert [cells[0][k] for k in ("unit", "description", "changed", "gained", "lost", "previous")] == [
        "0",
        "green",
        "True",
        "False",
        "False",
        "red",
    ]
    assert cells[2]["changed"] == "False"
    sprite = Image.open(log_dir / second.sprite.image_path)
    assert sprite.size == (64, 64) and list(second.sprite.single_image_dim) == [32, 32]  # 2x2 tiles of 32 px
    # Unit 1's tile (top right) shows its red crop.
    tile = np.asarray(sprite.convert("RGB"))[:32, 32:].reshape(-1, 3).mean(axis=0)
    assert tile[0] > tile[1] and tile[0] > tile[2]


def test_projector_plugin_serves_the_map(projector_run):
    log_dir = projector_run
    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(log_dir)
    mux.Reload()
    plugin = ProjectorPlugin(TBContext(logdir=log_dir, data_provider=MultiplexerDataProvider(mux, log_dir)))
    apps = plugin.get_plugin_apps()

    def get(route, **args):
        response = Client(apps[route]).get(route, query_string=args)
        assert response.status_code == 200, response.get_data(as_text=True)
        return response.get_data()

    deadline = time.monotonic() + 10
    while not plugin.is_active() and time.monotonic() < deadline:  # decided in a background thread
        time.sleep(0.05)
    assert plugin.is_active()
    runs = json.loads(get("/runs"))
    assert "." in runs
    info = json.loads(get("/info", run="."))
    name = f"neurons/{LAYER}:00001"
    assert name in [e["tensorName"] for e in info["embeddings"]]
    tensor = np.frombuffer(get("/tensor", run=".", name=name), dtype=np.float32)
    assert tensor.size == 16
    metadata = get("/metadata", run=".", name=name).decode().splitlines()
    assert metadata[0].split("\t") == list(METADATA_COLUMNS) and len(metadata) == 5
    sprite = Image.open(io.BytesIO(get("/sprite_image", run=".", name=name)))
    assert sprite.size == (64, 64)


def test_projector_cap_concept_vectors_and_foreign_entries(outputs, tmp_path):
    # A user's own embedding in the same folder survives; the same round written twice keeps one entry.
    foreign = projector.ProjectorConfig()
    foreign.embeddings.add(tensor_name="mine:0", tensor_path="mine.tsv")
    (tmp_path / PROJECTOR_FILENAME).write_text(text_format.MessageToString(foreign))
    writer = ProjectorWriter(tmp_path, max_units=2)  # no embedder: concept-score vectors
    writer.write_round(outputs[1])
    writer.write_round(outputs[1])
    config = _config(tmp_path)
    assert [e.tensor_name for e in config.embeddings] == ["mine:0", f"neurons/{LAYER}:00001"]
    entry = config.embeddings[1]
    tensors = np.loadtxt(tmp_path / entry.tensor_path, delimiter="\t", ndmin=2)
    assert tensors.shape[0] == 2  # capped at the first two units
    assert Image.open(tmp_path / entry.sprite.image_path).size == (64, 64)
    with pytest.raises(ValueError, match="max_units"):
        ProjectorWriter(tmp_path, max_units=0)
