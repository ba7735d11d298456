"""The history store: one Parquet file per round, atomic, on local disks and fsspec URLs; its queries and the
Neurons tab's routes; the HTML report written once at the end of fit, not after every round."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

import lightning_neurons.drift.round_store as round_store_module
from _rounds import bow_embed, make_round
from lightning_neurons.dashboard.queries import HistoryTables, layer_charts, layer_view, search, unit_timeline
from lightning_neurons.drift.history import (
    HISTORY_FILENAME,
    HistoryWriteError,
    RoundStore,
    RunHistory,
    load_history,
)
from lightning_neurons.results import ExplanationRound, RoundIdentity, UnitExplanation


def _rounds(history: RunHistory, epochs) -> None:
    for epoch in epochs:
        history.add_round(make_round(epoch), bow_embed)


@pytest.mark.parametrize("where", ["local", "memory"])
def test_store_round_trips_every_round_and_the_replay_rules(tmp_path, where):
    url = str(tmp_path / "run" / "history") if where == "local" else f"memory://{tmp_path.name}/history"
    history = RunHistory()
    history.attach(url)
    _rounds(history, range(4))
    with pytest.warns(UserWarning, match="discards the later history epochs"):
        history.add_round(make_round(2), bow_embed)  # a resumed run rewinds: epoch 3 goes
    history.add_round(make_round(1), bow_embed, keep_later=True)  # a revisit replaces epoch 1 only
    history.close()

    store = RoundStore(url)
    assert [(f.epoch, f.revisit) for f in store.files()] == [(0, False), (1, False), (2, False), (3, False),
                                                              (2, False), (1, True)]  # fmt: skip
    loaded = load_history(url)
    assert loaded.epochs == [0, 1, 2]
    assert loaded.state_dict() == history.state_dict()
    restored = RunHistory()
    restored.load_state_dict(history.checkpoint_state())  # a checkpoint names the store and its round ids
    assert restored.state_dict() == history.state_dict()


def test_round_identity_meta_and_contract_fields_are_stored(tmp_path):
    identity = RoundIdentity("run-1", "w0", 0, 10, "s1", {"top_k": 4})
    unit = UnitExplanation(
        "fc", 0, 0, "stripes", 0.4, kind="low_level", p_value=0.01, q_value=0.03, low_level="brightness",
        concept_gain=0.002, auc=0.71, confidence=0.6,
    )  # fmt: skip
    history = RunHistory()
    history.attach(tmp_path / "history")
    history.add_round(ExplanationRound(0, [unit], meta={"backend": "toy"}, identity=identity), bow_embed)
    history.close()

    store = RoundStore(tmp_path / "history")
    (f,) = store.files()
    assert store.identity(f) == identity.to_dict() and store.meta(f) == {"backend": "toy"}
    row = load_history(tmp_path).to_pandas().iloc[0]
    assert (row["kind"], row["shown"], row["low_level"]) == ("low_level", "low-level: brightness", "brightness")
    assert (row["p_value"], row["q_value"], row["concept_gain"], row["auc"]) == (0.01, 0.03, 0.002, 0.71)
    record = load_history(tmp_path).get("fc", 0, 0)
    assert record.explanation.kind == "low_level" and record.explanation.shown == "low-level: brightness"


def test_a_failed_write_leaves_nothing_visible_and_memory_unchanged(tmp_path, monkeypatch):
    history = RunHistory()
    history.attach(tmp_path / "history")
    _rounds(history, [0])
    state = history.state_dict()

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(round_store_module.os, "replace", full_disk)
    with pytest.raises(HistoryWriteError, match="No space left on device"):
        history.add_round(make_round(1), bow_embed)
    monkeypatch.undo()
    assert history.state_dict() == state
    assert [p.name.startswith("round-") for p in (tmp_path / "history").iterdir()] == [True]  # temp file removed
    assert load_history(tmp_path).epochs == [0]
    history.add_round(make_round(1), bow_embed)  # space again: the run goes on
    history.close()
    assert load_history(tmp_path).epochs == [0, 1]


def test_a_reader_never_sees_half_a_round(tmp_path):
    history = RunHistory()
    history.attach(tmp_path / "history")
    _rounds(history, [0])
    # A writer that died half-way through a round leaves only a hidden temporary file behind.
    (tmp_path / "history" / ".tmp-0123456789abcdef.parquet").write_bytes(b"PAR1 half a round")
    reader = RunHistory.from_state_dict(load_history(tmp_path).state_dict())
    assert reader.epochs == [0]
    _rounds(history, [1])  # the run goes on; the reader sees the new round whole on its next listing
    assert load_history(tmp_path).epochs == [0, 1]
    history.close()


def test_without_working_locks_two_writers_never_overwrite_each_other(tmp_path, monkeypatch):
    from filelock import FileLock

    def no_locks(self, *args, **kwargs):
        raise OSError(38, "Function not implemented")  # e.g. an NFS mount without lockd

    monkeypatch.setattr(FileLock, "acquire", no_locks)
    a, b = RunHistory(), RunHistory()
    for history in (a, b):
        with pytest.warns(UserWarning, match="concurrent writers will not be detected"):
            history.attach(tmp_path / "history")
    a.add_round(make_round(0), bow_embed)
    b.add_round(make_round(0), bow_embed)
    files = RoundStore(tmp_path / "history").files()
    assert len(files) == 2 and files[0].rid != files[1].rid  # both rounds kept; the later one is the epoch's


def test_load_history_reads_earlier_json_lines_histories(tmp_path):
    old = RunHistory()
    old.attach(tmp_path / "old" / HISTORY_FILENAME)
    _rounds(old, range(3))
    old.close()
    assert load_history(tmp_path / "old").state_dict() == old.state_dict()
    tables = HistoryTables.open(tmp_path / "old")  # the dashboard's views work on them too
    assert [e["shown"] for e in unit_timeline(tables, "features.3", 0)["epochs"]] == [
        "red dots",
        "red dots",
        "vertical stripes",
    ]


def test_exports_on_request(tmp_path):
    history = RunHistory()
    history.attach(tmp_path / "history")
    _rounds(history, range(2))
    loaded = load_history(tmp_path)
    lines = loaded.to_jsonl(tmp_path / "export.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [0] * 5 + [1] * 5
    assert loaded.to_csv(tmp_path / "export.csv").read_text().startswith("layer,unit,epoch,")
    assert load_history(tmp_path / "export.jsonl").state_dict() == history.state_dict()


def test_queries_views(tmp_path):
    history = RunHistory()
    history.attach(tmp_path / "history")
    _rounds(history, range(3))
    tables = HistoryTables(store=RoundStore(tmp_path / "history"))
    view = layer_view(tables, "features.3", sort="drift")
    assert view["epoch"] == 2 and view["total"] == 3
    assert [u["unit"] for u in view["units"]][0] == 0 and view["units"][0]["state"] == "changed"
    assert view["counts"]["changed"] == 1 and view["counts"]["stable"] == 2
    assert [u["unit"] for u in layer_view(tables, "features.3", state="stable")["units"]] == [1, 2]
    assert layer_view(tables, "features.3", epoch=0)["counts"]["new"] == 3
    found = search(tables, "STRIPES")
    assert found["matched"] == 1 and found["units"][0]["layer"] == "features.3"
    charts = layer_charts(tables, "features.3")
    assert charts["epochs"] == [0, 1, 2] and charts["fraction"]["changed"] == [None, 0.0, pytest.approx(1 / 3)]
    assert charts["concepts"]["vertical stripes"] == [0, 0, 1]


def test_plugin_routes_serve_only_the_runs_files(tmp_path):
    from tensorboard.plugins import base_plugin
    from werkzeug.test import Client

    from lightning_neurons.dashboard.plugin import NeuronsPlugin, find_runs
    from lightning_neurons.logging.previews import save_previews

    out = tmp_path / "logs" / "version_0" / "neurons"
    history = RunHistory()
    history.attach(out / "history")
    for epoch in range(2):
        rnd = make_round(epoch)
        rnd.units[0].description = '<img src=x onerror="alert(1)">'  # text, never markup
        history.add_round(rnd, bow_embed)
        save_previews(rnd, out / "previews", epoch=epoch)
    (tmp_path / "logs" / "version_0" / "secret.png").write_bytes(b"\x89PNG not yours")
    assert list(find_runs(tmp_path / "logs")) == ["version_0/neurons"]
    plugin = NeuronsPlugin(base_plugin.TBContext(logdir=str(tmp_path / "logs")))
    assert plugin.is_active()
    apps = plugin.get_plugin_apps()

    def get(route, **query):
        response = Client(apps[route]).get(route, query_string=query)
        return response.status_code, response

    code, r = get("/layer", run="version_0/neurons", layer="features.3")
    view = json.loads(r.data)
    assert code == 200 and view["units"][0]["shown"] == '<img src=x onerror="alert(1)">'  # JSON; the page sets text
    code, r = get("/crop", run="version_0/neurons", path=view["units"][0]["crop"])
    assert code == 200 and r.mimetype == "image/png"
    for path in ["../secret.png", "previews/../../secret.png", str(out.parent / "secret.png"), "history"]:
        assert get("/crop", run="version_0/neurons", path=path)[0] == 404
    assert get("/layer", run="../version_0", layer="features.3")[0] == 404
    assert get("/unit", run="version_0/neurons", layer="features.3", unit="x")[0] == 400
    js = get("/index.js")[1].data.decode()
    assert "export function render" in js and ".innerHTML" not in js and "insertAdjacentHTML" not in js


def test_the_report_is_written_once_at_the_end_of_fit(tmp_path):
    import lightning.pytorch as pl

    from test_lightning_contract import Tiny, explainer, loaders, trainer

    seen: list[bool] = []

    class Watch(pl.Callback):
        def on_validation_end(self, trainer, pl_module):
            seen.append(any(Path(trainer.log_dir).rglob("report.html")))

    cb = explainer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = trainer(tmp_path, [cb, Watch()], max_epochs=2)
        t.fit(Tiny(), *loaders())
    assert seen == [False, False]  # no report after round 0 (before: rewritten after every round)
    report = Path(t.log_dir) / "neurons" / "report.html"
    assert report.is_file() and "concept distribution" in report.read_text()
    assert load_history(Path(t.log_dir) / "neurons").epochs == [0, 1]
