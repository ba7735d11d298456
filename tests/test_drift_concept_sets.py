"""Drift judges a description's meaning and a combination's concept set apart (issue 14 follow-up).

A unit whose description keeps its meaning while its multi-concept combination swaps concepts is not *changed*
(``UnitDrift.changed``: description similarity only); it is ``concepts_changed``, counted apart in the summaries,
the logged scalars and the rows, and every printout shows the two combinations instead of "'x' -> 'x'".
"""

from __future__ import annotations

import csv
import json

import pytest
from torch.utils.tensorboard import SummaryWriter

from _rounds import bow_embed
from lightning_neurons.cli import main
from lightning_neurons.drift.history import HISTORY_FILENAME, RunHistory, load_history
from lightning_neurons.drift.metrics import UnitDrift, compare_units
from lightning_neurons.logging.base import RoundOutput
from lightning_neurons.logging.metrics import round_metrics
from lightning_neurons.logging.printout import history_lines
from lightning_neurons.logging.report import render_report
from lightning_neurons.logging.rows import layer_rows
from lightning_neurons.logging.tensorboard import NeuronTensorBoardLogger, escape_markdown
from lightning_neurons.results import Alternative, ExplanationRound, UnitExplanation
from test_tensorboard import load_events, text_values

LAYER = "features.block4"
# Per unit, per epoch: (description, combination). Unit 7 keeps "fruit" while its concept set goes {fruit, dog} ->
# {fruit, grass} (Jaccard 1/3); unit 3's description changes meaning; unit 5 keeps both; unit 8 drops one of
# three concepts (Jaccard 2/3, not a concept-set change).
PLAN: dict[int, list[tuple[str, list[tuple[str, float]] | None]]] = {
    3: [("grass", None), ("sky", None)],
    5: [("dots", [("dots", 0.5), ("red", 0.2)]), ("dots", [("dots", 0.6), ("red", 0.1)])],
    7: [("fruit", [("fruit", 0.61), ("dog", 0.22)]), ("fruit", [("fruit", 0.55), ("grass", 0.30)])],
    8: [("fruit", [("fruit", 0.5), ("dog", 0.3), ("grass", 0.2)]), ("fruit", [("fruit", 0.5), ("dog", 0.3)])],
}
BEFORE, AFTER = "fruit (0.73) + dog (0.27)", "fruit (0.65) + grass (0.35)"  # unit 7, weights normalised


def _round(epoch: int) -> ExplanationRound:
    units = [
        UnitExplanation(
            LAYER,
            unit,
            epoch,
            text,
            0.7 + 0.01 * unit,
            top_sample_ids=[unit, unit + 1],
            activations=[1.0, 0.5],
            combination=[Alternative(t, w) for t, w in combo] if combo else None,
        )
        for unit, rounds in PLAN.items()
        for text, combo in [rounds[epoch]]
    ]
    return ExplanationRound(epoch=epoch, units=units)


def _run(path=None) -> tuple[RunHistory, list[RoundOutput]]:
    history = RunHistory(path=path)
    outputs = []
    for epoch in (0, 1):
        rnd = _round(epoch)
        drift = history.add_round(rnd, bow_embed)
        outputs.append(RoundOutput(rnd, drift=drift, summaries=history.summary(epoch), step=epoch, epoch=epoch))
    return history, outputs


def test_same_description_with_disjoint_combinations_changes_the_concepts_not_the_meaning() -> None:
    old, new = _round(0).get(LAYER, 7), _round(1).get(LAYER, 7)
    old.combination = [Alternative("fruit", 0.6), Alternative("dog", 0.4)]
    new.combination = [Alternative("grass", 0.7), Alternative("sky", 0.3)]  # disjoint: Jaccard 0
    (d,) = compare_units({old.key: old}, [new], embed=lambda texts: pytest.fail("same text: nothing to embed"))
    assert (d.similarity, d.concept_jaccard) == (1.0, 0.0)
    assert d.changed is False and d.concepts_changed is True and d.concepts_only_changed
    assert d.previous_combination == old.combination
    # A change of meaning is a change of the concept set too; a shared majority of concepts is neither.
    drift = {d.unit: d for d in _run()[1][1].drift}
    assert (drift[3].changed, drift[3].concepts_changed) == (True, True)
    assert (drift[5].changed, drift[5].concepts_changed) == (False, False)
    assert (drift[8].changed, drift[8].concepts_changed, drift[8].concept_jaccard) == (False, False, 2 / 3)
    assert UnitDrift.from_dict(drift[7].to_dict()) == drift[7]


def test_summaries_scalars_and_rows_count_the_two_apart(tmp_path) -> None:
    history, outputs = _run()
    (s,) = history.summary(1)
    assert (s.n_compared, s.n_changed, s.n_concepts_changed) == (4, 1, 2)
    assert (s.fraction_changed, s.fraction_concepts_changed) == (0.25, 0.5)
    assert s.n_stable == 0 and s.first_stable_epoch == {3: 1, 5: 0, 7: 0, 8: 0}  # stability follows meaning
    assert json.loads(history.to_json(tmp_path / "h.json").read_text())["summary"][1]["n_concepts_changed"] == 2
    metrics = round_metrics(outputs[1])
    assert metrics[f"neurons/{LAYER}/fraction_changed"] == 0.25
    assert metrics[f"neurons/{LAYER}/fraction_concepts_changed"] == 0.5
    assert round_metrics(outputs[0])[f"neurons/{LAYER}/fraction_concepts_changed"] == 1.0  # nothing settled yet
    rows = {r["unit"]: r for r in layer_rows(outputs[1], LAYER)}
    assert (rows[7]["changed"], rows[7]["concepts_changed"]) == (False, True)
    assert (rows[3]["changed"], rows[3]["concepts_changed"]) == (True, True)
    with SummaryWriter(tmp_path / "tb") as writer:
        tb = NeuronTensorBoardLogger(writer)
        for out in outputs:
            tb.write_round(out)
    events = load_events(tmp_path / "tb")
    assert [e.value for e in events.Scalars(f"neurons/{LAYER}/fraction_changed")] == [0.25]
    assert [e.value for e in events.Scalars(f"neurons/{LAYER}/fraction_concepts_changed")] == [0.5]
    table = text_values(events, f"neurons/{LAYER}/table")[1]
    assert "1/4 changed · 2/4 concept sets changed" in table
    before, after = escape_markdown(BEFORE), escape_markdown(AFTER)
    # Unit 7: not in bold (its meaning kept), in italics, the previous combination after the previous description.
    assert f"| 7 | *fruit · {after}* | – | 0.770 | – | – | fruit · {before} | 1.000 |" in table
    assert "| 3 | **sky** |" in table
    card = text_values(events, f"neurons/{LAYER}/7/description")[1]
    assert f"combination: {after}" in card
    assert f"concepts changed from *fruit* · {before} at epoch 0 (concept overlap 0.33, similarity 1.000" in card
    assert "\n\nchanged from" not in card
    assert "\n\nchanged from *grass* at epoch 0" in text_values(events, f"neurons/{LAYER}/3/description")[1]


def test_history_printout_lists_concept_set_changes_apart_with_both_combinations(tmp_path, capsys) -> None:
    history, _ = _run(tmp_path / HISTORY_FILENAME)
    history.close()
    assert main(["history", str(tmp_path), "--csv", str(tmp_path / "h.csv"), "--json", str(tmp_path / "h.json")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:5] == ["layer", "epoch", "units", "changed", "concepts"]
    assert out[2].split()[:5] == [LAYER, "1", "4", "1/4", "2/4"]
    assert out[3:7] == [
        "meaning changes:",
        f"  {LAYER}[3] epoch 1: 'grass' -> 'sky' (similarity 0.00)",
        "concept-set changes (same meaning, other concepts in the combination):",
        f"  {LAYER}[7] epoch 1: 'fruit' [{BEFORE}] -> 'fruit' [{AFTER}] (concept overlap 0.33)",
    ]
    assert not any("'fruit' -> 'fruit'" in line for line in out)
    rows = {(r["unit"], r["epoch"]): r for r in csv.DictReader((tmp_path / "h.csv").open())}
    assert (rows[("7", "1")]["changed"], rows[("7", "1")]["concepts_changed"]) == ("False", "True")
    # The HTML report: unit 7's epoch-1 cell is a concept-set change (dashed), not a change of meaning.
    html = render_report(history)
    assert html.count('class="ep changed"') == 1 and html.count('class="ep concepts"') == 1
    assert f'<div class="c">concept set changed from {BEFORE}</div>' in html
    assert "fraction of concept sets changed" in html


def test_an_old_history_without_concepts_changed_loads_with_both_flags(tmp_path) -> None:
    """Files written before the field: ``changed`` counted concept-set changes too, and no ``concepts_changed``."""
    _run(tmp_path / "new" / HISTORY_FILENAME)[0].close()
    lines = [json.loads(x) for x in (tmp_path / "new" / HISTORY_FILENAME).read_text().splitlines()]
    old = tmp_path / "old" / HISTORY_FILENAME
    old.parent.mkdir()
    written = []
    for r in lines:
        r["changed"] = r.pop("concepts_changed")  # the previous rule: similarity or concept-set Jaccard < 0.5
        written.append(json.dumps(r))
    assert sum(r["changed"] for r in lines) == 2  # units 3 and 7 at epoch 1
    old.write_text("\n".join(written) + "\n")
    loaded = load_history(old)
    assert len(loaded) == 8
    unit7, unit3 = loaded.get(LAYER, 7, 1).drift, loaded.get(LAYER, 3, 1).drift
    assert (unit7.changed, unit7.concepts_changed) == (False, True)  # judged again from the stored similarity
    assert (unit3.changed, unit3.concepts_changed) == (True, True)
    (s,) = loaded.summary(1)
    assert (s.n_changed, s.n_concepts_changed) == (1, 2)
    assert f"  {LAYER}[7] epoch 1: 'fruit' [{BEFORE}] -> 'fruit' [{AFTER}] (concept overlap 0.33)" in (
        history_lines(loaded)
    )
    # Records of runs without combinations keep their flag for both, and an old summary dictionary loads too.
    plain = {k: v for k, v in lines[0].items() if k != "concepts_changed"} | {"changed": True}
    assert UnitDrift.from_dict(plain).concepts_changed is True
    summary = {k: v for k, v in s.to_dict().items() if "concepts" not in k}
    assert type(s).from_dict(summary).n_concepts_changed == s.n_changed
