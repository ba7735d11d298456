"""Nothing the tool reads can run code, nothing it writes is lost (issue 12's fault-injection tests).

- A checkpoint whose unpickling would create a marker file: the marker never appears, through the CLI
  (`explain --checkpoint`, `evaluate RUN_DIR`) and the Python API (`explain_checkpoints`, `load_checkpoint`).
- A real training process SIGKILLed half-way through writing a history round, then resumed from its checkpoint
  with Lightning's own resume: the history equals an uninterrupted run's.
- Strict JSON, escaped TensorBoard text, a non-UTF-8 vocabulary file, one-to-one preview folders.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_neurons import explain_checkpoints, load_history
from lightning_neurons.checkpoints import CheckpointError, load_checkpoint, load_model
from lightning_neurons.cli import main
from lightning_neurons.demo import SmallCNN

FIT = Path(__file__).with_name("_fit_run.py")


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: a stand-in for any shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_checkpoint(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"epoch": 0, "state_dict": SmallCNN(num_classes=2, width=4).state_dict(), "hook": _Payload(marker)}
    torch.save(state, path)
    # The payload really runs when the file is unpickled the old way.
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    return path


def test_malicious_checkpoint_is_refused_by_the_api(tmp_path):
    marker = tmp_path / "pwned"
    evil = _evil_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(CheckpointError, match=r"evil\.ckpt: refused to load.*it would import io\.open"):
        load_checkpoint(evil)
    with pytest.raises(CheckpointError, match="evil.ckpt"):
        load_model(SmallCNN, evil)
    loader = DataLoader(TensorDataset(torch.rand(4, 3, 32, 32), torch.zeros(4, dtype=torch.long)), batch_size=4)
    with pytest.raises(CheckpointError, match="evil.ckpt"):
        explain_checkpoints(tmp_path, SmallCNN, loader, ["head"], output_dir=tmp_path / "out", show_progress=False)
    assert not marker.exists()


def test_malicious_checkpoint_is_refused_by_the_cli(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = _evil_checkpoint(tmp_path / "checkpoints" / "epoch=3.ckpt", marker)
    data = json.dumps({"classes": ["cat", "grass"], "train_per_class": 2, "val_per_class": 2, "image_size": 32})
    argv = ["explain", "--checkpoint", str(evil), "--model-class", "lightning_neurons.demo.SmallCNN"]
    argv += ["--data", "lightning_neurons.demo.PhotoPatchesDataModule", "--data-args", data, "--layers", "head"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "epoch=3.ckpt: refused to load" in err[0]

    # `evaluate RUN_DIR` rebuilds the run from its config.yaml and loads the newest checkpoint of the run.
    (tmp_path / "config.yaml").write_text(
        """
model:
  class_path: lightning_neurons.demo.SmallCNN
  init_args: {num_classes: 2, width: 4}
data:
  class_path: lightning_neurons.demo.PhotoPatchesDataModule
  init_args: {classes: [cat, grass], train_per_class: 2, val_per_class: 2, image_size: 32}
trainer:
  accelerator: cpu
  callbacks:
    - class_path: lightning_neurons.NeuronExplainer
      init_args: {layers: [head], top_k: 2, show_progress: false}
"""
    )
    assert main(["evaluate", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "epoch=3.ckpt: refused to load" in err[-1]
    assert not marker.exists()


def test_broken_checkpoints_fail_in_one_line_naming_the_file(tmp_path, capsys):
    good = tmp_path / "good.ckpt"
    torch.save({"epoch": 1, "state_dict": SmallCNN().state_dict()}, good)
    assert isinstance(load_model(SmallCNN, good), SmallCNN)  # a plain weights checkpoint loads
    small = tmp_path / "small.ckpt"
    torch.save({"epoch": 1, "state_dict": SmallCNN(num_classes=2, width=4).state_dict()}, small)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match=r"cut\.ckpt: not a readable PyTorch checkpoint"):
        load_checkpoint(cut)
    with pytest.raises(CheckpointError, match=r"small\.ckpt: its weights do not fit SmallCNN.*size mismatch"):
        load_model(SmallCNN, small)  # SmallCNN() has 12 classes and width 16
    # Lightning's own resume of an unsafe file (`fit --ckpt_path`) reaches the CLI as an UnpicklingError.
    assert main(["history", str(tmp_path / "nothing")]) == 2
    capsys.readouterr()

    from lightning_neurons.cli import _guard

    def unpickle():
        raise pickle.UnpicklingError("Weights only load failed.\n\nunsupported GLOBAL posix.system whose module ...")

    assert _guard(unpickle) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refused to unpickle" in err[0] and "import posix.system" in err[0]


def _history(root: Path):
    return load_history(root / "run" / "version_0" / "neurons")


@pytest.mark.slow  # three real fits in subprocesses (about a minute of CPU)
def test_sigkill_while_writing_a_round_then_resume_equals_uninterrupted(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    run = [sys.executable, str(FIT)]
    # The uninterrupted run and the run that dies half-way through writing epoch 1's round, side by side.
    reference = subprocess.Popen([*run, str(tmp_path / "ref"), "2"], env=env, stderr=subprocess.PIPE, text=True)
    killed = subprocess.run(
        [*run, str(tmp_path / "crash"), "2", "--kill-at-epoch", "1"], env=env, capture_output=True, text=True
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    store = tmp_path / "crash" / "run" / "version_0" / "neurons" / "history"
    assert [p.name.startswith(".tmp-") for p in sorted(store.iterdir())] == [True, False]  # the kill left half a file
    assert _history(tmp_path / "crash").epochs == [0]  # the partial epoch 1 is not shown: it never became visible

    checkpoint = tmp_path / "crash" / "run" / "version_0" / "checkpoints" / "epoch=0.ckpt"
    resumed = subprocess.run(
        [*run, str(tmp_path / "crash"), "2", "--resume", str(checkpoint)], env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-3000:] if reference.stderr else ""

    expected = _history(tmp_path / "ref").state_dict()["records"]
    got = _history(tmp_path / "crash").state_dict()["records"]
    keys = [(r["layer"], r["unit"], r["epoch"]) for r in got]
    assert keys == [(r["layer"], r["unit"], r["epoch"]) for r in expected]  # nothing lost, partial or doubled
    assert len(set(keys)) == len(keys) == 2 * 3
    for a, b in zip(got, expected):
        assert (a["description"], a["top_sample_ids"], a["changed"]) == (
            b["description"],
            b["top_sample_ids"],
            b["changed"],
        )
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)


def test_round_json_is_strict(tmp_path):
    from lightning_neurons.results import ExplanationRound, UnitExplanation

    unit = UnitExplanation("fc", 0, 1, "dots", score=float("nan"), margin=float("inf"))
    rnd = ExplanationRound(1, [unit], meta={"auc": float("nan")})
    path = tmp_path / "round_epoch=1.json"
    rnd.to_json(path)

    def refuse(name):
        raise ValueError(f"bare {name} in strict JSON")

    data = json.loads(path.read_text(), parse_constant=refuse)
    assert data["units"][0]["score"] is None and data["meta"]["auc"] is None
    back = ExplanationRound.from_json(path)
    assert math.isnan(back.units[0].score) and math.isnan(back.units[0].margin)


def test_tensorboard_text_is_escaped():
    from tensorboard import plugin_util

    from lightning_neurons.drift.metrics import UnitDrift
    from lightning_neurons.logging.tensorboard import NeuronTensorBoardLogger
    from lightning_neurons.results import Alternative, UnitExplanation

    hostile = "![x](http://evil.example/t.png) <img src=http://evil.example/u.png> [a](javascript:x) a|b"
    unit = UnitExplanation("fc", 0, 1, hostile, 0.8, alternatives=[Alternative(hostile, 0.1)], ablation=[(hostile, 1)])
    drift = UnitDrift(
        "fc", 0, 1, hostile, 0.8, previous_epoch=0, previous_description=hostile, similarity=0.1, changed=True
    )
    for text in (
        NeuronTensorBoardLogger.unit_text(unit, drift),
        NeuronTensorBoardLogger.table([unit], {unit.key: drift}),
    ):
        html = plugin_util.markdown_to_safe_html(text)
        assert "<img" not in html and "<a " not in html and "evil.example" in html
    # The "|" inside the text stays inside its cell: one data cell per header cell.
    html = plugin_util.markdown_to_safe_html(NeuronTensorBoardLogger.table([unit], {}))
    assert html.count("<td>") == html.count("<th>") >= 5


def test_non_utf8_vocabulary_file_is_named(tmp_path):
    from lightning_neurons.concepts.vocabulary import read_concept_file

    path = tmp_path / "concepts.txt"
    path.write_bytes("stripes\ncaf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"concepts\.txt is not UTF-8 text \(byte 0xe9 on line 2\)"):
        read_concept_file(path)


def test_preview_folders_are_one_to_one(tmp_path):
    from lightning_neurons.logging.previews import preview_path

    assert preview_path(tmp_path, "a b", 0, 1) != preview_path(tmp_path, "a_b", 0, 1)
    assert preview_path(tmp_path, "features.block4", 0, 1) == tmp_path / "features.block4" / "0" / "epoch_1.png"
    assert preview_path(tmp_path, "..", 0, 1).parent.parent.parent == tmp_path
