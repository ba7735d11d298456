"""The Neurons tab in headless Chromium, against a real TensorBoard process on a real fit's logdir.

A real fit (``tests/_fit_run.py``: SmallCNN, the embedded backend, a TensorBoardLogger) writes two rounds; the test
starts ``tensorboard`` on 127.0.0.1, checks that the tab is listed and rendered, opens a unit's timeline, searches a
concept the run holds, then trains on (a resumed fit writes a third round) and reloads: the new round is there.

Set ``LIGHTNING_NEURONS_SCREENSHOT_DIR=docs`` to refresh ``docs/neurons_tab.png`` (and ``neurons_timeline.png``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from PIL import Image

from _browser import CHROMIUM, chromium, get_json, running_tensorboard, wait_for
from lightning_neurons.drift.history import load_history

FIT = Path(__file__).parent / "_fit_run.py"
KEY = "run/version_0/neurons"  # the explainer's output folder, relative to the logdir

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs chromium (apt-get install chromium; .ci/run does)"),
    pytest.mark.skipif(
        "neurons" not in {e.name for e in entry_points(group="tensorboard_plugins")},
        reason="the installed lightning-neurons has no tensorboard_plugins entry point (pip install -e . again)",
    ),
]


def _fit(root: Path, epochs: int, resume: Path | None = None) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(FIT), str(root), str(epochs)] + ([] if resume is None else ["--resume", str(resume)])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _tab(base: str, **params: object) -> str:
    return f"{base}/data/plugin_entry.html?" + urllib.parse.urlencode({"name": "neurons", **params})


def _wait_listed(proc: subprocess.Popen, base: str, timeout: float = 60.0) -> dict:
    def listed() -> dict | None:
        listing = get_json(f"{base}/data/plugins_listing")
        return listing if listing.get("neurons", {}).get("enabled") else None

    return wait_for(proc, listed, timeout, "list an enabled neurons plugin", poll=0.5)


def test_neurons_tab_in_chromium_on_a_real_fit(tmp_path):
    root = tmp_path / "logs"
    _fit(root, 2)
    history = load_history(root / KEY)
    assert history.epochs == [0, 1]
    known = history.get("head", 0, 1).explanation.shown  # a concept the run holds

    profile = tmp_path / "profile"
    with running_tensorboard(root) as (proc, base):
        listing = _wait_listed(proc, base)
        assert listing["neurons"]["tab_name"] == "Neurons"
        assert listing["neurons"]["loading_mechanism"]["type"] == "IFRAME"

        # The tab appears in TensorBoard's own page.
        page = chromium(f"{base}/#neurons", profile, "--dump-dom")
        assert "Neurons" in page

        # The grid of the latest epoch, then a unit's timeline (crops and description per epoch).
        grid = chromium(_tab(base, run=KEY, layer="head"), profile, "--dump-dom")
        assert "head at epoch 1" in grid and "(2 explained)" in grid
        assert grid.count('class="card"') == 3  # head has 3 units
        timeline = chromium(_tab(base, run=KEY, layer="head", unit=0), profile, "--dump-dom")
        assert "head · unit 0: 2 explained epochs" in timeline
        assert timeline.count('class="ep"') == 2 and "/crop?" in timeline

        # Search finds a concept the run holds.
        found = chromium(_tab(base, run=KEY, q=known), profile, "--dump-dom")
        assert f'"{known}": ' in found and 'class="card"' in found

        # Training goes on (a resumed fit writes epoch 2's round): a reload shows the new round.
        _fit(root, 3, resume=root / "run" / "version_0" / "checkpoints" / "epoch=1.ckpt")
        again = chromium(_tab(base, run=KEY, layer="head"), profile, "--dump-dom")
        assert "head at epoch 2" in again and "(3 explained)" in again

        shot = tmp_path / "neurons_tab.png"
        chromium(f"{base}/#neurons", profile, f"--screenshot={shot}")
        img = Image.open(shot).convert("L")
        lo, hi = img.getextrema()
        assert img.size == (1400, 1000) and hi - lo > 100, "the tab looks blank"
        target = os.environ.get("LIGHTNING_NEURONS_SCREENSHOT_DIR")
        if target:
            Path(target).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shot, Path(target) / "neurons_tab.png")
            chromium(
                _tab(base, run=KEY, layer="head", unit=0),
                profile,
                f"--screenshot={Path(target) / 'neurons_timeline.png'}",
            )
