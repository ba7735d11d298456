from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from _rounds import CountingEmbed, bow_embed, make_round
from lightning_neurons.drift.history import HISTORY_FILENAME, RunHistory, load_history
from lightning_neurons.drift.metrics import (
    UnitDrift,
    compare_units,
    description_similarity,
    first_stable_epoch,
    is_stable,
    jaccard,
    summarize_layer,
)
from lightning_neurons.results import ExplanationRound, UnitExplanation


def _unit(epoch: int, text: str, ids=(1, 2), unit: int = 0, score: float = 0.7) -> UnitExplanation:
    return UnitExplanation("fc", unit, epoch=epoch, description=text, score=score, top_sample_ids=list(ids))


def test_similarity_identity_and_batching():
    embed = CountingEmbed()
    sims = description_similarity(["dots", "Grass", "red dots"], ["dots", "grass ", "stripes"], embed)
    assert sims[:2] == [1.0, 1.0]
    assert sims[2] == pytest.approx(0.0, abs=1e-6)
    assert len(embed.calls) == 1 and sorted(embed.calls[0]) == ["red dots", "stripes"]
    assert description_similarity(["a"], ["a"], lambda t: pytest.fail("must not embed")) == [1.0]
    with pytest.raises(ValueError, match="shape"):
        description_similarity(["a"], ["b"], lambda t: torch.ones(3))


def test_compare_units_fields():
    prev = {("fc", 0): _unit(1, "red dots", ids=(1, 2, 3), score=0.6)}
    new = [_unit(2, "red dots", ids=(2, 3, 4), score=0.8), _unit(2, "grass", unit=1)]
    d0, d1 = compare_units(prev, new, bow_embed, threshold=0.75)
    assert (d0.previous_epoch, d0.similarity, d0.changed) == (1, 1.0, False)
    assert d0.jaccard == pytest.approx(0.5) and d0.score_delta == pytest.approx(0.2)
    assert d0.drift == pytest.approx(0.0)
    assert not d1.compared and d1.similarity is None and d1.changed is False and d1.drift is None
    (d,) = compare_units({("fc", 0): _unit(1, "red dots")}, [_unit(2, "dots")], bow_embed, threshold=0.75)
    assert d.similarity == pytest.approx(math.sqrt(0.5), abs=1e-5) and d.changed
    (d,) = compare_units({("fc", 0): _unit(1, "red dots")}, [_unit(2, "dots")], bow_embed, threshold=0.7)
    assert not d.changed
    assert UnitDrift.from_dict(d.to_dict()) == d


def test_jaccard_and_stability():
    assert jaccard([], []) == 1.0 and jaccard([1], [2]) == 0.0
    t = [UnitDrift("fc", 0, e, "x", 0.5, previous_epoch=None if e == 0 else e - 1, changed=(e == 2)) for e in range(6)]
    assert first_stable_epoch(t) == 2 and first_stable_epoch(t[:2]) == 0 and first_stable_epoch([]) is None
    assert is_stable(t, 3) and not is_stable(t[:5], 3) and is_stable(t[:2], 1) and not is_stable(t[:2], 2)
    s = summarize_layer("fc", 3, {0: t}, stable_rounds=2)
    assert (s.n_units, s.n_compared, s.n_changed, s.n_stable, s.first_stable_epoch) == (1, 1, 0, 0, {0: 2})
    assert summarize_layer("fc", 5, {0: t}, stable_rounds=2).n_stable == 1


def _run(history: RunHistory, epochs) -> dict[int, list[UnitDrift]]:
    return {e: history.add_round(make_round(e), bow_embed) for e in epochs}


def test_unit0_changes_at_epoch_2_only(tmp_path):
    history = RunHistory(path=tmp_path / HISTORY_FILENAME)
    drift = _run(history, range(5))
    changed = {(d.layer, d.unit, e) for e, ds in drift.items() for d in ds if d.changed}
    assert changed == {("features.3", 0, 2)}
    d = history.get("features.3", 0, 2).drift
    assert (d.previous_description, d.description, d.previous_epoch) == ("red dots", "vertical stripes", 1)
    assert history.get("features.3", 2, 1).drift.similarity == 1.0  # "sky" -> "Sky ": same text

    summaries = {(s.layer, s.epoch): s for s in history.summary()}
    assert len(summaries) == 10
    assert summaries[("features.3", 2)].fraction_changed == pytest.approx(1 / 3)
    assert all(s.fraction_changed == 0 for k, s in summaries.items() if k != ("features.3", 2))
    last = summaries[("features.3", 4)]
    assert last.first_stable_epoch == {0: 2, 1: 0, 2: 0}
    assert last.n_stable == 2  # unit 0's last 3 comparisons include its change at epoch 2
    assert summaries[("head.fc", 4)].n_stable == 2 and summaries[("head.fc", 2)].n_stable == 0
    assert summaries[("head.fc", 0)].mean_similarity is None

    # The JSON Lines file: one record per unit-epoch, changed only at (features.3, 0, 2).
    lines = [json.loads(x) for x in (tmp_path / HISTORY_FILENAME).read_text().splitlines()]
    assert len(lines) == 25
    assert {(r["layer"], r["unit"], r["epoch"]) for r in lines if r["changed"]} == {("features.3", 0, 2)}
    assert set(lines[0]) >= {
        "schema",
        "layer",
        "unit",
        "epoch",
        "description",
        "score",
        "alternatives",
        "top_sample_ids",
        "previous_epoch",
        "previous_description",
        "similarity",
        "changed",
        "jaccard",
        "score_delta",
        "threshold",
    }
    loaded = load_history(tmp_path)
    assert [r.to_dict() for r in loaded.records] == [r.to_dict() for r in history.records]


def test_add_round_idempotent_and_rewind(tmp_path):
    history = RunHistory(path=tmp_path / "h.jsonl")
    _run(history, range(3))
    before = history.state_dict()
    history.add_round(make_round(2), bow_embed)  # re-adding an epoch replaces it
    assert history.state_dict() == before and len(history) == 15
    with pytest.warns(UserWarning, match="discards"):
        history.add_round(make_round(1), bow_embed)
    assert history.epochs == [0, 1]
    # The file replays to the same history: last record per key, rewinds drop the abandoned later epochs.
    assert len((tmp_path / "h.jsonl").read_text().splitlines()) == 15 + 5 + 5
    assert load_history(tmp_path / "h.jsonl").state_dict() == history.state_dict()
    with pytest.raises(ValueError, match="epoch"):
        history.add_round(ExplanationRound(epoch=None, units=[_unit(0, "x")]), bow_embed)
    assert history.add_round(ExplanationRound(epoch=None, units=[_unit(None, "x")]), bow_embed, epoch=7)[0].epoch == 7


def test_resume_equals_uninterrupted(tmp_path):
    full = RunHistory(path=tmp_path / "full" / HISTORY_FILENAME)
    _run(full, range(5))

    first = RunHistory(path=tmp_path / "a" / HISTORY_FILENAME)
    _run(first, range(3))  # the first run got to epoch 2 ...
    state = json.loads(json.dumps(first.state_dict()))  # plain JSON types, as in a checkpoint
    _run(first, [3])  # ... and to epoch 3 after its last checkpoint, then crashed

    # Resume from the epoch-2 checkpoint, into the same directory and into a fresh version directory.
    for sub in ("a", "b"):
        resumed = RunHistory()
        resumed.load_state_dict(state)
        resumed.attach(tmp_path / sub / HISTORY_FILENAME)
        _run(resumed, [3, 4])
        assert resumed.state_dict() == full.state_dict()
        assert load_history(tmp_path / sub).state_dict() == full.state_dict()

    # Attaching an already consistent file appends nothing.
    again = RunHistory.from_state_dict(full.state_dict())
    size = (tmp_path / "full" / HISTORY_FILENAME).stat().st_size
    again.attach(tmp_path / "full" / HISTORY_FILENAME)
    assert (tmp_path / "full" / HISTORY_FILENAME).stat().st_size == size


def test_load_history_robustness(tmp_path):
    history = RunHistory(path=tmp_path / "run" / "version_0" / HISTORY_FILENAME)
    _run(history, range(2))
    with (tmp_path / "run" / "version_0" / HISTORY_FILENAME).open("a") as f:
        f.write('{"schema": 1, "layer": "fc", "un')  # crash mid-write
    with pytest.warns(UserWarning, match="not valid JSON"):
        loaded = load_history(tmp_path / "run")  # found one level down
    assert len(loaded) == 10
    (tmp_path / "run" / "version_1").mkdir()
    (tmp_path / "run" / "version_1" / HISTORY_FILENAME).write_text("")
    with pytest.raises(ValueError, match="version_0"):
        load_history(tmp_path / "run")
    with pytest.raises(FileNotFoundError):
        load_history(tmp_path / "nothing")


def test_exports(tmp_path):
    history = RunHistory()
    _run(history, range(3))
    data = json.loads(history.to_json(tmp_path / "h.json").read_text())
    assert len(data["records"]) == 15 and len(data["summary"]) == 6
    assert load_history(tmp_path / "h.json").state_dict() == history.state_dict()
    rows = list(csv.DictReader(history.to_csv(tmp_path / "h.csv").open()))
    assert len(rows) == 15
    row = next(r for r in rows if (r["layer"], r["unit"], r["epoch"]) == ("features.3", "0", "2"))
    assert row["changed"] == "True" and row["previous_description"] == "red dots"
    assert row["alternatives"] == "zigzag=0.1; mesh=0.05" and row["top_sample_ids"] == "2 3 4 5"
    first = next(r for r in rows if r["epoch"] == "0")
    assert first["similarity"] == "" and first["changed"] == "False"


def test_validation_and_threshold_warning():
    with pytest.raises(ValueError):
        RunHistory(threshold=0)
    with pytest.raises(ValueError):
        RunHistory(stable_rounds=0)
    h = RunHistory(threshold=0.9)
    with pytest.warns(UserWarning, match="threshold"):
        h.load_state_dict(RunHistory(threshold=0.75).state_dict())


def test_format_summary_and_resolve(tmp_path):
    from lightning_neurons.drift.history import resolve_history_path

    history = RunHistory(path=tmp_path / HISTORY_FILENAME)
    _run(history, range(3))
    from lightning_neurons.logging.printout import history_lines

    lines = history_lines(history)
    assert lines[0].split()[:3] == ["layer", "epoch", "units"]
    assert "  features.3[0] epoch 2: 'red dots' -> 'vertical stripes' (similarity 0.00)" in lines
    # The old spelling keeps working with a DeprecationWarning, and prints the same meaning changes.
    with pytest.warns(DeprecationWarning, match="history_lines"):
        old = history.format_summary()
    assert old[0].split()[:3] == ["layer", "epoch", "units"] and len(old) == 1 + 6 + 2
    assert old[-1] == "  features.3[0] epoch 2: 'red dots' -> 'vertical stripes' (similarity 0.00)"
    assert resolve_history_path(tmp_path) == tmp_path / HISTORY_FILENAME


def test_history_keeps_the_ablation_check_and_the_report_shows_it(tmp_path):
    from lightning_neurons.logging.report import render_report

    history = RunHistory(path=tmp_path / HISTORY_FILENAME)
    rnd = make_round(0)
    rnd.units[0].ablation = [("cat", 0.12), ("dog", 0.03)]
    history.add_round(rnd, bow_embed)
    loaded = load_history(tmp_path)
    unit = loaded.get(rnd.units[0].layer, rnd.units[0].unit, 0).explanation
    assert unit.ablation == [("cat", 0.12), ("dog", 0.03)]
    assert loaded.get(rnd.units[1].layer, rnd.units[1].unit, 0).explanation.ablation is None
    rows = list(csv.DictReader(loaded.to_csv(tmp_path / "h.csv").open()))
    assert rows[0]["ablation"] == "cat=0.12; dog=0.03" and rows[1]["ablation"] == ""
    assert "zeroing hurts cat, dog" in render_report(loaded)
    # files written before the field existed still load
    old = tmp_path / "old" / HISTORY_FILENAME
    old.parent.mkdir()
    lines = [json.loads(line) for line in (tmp_path / HISTORY_FILENAME).read_text().splitlines()]
    old.write_text("\n".join(json.dumps({k: v for k, v in r.items() if k != "ablation"}) for r in lines) + "\n")
    assert load_history(old).get(rnd.units[0].layer, rnd.units[0].unit, 0).explanation.ablation is None
