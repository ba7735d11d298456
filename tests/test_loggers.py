"""Every Lightning logger family gets the round: real TensorBoard, CSV, W&B (offline) and MLflow (local store) runs,
read back from what they wrote."""

from __future__ import annotations

import csv
import glob
import json
import struct
from pathlib import Path

import pytest
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from _explained import LAYER, explained_outputs
from _stores import offline_store_env, offline_wandb_logger
from lightning_neurons.logging.generic import LoggerRoundWriter
from lightning_neurons.logging.metrics import round_metrics
from lightning_neurons.logging.mlflow import MLflowRoundWriter
from lightning_neurons.logging.rows import ROW_COLUMNS
from lightning_neurons.logging.tensorboard import NeuronTensorBoardLogger
from lightning_neurons.logging.wandb import TABLE_COLUMNS, WandbRoundWriter
from lightning_neurons.logging.writers import MLFLOW_RUNS_DIRNAME, round_writers, run_output_dir

M = f"neurons/{LAYER}"


@pytest.fixture(scope="module", autouse=True)
def offline_stores(tmp_path_factory):
    """MLflow file stores allowed, W&B's data/cache/config folders in a temporary folder (restored afterwards)."""
    root = tmp_path_factory.mktemp("stores")
    with pytest.MonkeyPatch.context() as mp:
        offline_store_env(mp, root)
        yield


@pytest.fixture(scope="module")
def outputs():
    return explained_outputs(epochs=2)


# ---- metrics ---------------------------------------------------------------------------------------------------


def test_round_metrics_names_and_values(outputs):
    first, second = (round_metrics(o) for o in outputs)
    # First round: nothing compared yet, so a min-mode monitor sees "nothing settled" (1.0), never a fake 0.
    assert first[f"{M}/fraction_changed"] == 1.0
    assert f"{M}/mean_similarity" not in first
    assert f"{M}/fraction_changed" not in round_metrics(outputs[0], first_round_changed=None)
    # Second round: units 0 and 1 swapped meaning, units 2 (blue) and 3 (dead) kept theirs.
    assert second[f"{M}/fraction_changed"] == pytest.approx(0.5)
    assert second[f"{M}/mean_similarity"] == pytest.approx(0.5)
    assert second[f"{M}/stable_units"] == 0.0  # stable needs DEFAULT_STABLE_ROUNDS (3) unchanged comparisons
    assert first[f"{M}/dead_units"] == second[f"{M}/dead_units"] == 1.0
    scored = [u.score for u in outputs[1].round.units if u.kind != "dead"]  # the dead unit has no score (NaN)
    assert second[f"{M}/mean_score"] == pytest.approx(sum(scored) / len(scored))
    assert all(isinstance(v, float) for v in second.values())


def test_round_metrics_evaluation_and_prefix(outputs):
    import dataclasses

    out = dataclasses.replace(
        outputs[1], prefix="probe", evaluation={"colour": {"simulation": 0.3, "layers": {LAYER: {"simulation": 0.3}}}}
    )
    metrics = round_metrics(out)
    assert metrics["evaluation/colour/simulation"] == 0.3
    assert metrics[f"evaluation/colour/layers/{LAYER}/simulation"] == 0.3
    assert f"probe/{LAYER}/fraction_changed" in metrics and f"{M}/fraction_changed" not in metrics


# ---- dispatch and run folders ---------------------------------------------------------------------------------


def test_round_writers_one_per_logger(tmp_path):
    loggers = [
        TensorBoardLogger(tmp_path, name="tb"),
        WandbLogger(save_dir=str(tmp_path), offline=True),
        MLFlowLogger(tracking_uri=f"file:{tmp_path / 'mlruns'}"),
        CSVLogger(tmp_path, name="csv"),
    ]
    writers = round_writers(loggers, log_units=2, projector=True)
    kinds = [type(w).__name__ for w in writers]
    assert kinds == [
        "NeuronTensorBoardLogger",
        "ProjectorWriter",
        "WandbRoundWriter",
        "MLflowRoundWriter",
        "LoggerRoundWriter",
    ]
    assert all(hasattr(w, "write_round") and hasattr(w, "close") for w in writers)
    # Building writers opens no W&B or MLflow run (they open on the first round).
    assert loggers[1]._experiment is None and loggers[2]._run_id is None


def test_run_output_dir_is_per_run_for_tensorboard_and_csv(tmp_path):
    first = TensorBoardLogger(tmp_path, name="exp")
    Path(first.log_dir).mkdir(parents=True)
    second = TensorBoardLogger(tmp_path, name="exp")
    assert run_output_dir([first], tmp_path) == tmp_path / "exp" / "version_0"
    assert run_output_dir([second], tmp_path) == tmp_path / "exp" / "version_1"
    assert run_output_dir([CSVLogger(tmp_path, name="c")], tmp_path) == tmp_path / "c" / "version_0"
    assert run_output_dir([], tmp_path) == tmp_path


# ---- TensorBoard ------------------------------------------------------------------------------------------------


def test_tensorboard_write_round_scalars_and_evaluation(outputs, tmp_path):
    import dataclasses

    logger = TensorBoardLogger(tmp_path, name="tb")
    (writer,) = round_writers([logger], log_units=None)
    assert isinstance(writer, NeuronTensorBoardLogger)
    evaluated = dataclasses.replace(
        outputs[1], evaluation={"colour": {"simulation": 0.4}, "random": {"simulation": 0.0}}
    )
    for out in (outputs[0], evaluated):
        writer.write_round(out)
    writer.close()
    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "tensors": 0, "images": 0}).Reload()
    scalars = lambda tag: {e.step: e.value for e in acc.Scalars(tag)}  # noqa: E731
    assert scalars(f"{M}/dead_units") == {0: 1.0, 1: 1.0}
    assert scalars(f"{M}/stable_units") == {0: 0.0, 1: 0.0}
    assert scalars(f"{M}/fraction_changed") == {1: pytest.approx(0.5)}
    assert scalars("evaluation/colour/simulation") == {1: pytest.approx(0.4)}
    assert scalars("evaluation/random/simulation") == {1: 0.0}
    assert f"{M}/3/top_k" in acc.Tags()["images"]


# ---- CSV / any other logger -------------------------------------------------------------------------------------


def test_csv_logger_gets_scalars_at_the_global_step_and_table_files(outputs, tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    folder = run_output_dir([logger], tmp_path) / "neurons"
    (writer,) = round_writers([logger], log_units=[0])
    assert isinstance(writer, LoggerRoundWriter)
    import dataclasses

    for out in outputs:
        writer.write_round(dataclasses.replace(out, output_dir=folder))
    writer.close()
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [10, 20]  # the trainer's global step, as every CSVLogger row
    assert [float(r["epoch"]) for r in rows] == [0.0, 1.0]
    assert rows[0][f"{M}/fraction_changed"] == "" and float(rows[1][f"{M}/fraction_changed"]) == pytest.approx(0.5)
    assert float(rows[1][f"{M}/0/drift"]) == pytest.approx(1.0)
    table = list(csv.DictReader(open(folder / "tables" / f"{LAYER}_epoch_1.csv")))
    assert list(table[0]) == list(ROW_COLUMNS)
    assert [(r["unit"], r["description"], r["previous_description"], r["changed"]) for r in table[:3]] == [
        ("0", "green", "red", "True"),
        ("1", "red", "green", "True"),
        ("2", "blue", "blue", "False"),
    ]


# ---- Weights & Biases (offline) ---------------------------------------------------------------------------------


def _wandb_records(path: str):
    """Records of a ``.wandb`` transaction log (LevelDB log blocks of protobuf ``Record``s)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):
            break  # the writer is still on this record
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            pos += block - pos % block if pos % block else 0
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def _finished_wandb_records(path: str, timeout: float = 30.0) -> list:
    """The records once the run's ``exit`` record is on disk (W&B's service may still be writing after finish)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        records = list(_wandb_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


@pytest.fixture(scope="module")
def wandb_run(outputs, tmp_path_factory):
    root = tmp_path_factory.mktemp("wandb")
    logger = offline_wandb_logger(root)
    run_dir = run_output_dir([logger], root)
    (writer,) = round_writers([logger], log_units=[0, 3])
    assert isinstance(writer, WandbRoundWriter)
    for out in outputs:
        writer.write_round(out)
    writer.close()
    logger.experiment.finish()
    return run_dir, logger


def test_wandb_run_dir_is_the_runs_own_folder(wandb_run, tmp_path_factory):
    run_dir, logger = wandb_run
    assert run_dir.name == "files" and logger.version in run_dir.parent.name  # <save_dir>/wandb/offline-run-*-<id>


def test_wandb_offline_files_hold_tables_images_and_scalars(wandb_run):
    run_dir, _ = wandb_run
    tables = sorted(glob.glob(str(run_dir / "media" / "table" / "neurons" / LAYER / "table_*.table.json")))
    assert len(tables) == 2
    last = json.loads(next(Path(t) for t in tables if Path(t).name.startswith("table_1_")).read_text())
    assert last["columns"] == list(TABLE_COLUMNS)
    rows = {r[1]: dict(zip(last["columns"], r)) for r in last["data"]}
    assert {u: rows[u]["description"] for u in range(3)} == {0: "green", 1: "red", 2: "blue"}
    assert rows[0]["changed"] is True and rows[0]["previous_description"] == "red" and rows[2]["changed"] is False
    assert all(rows[u]["top_crop"] is not None for u in range(4))  # every unit has its top crop in the table
    # Crop grids of the log_units selection, as PNG files.
    grids = glob.glob(str(run_dir / "media" / "images" / "neurons" / LAYER / "*" / "top_k_*.png"))
    assert {Path(g).parent.name for g in grids} == {"0", "3"} and len(grids) == 4
    assert Image.open(grids[0]).mode == "RGB"

    records = _finished_wandb_records(glob.glob(str(run_dir.parent / "run-*.wandb"))[0])
    history = [
        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    assert [h["epoch"] for h in history] == [0, 1]
    assert [h["trainer/global_step"] for h in history] == [10, 20]  # the trainer's step axis, not the epoch
    assert f"{M}/fraction_changed" not in history[0] and history[1][f"{M}/fraction_changed"] == pytest.approx(0.5)
    assert history[1][f"{M}/dead_units"] == 1.0 and history[1][f"{M}/0/drift"] == pytest.approx(1.0)
    # The table's images travel in the run's table artifact (one image per unit and round).
    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    table_images = [
        c.path for a in artifacts if a.type == "run_table" for c in a.manifest.contents if c.path.endswith(".png")
    ]
    assert len(table_images) >= 4


# ---- MLflow (local file store) ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_run(outputs, tmp_path_factory):
    import dataclasses

    root = tmp_path_factory.mktemp("mlflow")
    logger = MLFlowLogger(experiment_name="neurons", tracking_uri=f"file:{root / 'mlruns'}")
    run_dir = run_output_dir([logger], root)
    folder = run_dir / "neurons"
    folder.mkdir(parents=True)
    (folder / "report.html").write_text("<html>report</html>")
    (writer,) = round_writers([logger], log_units=[0])
    assert isinstance(writer, MLflowRoundWriter)
    for out in outputs:
        writer.write_round(dataclasses.replace(out, output_dir=folder))
    writer.close()
    logger.finalize("success")
    return root, run_dir, logger


def test_mlflow_run_dir_is_named_by_run_id(mlflow_run):
    root, run_dir, logger = mlflow_run
    assert run_dir == root / MLFLOW_RUNS_DIRNAME / logger.run_id
    second = MLFlowLogger(experiment_name="neurons", tracking_uri=f"file:{root / 'mlruns'}")
    assert run_output_dir([second], root) != run_dir


def test_mlflow_metrics_artifacts_and_images(mlflow_run):
    from mlflow.tracking import MlflowClient

    root, _, logger = mlflow_run
    client = MlflowClient(f"file:{root / 'mlruns'}")
    run_id = logger.run_id
    history = client.get_metric_history(run_id, f"{M}/fraction_changed")
    assert [(m.step, round(m.value, 3)) for m in history] == [(1, 0.5)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, f"{M}/dead_units")] == [(0, 1.0), (1, 1.0)]
    assert [m.step for m in client.get_metric_history(run_id, f"{M}/0/score")] == [0, 1]
    artifacts = {a.path for a in client.list_artifacts(run_id, f"neurons/{LAYER}")}
    assert {f"neurons/{LAYER}/table_epoch_0.csv", f"neurons/{LAYER}/table_epoch_1.json"} <= artifacts
    local = Path(client.download_artifacts(run_id, f"neurons/{LAYER}/table_epoch_1.json", str(root / "dl")))
    table = json.loads(local.read_text())
    assert table["columns"] == list(ROW_COLUMNS)
    assert [row[2] for row in table["data"][:3]] == ["green", "red", "blue"]
    assert "neurons/report.html" in {a.path for a in client.list_artifacts(run_id, "neurons")}
    images = [a.path for a in client.list_artifacts(run_id, "images")]
    full = [p for p in images if p.endswith(".png")]
    assert len(full) == 2 and all(f"neurons~{LAYER}~0~top_k+step+" in p for p in full)
    assert client.get_run(run_id).data.tags.get("mlflow.loggedImages") == "True"
