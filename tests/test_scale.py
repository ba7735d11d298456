"""Scale paths: the fast multi-epoch drift summary, the vectorised unit assembly and the paginated report give the
same results as the straightforward code."""

from __future__ import annotations

import math
import random

import pytest

from lightning_neurons.drift.metrics import UnitDrift, summarize_layer, summarize_layer_epochs


def _random_timelines(seed: int, units: int = 30, epochs: int = 12) -> dict[int, list[UnitDrift]]:
    rng = random.Random(seed)
    out: dict[int, list[UnitDrift]] = {}
    for u in range(units):
        timeline = []
        previous = None
        for e in sorted(rng.sample(range(epochs), rng.randint(0, epochs))):
            d = UnitDrift("fc", u, e, f"c{rng.randint(0, 3)}", rng.random())
            if previous is not None:
                d.previous_epoch, d.previous_description = previous.epoch, previous.description
                d.similarity = rng.random()
                d.changed = d.similarity < 0.5
                d.jaccard = rng.random()
            timeline.append(d)
            previous = d
        out[u] = timeline
    return out


def _comparable(d: dict) -> dict:
    return {k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in d.items()}


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("stable_rounds", [1, 3])
def test_summarize_layer_epochs_equals_summarize_layer_per_epoch(seed, stable_rounds):
    timelines = _random_timelines(seed)
    epochs = [11, 0, 3, 5, 7, 2, 20]  # any order, and epochs nobody was explained at
    fast = summarize_layer_epochs("fc", epochs, timelines, stable_rounds)
    slow = [summarize_layer("fc", e, timelines, stable_rounds) for e in epochs]
    assert [_comparable(s.to_dict()) for s in fast] == [_comparable(s.to_dict()) for s in slow]


def _history(units: int, epochs: int):
    from _rounds import bow_embed
    from lightning_neurons.drift.history import RunHistory
    from lightning_neurons.results import ExplanationRound, UnitExplanation

    history = RunHistory()
    for epoch in range(epochs):
        rnd = ExplanationRound(
            epoch=epoch,
            units=[
                UnitExplanation("conv", u, epoch, f"concept {(u + epoch // 2) % 7}", 0.5 + 0.01 * u)
                for u in range(units)
            ],
        )
        history.add_round(rnd, bow_embed)
    return history


def test_layer_summaries_equal_history_summary():
    from lightning_neurons.logging.report import layer_summaries

    history = _history(units=12, epochs=6)
    fast = [s.to_dict() for layer in history.layers for s in layer_summaries(history)[layer]]
    assert fast == [s.to_dict() for s in history.summary()]


def test_report_pages_index_and_timeline_cap():
    import re

    from lightning_neurons.logging.report import render_report

    history = _history(units=23, epochs=5)
    html = render_report(history, max_units=None, page_size=10, max_epochs=3)
    assert "<script" not in html
    section = html.split('<section id="layer-conv">')[1]
    pages = re.findall(r'<div class="page" id="page-conv-(\d+)">', section)
    assert pages == ["1", "2", "3"]  # 23 units in pages of 10
    assert [int(u) for u in re.findall(r"<tr><td>(\d+)</td>", section)] == list(range(23))
    # every page has a link in the pager; every unit is in the index, linked to its row
    assert all(f'href="#page-conv-{p}"' in section for p in pages)
    assert all(f'href="#unit-conv-{u}"' in section and f'id="unit-conv-{u}"' in section for u in range(23))
    assert "7 distinct descriptions" in section
    # timelines keep the 3 latest epochs and say how many earlier ones there are
    row = section.split("<tr><td>0</td>")[1].split("</tr>")[0]
    assert re.findall(r'<div class="e">epoch (\d+)</div>', row) == ["2", "3", "4"]
    assert "2 earlier epochs" in row


def test_report_index_lists_units_without_rows_unlinked():
    from lightning_neurons.logging.report import render_report

    html = render_report(_history(units=30, epochs=1), max_units=5)
    assert 'href="#unit-conv-4"' in html and 'href="#unit-conv-5"' not in html
    assert "all 30 units by latest description" in html and "25 more units are in the history file" in html


def test_topk_pending_cap_bounds_rows_and_keeps_results():
    import torch

    from lightning_neurons.recording.topk import TopKBuffer

    gen = torch.Generator().manual_seed(0)
    values = torch.randn(300, 64, generator=gen).round(decimals=1)  # ties broken by id
    capped = TopKBuffer(64, 5, merge_rows=2048, max_pending_bytes=12 * 64 * 40)
    free = TopKBuffer(64, 5, merge_rows=2048, max_pending_bytes=None)
    assert capped.merge_rows == 40 and free.merge_rows == 2048
    for start in range(0, 300, 16):
        ids = torch.arange(start, min(300, start + 16))
        capped.add(values[ids], ids)
        free.add(values[ids], ids)
        assert capped._pending_rows < 40  # merged as soon as the cap is reached
    a, b = capped.state(), free.state()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # loads the embedded backend and explains a tiny ViT: about a minute on 2 cores
def test_scale_benchmark_runs_reduced_and_prints_one_json(tmp_path):
    """benchmarks/scale.py at a tiny size, end to end, so that the benchmark cannot silently break again (it crashed
    with a shape mismatch once its pooled encoder's image space no longer matched the backend's text space)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"
    args = "--blocks 1 --width 64 --hidden 64 --heads 2 --image-size 32 --probe 16 --batch 8 --history-rounds 3"
    args += " --concepts 50 --crop-size 32 --log-units 2"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(script), *args.split()], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)  # one JSON object, nothing else on stdout
    assert result["units"] == 64 and result["history_rounds"] == 3
    assert result["round_s"] > 0 and result["crops"]["pairs"] > 0
    assert 0 < result["history_bytes_per_round"] and result["history_to_pandas_s"] >= 0
    assert result["report_bytes"] > 1000
    assert set(result["extrapolated_100k"]) >= {"history_bytes_per_round", "history_to_pandas_s_100_rounds"}
