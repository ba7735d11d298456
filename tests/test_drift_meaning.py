"""Drift counts meaning (issue 21 item 4): changed only with a concept in both rounds, gained and lost apart, dead
units never counted, and a change of settings starts a new baseline instead of counting as drift."""

from __future__ import annotations

import pytest

from _rounds import bow_embed
from lightning_neurons.drift.history import HISTORY_FILENAME, RunHistory, load_history
from lightning_neurons.drift.metrics import compare_units
from lightning_neurons.logging.base import RoundOutput
from lightning_neurons.logging.metrics import round_metrics
from lightning_neurons.logging.rows import layer_rows, record_row
from lightning_neurons.results import ExplanationRound, RoundIdentity, UnitExplanation

LAYER = "features.16"


def _unit(unit: int, epoch: int, text: str, kind: str | None, low_level: str | None = None) -> UnitExplanation:
    return UnitExplanation(
        LAYER,
        unit,
        epoch,
        text,
        0.5,
        top_sample_ids=[unit, unit + 1],
        activations=[1.0],
        kind=kind,
        low_level=low_level,
    )


def _round(epoch: int, units: list[UnitExplanation], settings: str = "") -> ExplanationRound:
    identity = RoundIdentity("run", "w", epoch, epoch, settings) if settings else None
    return ExplanationRound(epoch, units, identity=identity)


def test_no_clear_concept_in_both_rounds_is_never_a_change(tmp_path):
    """The filed case: 19 of 114 "changed" units were "no clear concept" in both rounds (raw best concepts differ)."""
    words = ["bottle neck", "dog", "sky", "grass", "wheel", "stripes", "red dots", "fur", "water", "sand"]
    history = RunHistory(path=tmp_path / HISTORY_FILENAME)
    history.add_round(_round(0, [_unit(u, 0, words[u % 10], "unclear") for u in range(19)]), bow_embed)
    drift = history.add_round(_round(1, [_unit(u, 1, words[(u + 3) % 10], "unclear") for u in range(19)]), bow_embed)
    assert all(d.compared and d.similarity is not None and d.similarity < 0.75 for d in drift)  # texts do differ
    assert not any(d.changed or d.gained or d.lost or d.concepts_changed for d in drift)
    (summary,) = history.summary(1)
    assert (summary.n_compared, summary.n_changed, summary.fraction_changed) == (19, 0, 0.0)
    # Read back from the file: the kinds are kept, the drift stays as it was judged.
    again = load_history(tmp_path / HISTORY_FILENAME)
    assert again.summary(1)[0].n_changed == 0 and again.get(LAYER, 0, 1).explanation.kind == "unclear"


def test_gained_and_lost_are_counted_apart_and_reach_the_metrics(tmp_path):
    before = [
        _unit(0, 0, "stripes", "concept"),  # concept -> other concept: changed
        _unit(1, 0, "grass", "low_level", "green"),  # low-level -> concept: gained
        _unit(2, 0, "dog", "unclear"),  # unclear -> concept: gained
        _unit(3, 0, "sky", "concept"),  # concept -> unclear: lost
        _unit(4, 0, "wheel", "concept"),  # concept -> dead: nothing
        _unit(5, 0, "", "dead"),  # dead -> concept: nothing (a dead unit never counts)
        _unit(6, 0, "fur", "low_level", "red"),  # low-level -> low-level: nothing
    ]
    after = [
        _unit(0, 1, "water", "concept"),
        _unit(1, 1, "grass", "concept"),
        _unit(2, 1, "cat", "concept"),
        _unit(3, 1, "cloud", "unclear"),
        _unit(4, 1, "", "dead"),
        _unit(5, 1, "sand", "concept"),
        _unit(6, 1, "sand", "low_level", "brightness"),
    ]
    history = RunHistory(path=tmp_path / HISTORY_FILENAME)
    history.add_round(_round(0, before), bow_embed)
    drift = history.add_round(_round(1, after), bow_embed)
    moves = [("changed" if d.changed else "gained" if d.gained else "lost" if d.lost else "-") for d in drift]
    assert moves == ["changed", "gained", "gained", "lost", "-", "-", "-"]
    (s,) = history.summary(1)
    assert (s.n_changed, s.n_gained, s.n_lost, s.n_dead) == (1, 2, 1, 1)
    assert (s.fraction_gained, s.fraction_lost) == (pytest.approx(2 / 7), pytest.approx(1 / 7))
    metrics = round_metrics(RoundOutput(_round(1, after), drift, [s], step=1, epoch=1))
    assert metrics[f"neurons/{LAYER}/fraction_gained"] == pytest.approx(2 / 7)
    assert metrics[f"neurons/{LAYER}/fraction_lost"] == pytest.approx(1 / 7)
    assert metrics[f"neurons/{LAYER}/dead_units"] == 1.0
    # The rows every sink shows: shown texts on both sides, the move in its own column.
    rows = {r["unit"]: r for r in layer_rows(RoundOutput(_round(1, after), drift, [s], step=1, epoch=1), LAYER)}
    assert (rows[1]["gained"], rows[1]["previous_description"], rows[1]["description"]) == (
        True,
        "low-level: green",
        "grass",
    )
    assert (rows[3]["lost"], rows[3]["description"], rows[3]["previous_description"]) == (
        True,
        "no clear concept",
        "sky",
    )
    assert rows[4]["description"] == "dead unit" and not (rows[4]["changed"] or rows[4]["lost"])
    # Stored and read back.
    records = {r.key[1]: r for r in load_history(tmp_path / HISTORY_FILENAME).records if r.key[2] == 1}
    assert [records[u].drift.gained for u in range(7)] == [d.gained for d in drift]
    assert [records[u].drift.lost for u in range(7)] == [d.lost for d in drift]
    # What was shown before, never the raw best concept of a unit that had none ("grass" of a low-level unit).
    shown_before = [record_row(records[u])["previous_description"] for u in range(7)]
    assert shown_before == [
        "stripes",
        "low-level: green",
        "no clear concept",
        "sky",
        "wheel",
        "dead unit",
        "low-level: red",
    ]


def test_records_without_kinds_are_judged_as_before():
    (d,) = compare_units({(LAYER, 0): _unit(0, 0, "red dots", None)}, [_unit(0, 1, "stripes", None)], bow_embed)
    assert d.changed and not (d.gained or d.lost)
    (d,) = compare_units({(LAYER, 0): _unit(0, 0, "red dots", None)}, [_unit(0, 1, "stripes", "unclear")], bow_embed)
    assert not (d.changed or d.gained or d.lost)  # a legacy record beside a known kind: no claim either way


def test_a_change_of_settings_starts_a_new_baseline(tmp_path):
    history = RunHistory(path=tmp_path / HISTORY_FILENAME)
    history.add_round(_round(0, [_unit(u, 0, "stripes", "concept") for u in range(8)], "vocab-a"), bow_embed)
    drift = history.add_round(_round(1, [_unit(u, 1, "grass", "concept") for u in range(8)], "vocab-b"), bow_embed)
    assert all(d.baseline and not d.compared and not d.changed for d in drift)
    (s,) = history.summary(1)
    assert (s.n_compared, s.n_changed, s.n_baseline) == (0, 0, 8)
    # The next round under the new settings compares with the baseline round.
    drift = history.add_round(_round(2, [_unit(u, 2, "grass", "concept") for u in range(8)], "vocab-b"), bow_embed)
    assert all(d.compared and d.previous_epoch == 1 and not d.baseline for d in drift)
    # The per-record settings survive the file and the checkpoint state.
    again = load_history(tmp_path / HISTORY_FILENAME)
    assert again.get(LAYER, 0, 1).drift.baseline and again.get(LAYER, 0, 1).settings == "vocab-b"
    restored = RunHistory.from_state_dict(history.checkpoint_state())
    drift = restored.add_round(_round(3, [_unit(u, 3, "sky", "concept") for u in range(8)], "vocab-c"), bow_embed)
    assert all(d.baseline for d in drift)
