from __future__ import annotations

import re

from _rounds import bow_embed, make_round
from lightning_neurons.drift.history import HISTORY_FILENAME, RunHistory
from lightning_neurons.logging.previews import PREVIEWS_DIRNAME, save_previews
from lightning_neurons.logging.report import render_report, write_report
from lightning_neurons.results import Alternative, ExplanationRound, UnitExplanation


def test_report_from_run_dir(tmp_path):
    run = tmp_path / "version_0"
    history = RunHistory()
    history.attach(run / HISTORY_FILENAME)
    for epoch in range(4):
        rnd = make_round(epoch)
        history.add_round(rnd, bow_embed)
        if epoch != 3:  # the latest crops shown are those of the last epoch that saved some
            save_previews(rnd, run / PREVIEWS_DIRNAME)
    out = write_report(tmp_path, tmp_path / "out" / "report.html")
    text = out.read_text()

    # Self-contained: no external URLs, scripts or stylesheets.
    assert not re.search(r"""(src|href)=["'](https?:)?//""", text)
    assert "<script" not in text and "<link" not in text
    assert text.count("data:image/png;base64,") == 5  # one latest grid per unit
    assert "Neuron explanations: version_0" in text

    for layer in ("features.3", "head.fc"):
        assert f'<section id="layer-{layer}">' in text
    assert text.count("<svg") == 6  # per layer: states, mean score and concept distribution (the tab's layer charts)
    assert "fraction of units changed" in text and "mean score" in text and "concept distribution" in text
    # Unit 0's timeline: red dots, then vertical stripes highlighted as a change at epoch 2.
    section = text.split('<section id="layer-features.3">')[1].split("</section>")[0]
    row0 = section.split("<tr><td>0</td>")[1].split("</tr>")[0]
    assert re.findall(r'<div class="d">([^<]+)</div>', row0) == ["red dots"] * 2 + ["vertical stripes"] * 2
    assert row0.count('class="ep changed"') == 1 and 'title="previously: red dots"' in row0
    assert "<td>epoch 2</td>" in row0  # first stable epoch


def test_report_from_history_escapes_and_handles_empty(tmp_path):
    history = RunHistory()
    history.add_round(
        make_round(0, previews=False).__class__(epoch=0, units=[UnitExplanation("fc", 0, 0, "<b>x</b> & y", 0.5)]),
        bow_embed,
    )
    html = render_report(history)
    assert "&lt;b&gt;x&lt;/b&gt; &amp; y" in html and "no crops saved" in html
    assert "The history is empty" in render_report(RunHistory())
    assert write_report(history, tmp_path / "r.html").is_file()


def test_report_keeps_at_most_max_units_per_layer_watched_units_first(tmp_path):
    run = tmp_path / "run"
    history = RunHistory()
    history.attach(run / HISTORY_FILENAME)
    units = [UnitExplanation("conv", u, 0, f"concept {u}", 0.5) for u in range(40)]
    rnd = make_round(0, previews=False).__class__(epoch=0, units=units)
    rnd.previews[("conv", 37)] = make_round(0).previews[("features.3", 0)]  # only unit 37 was logged with crops
    history.add_round(rnd, bow_embed)
    save_previews(rnd, run / PREVIEWS_DIRNAME)
    html = write_report(run, tmp_path / "r.html", max_units=5).read_text()
    shown = [int(u) for u in re.findall(r"<tr><td>(\d+)</td>", html)]
    assert shown == [0, 1, 2, 3, 37]  # the watched unit, then the first ones, in unit order
    assert "35 more units are in the history file" in html
    full = render_report(history, run / PREVIEWS_DIRNAME, max_units=None)
    assert len(re.findall(r"<tr><td>(\d+)</td>", full)) == 40 and "more units" not in full


def test_cli_report_help_states_the_library_default(capsys):
    import pytest

    from lightning_neurons.cli import main
    from lightning_neurons.logging.report import DEFAULT_MAX_UNITS

    with pytest.raises(SystemExit):
        main(["report", "--help"])
    assert f"default {DEFAULT_MAX_UNITS}" in " ".join(capsys.readouterr().out.split())


def _kinds_round(epoch: int) -> ExplanationRound:
    # Per unit a kind and text per epoch: 0 changes meaning, 1 gains a concept, 2 loses it, 3 is dead, 4 is stable.
    plan = {
        0: [("concept", "red dots"), ("concept", "red dots"), ("concept", "vertical stripes")],
        1: [("unclear", "fog"), ("unclear", "fog"), ("concept", "wheel")],
        2: [("concept", "grass"), ("low_level", "grass"), ("low_level", "grass")],
        3: [("dead", ""), ("dead", ""), ("dead", "")],
        4: [("concept", "sky"), ("concept", "sky"), ("concept", "sky")],
    }
    units = [
        UnitExplanation(
            "conv",
            unit,
            epoch,
            text,
            float("nan") if kind == "dead" else 0.5 + 0.1 * unit + 0.01 * epoch,
            kind=kind,
            q_value=None if kind == "dead" else 0.01 * (unit + 1),
            low_level="brightness" if kind == "low_level" else None,
            alternatives=[Alternative("mesh", 0.1)],
        )
        for unit, steps in plan.items()
        for kind, text in [steps[epoch]]
    ]
    return ExplanationRound(epoch=epoch, units=units)


def test_the_report_and_the_tabs_json_show_the_same_unit_at_every_epoch(tmp_path):
    """One implementation of the unit timeline: the report's cells are the tab's /unit entries, rendered."""
    import html
    import json

    from tensorboard.plugins import base_plugin
    from werkzeug.test import Client

    from lightning_neurons.dashboard.plugin import NeuronsPlugin

    out = tmp_path / "logs" / "version_0" / "neurons"
    history = RunHistory()
    history.attach(out / "history")
    for epoch in range(3):
        history.add_round(_kinds_round(epoch), bow_embed)
    history.close()
    page = write_report(out, tmp_path / "report.html").read_text()
    apps = NeuronsPlugin(base_plugin.TBContext(logdir=str(tmp_path / "logs"))).get_plugin_apps()
    section = page.split('<section id="layer-conv">')[1].split("</section>")[0]
    cell = re.compile(
        r'data-state="([a-z]+)" title="[^"]*"><div class="e">epoch (\d+)</div><div class="d">([^<]*)</div>'
        r'(?:<div class="s">[a-z_]+</div>)?<div class="s">score (\S+?)[ <]'
    )
    states = set()
    for unit in range(5):
        response = Client(apps["/unit"]).get(
            "/unit", query_string={"run": "version_0/neurons", "layer": "conv", "unit": unit}
        )
        tab = [(e["state"], e["epoch"], e["shown"], e["score"]) for e in json.loads(response.data)["epochs"]]
        row = section.split(f"<tr><td>{unit}</td>")[1].split("</tr>")[0]
        report = [(s, int(e), html.unescape(text), score) for s, e, text, score in cell.findall(row)]
        assert [(s, e, text) for s, e, text, _ in report] == [(s, e, text) for s, e, text, _ in tab]
        assert [score for *_, score in report] == ["–" if x is None else f"{x:.2f}" for *_, x in tab]
        states |= {s for s, *_ in tab}
    assert states == {"new", "changed", "gained", "lost", "stable", "dead"}


def test_preview_grids_written_on_several_threads_are_the_ones_written_on_one(tmp_path):
    import torch

    g = torch.Generator().manual_seed(0)
    rnd = ExplanationRound(epoch=2)
    for unit in range(12):
        rnd.previews[("features.3", unit)] = torch.randint(0, 256, (5, 3, 12, 12), dtype=torch.uint8, generator=g)
    rnd.previews[("a b", 0)] = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = save_previews(rnd, tmp_path / "one")
        torch.set_num_threads(3)
        several = save_previews(rnd, tmp_path / "several")
    finally:
        torch.set_num_threads(threads)
    assert len(one) == len(several) == 13
    # Same files, in the order of the round's previews, byte for byte.
    assert [p.relative_to(tmp_path / "one") for p in one] == [p.relative_to(tmp_path / "several") for p in several]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(one, several))
    assert several[0].name == "epoch_2.png" and several[-1].parent.parent.name == "a%20b"
    # Lossless: the file holds the grid's pixels exactly, whatever zlib settings wrote it.
    import numpy as np
    from PIL import Image

    from lightning_neurons.logging.previews import preview_grid

    pixels = np.asarray(Image.open(one[0]).convert("RGB"))
    assert np.array_equal(pixels, preview_grid(rnd.previews[("features.3", 0)]).permute(1, 2, 0).numpy())
