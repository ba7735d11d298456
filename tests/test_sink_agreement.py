"""Every sink shows the same row (issue 21 item 5): one real fit with TensorBoard, CSV, W&B (offline) and MLflow (local
store) loggers, then every sink read back finds the same shown text, kind and score for the same units.

Filed: W&B tables, MLflow's ``table_epoch_N.csv``, the CSV logger and the ``explain`` printout showed the raw best
concept ("bottle neck") where TensorBoard and the report showed "no clear concept", and no sink but TensorBoard had
a unit's significance.
"""

from __future__ import annotations

import csv
import glob
import html
import json
import math
import re
from pathlib import Path

import pytest
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from _stores import offline_store_env, offline_wandb_logger
from _tiny import Tiny
from lightning_neurons import load_history
from lightning_neurons.logging.printout import history_lines
from lightning_neurons.logging.rows import record_row
from lightning_neurons.logging.tensorboard import escape_markdown
from lightning_neurons.results import ExplanationRound
from test_lightning_contract import explainer, loaders, trainer

LAYERS = ["features.2", "head"]
LAST = 1  # the last explained epoch (max_epochs=2)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One real fit, every logger family at once; returns the folders and loggers to read back."""
    root = tmp_path_factory.mktemp("sinks")
    with pytest.MonkeyPatch.context() as mp:
        offline_store_env(mp, root)
        loggers = [
            TensorBoardLogger(root, name="tb"),
            CSVLogger(root, name="csv"),
            offline_wandb_logger(root),
            MLFlowLogger(experiment_name="neurons", tracking_uri=f"file:{root / 'mlruns'}"),
        ]
        fit = trainer(root, [explainer(layers=LAYERS, log_units=None)], logger=loggers, limit_train_batches=1)
        fit.fit(Tiny(), *loaders())
        wandb_dir = Path(loggers[2].experiment.dir)
        loggers[2].experiment.finish()
        yield {
            "root": root,
            "neurons": Path(loggers[0].log_dir) / "neurons",
            "wandb": wandb_dir,
            "mlflow": loggers[3],
            "metrics": dict(fit.callback_metrics),
        }


def _truth(fitted) -> dict[tuple[str, int], tuple[str, str | None, float]]:
    """Per unit of the last round: its shown text, kind and score, from the round file the session wrote."""
    rnd = ExplanationRound.from_json(fitted["neurons"] / f"round_epoch={LAST}.json")
    return {u.key: (u.shown, u.kind, u.score) for u in rnd.units}


def _score(value: object) -> float | None:
    # A missing score (a dead unit's NaN) is "–" in Markdown and HTML, "" in CSV, null in JSON.
    number = None if value in (None, "", "–") else float(value)  # type: ignore[arg-type]
    return None if number is None or math.isnan(number) else number


def _same(found: dict, truth: dict, digits: int) -> None:
    assert set(found) == set(truth)
    for key, (text, kind, score) in truth.items():
        got_text, got_kind, got_score = found[key]
        assert (got_text, got_kind or None) == (text, kind), key
        want = _score(score)
        assert _score(got_score) == (None if want is None else pytest.approx(want, abs=0.6 * 10**-digits)), key


def test_the_round_has_kinds_and_the_shown_text_differs_from_raw_concepts(fitted):
    rnd = ExplanationRound.from_json(fitted["neurons"] / f"round_epoch={LAST}.json")
    assert all(u.kind in ("concept", "low_level", "unclear", "dead") for u in rnd.units)
    # Some unit shows something other than its raw best concept: the case the sinks disagreed on.
    assert any(u.shown != u.description for u in rnd.units)
    # Gained and lost reach trainer.callback_metrics (EarlyStopping, ModelCheckpoint can watch them).
    for layer in LAYERS:
        for name in ("fraction_changed", "fraction_gained", "fraction_lost", "top_concept_share"):
            assert f"neurons/{layer}/{name}" in fitted["metrics"], name


def test_tensorboard_table(fitted):
    truth = _truth(fitted)
    acc = EventAccumulator(str(fitted["neurons"].parent), size_guidance={"tensors": 0, "scalars": 0}).Reload()
    for layer in LAYERS:
        # The concept distribution, per round: a collapse onto one word is visible.
        assert [e.step for e in acc.Scalars(f"neurons/{layer}/top_concept_share")] == [0, LAST]
        assert (
            "most frequent concept"
            in acc.Tensors(f"neurons/{layer}/concepts/text_summary")[-1].tensor_proto.string_val[0].decode()
        )
        events = {e.step: e for e in acc.Tensors(f"neurons/{layer}/table/text_summary")}
        table = events[LAST].tensor_proto.string_val[0].decode()
        found = {}
        for line in table.splitlines():
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            if line.startswith("| ") and cells[0].isdigit():
                kind = None if cells[2] == "–" else cells[2]
                found[(layer, int(cells[0]))] = (cells[1], kind, cells[3])
        expected = {k: (escape_markdown(t), kd, s) for k, (t, kd, s) in truth.items() if k[0] == layer}
        _same(found, expected, digits=3)


def test_csv_logger_tables(fitted):
    truth = _truth(fitted)
    found = {}
    for layer in LAYERS:
        for row in csv.DictReader((fitted["neurons"] / "tables" / f"{layer}_epoch_{LAST}.csv").open()):
            found[(layer, int(row["unit"]))] = (row["description"], row["kind"], row["score"])
        dist = list(csv.DictReader((fitted["neurons"] / "tables" / f"{layer}_concepts_epoch_{LAST}.csv").open()))
        assert sum(int(r["units"]) for r in dist) == sum(k[0] == layer for k in truth)
    _same(found, truth, digits=6)
    metrics = list(csv.DictReader(open(fitted["neurons"].parent.parent.parent / "csv" / "version_0" / "metrics.csv")))
    assert any(r.get(f"neurons/{LAYERS[0]}/top_concept_share") for r in metrics)


def test_wandb_tables(fitted):
    truth = _truth(fitted)
    found = {}
    for layer in LAYERS:
        for path in glob.glob(str(fitted["wandb"] / "media" / "table" / "neurons" / layer / "table_*.table.json")):
            table = json.loads(Path(path).read_text())
            for data in table["data"]:
                row = dict(zip(table["columns"], data))
                if row["epoch"] == LAST:
                    found[(layer, row["unit"])] = (row["description"], row["kind"], row["score"])
        assert glob.glob(str(fitted["wandb"] / "media" / "table" / "neurons" / layer / "concepts_*.table.json"))
    _same(found, truth, digits=6)


def test_mlflow_tables(fitted):
    from mlflow.tracking import MlflowClient

    truth = _truth(fitted)
    logger = fitted["mlflow"]
    client = MlflowClient(f"file:{fitted['root'] / 'mlruns'}")
    found = {}
    for layer in LAYERS:
        local = client.download_artifacts(
            logger.run_id, f"neurons/{layer}/table_epoch_{LAST}.csv", str(fitted["root"] / "dl")
        )
        for row in csv.DictReader(Path(local).open()):
            found[(layer, int(row["unit"]))] = (row["description"], row["kind"], row["score"])
        assert client.get_metric_history(logger.run_id, f"neurons/{layer}/top_concept_share")
    _same(found, truth, digits=6)


def test_history_and_its_printout(fitted):
    truth = _truth(fitted)
    history = load_history(fitted["neurons"])
    rows = {(r.drift.layer, r.drift.unit): record_row(r) for r in history.records if r.drift.epoch == LAST}
    _same({k: (r["description"], r["kind"], r["score"]) for k, r in rows.items()}, truth, digits=6)
    printed = "\n".join(history_lines(history))
    raw_only = {u.description for u in ExplanationRound.from_json(fitted["neurons"] / f"round_epoch={LAST}.json")}
    raw_only -= {text for text, _, _ in truth.values()}
    for text in raw_only:  # a raw best concept nobody is shown never appears in the printout either
        assert f"'{text}'" not in printed


def test_html_report(fitted):
    truth = _truth(fitted)
    page = (fitted["neurons"] / "report.html").read_text()
    found = {}
    for layer in LAYERS:
        section = page[page.index(f'<section id="layer-{html.escape(layer)}">') :]
        section = section[: section.index("</section>")] if "</section>" in section else section
        for unit, row in re.findall(r"<tr><td>(\d+)</td>(.*?)</tr>", section, flags=re.S):
            cell = re.search(
                rf'epoch {LAST}</div><div class="d">(.*?)</div>(?:<div class="s">([a-z_]+)</div>)?'
                r'<div class="s">score (\S+?)[ <]',
                row,
                flags=re.S,
            )
            assert cell is not None, (layer, unit)
            found[(layer, int(unit))] = (html.unescape(cell.group(1)), cell.group(2), cell.group(3))
    _same(found, truth, digits=2)
