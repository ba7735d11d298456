"""Real DDP on CPU (gloo): the real callback, session, pipeline and writers in two processes equal one process.

Weights do not move (lr=0), so a 2-process run must record and explain exactly what a 1-process run does: the
same top-k ids, the same descriptions, scores within float tolerance, the evaluation and the ablation check
included. Only rank 0 writes; every rank explains its share (the crop embedding is split).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from _cheap import FailingWorkerEncoder, SlowWorkerEncoder, cheap_backend
from _tiny import Tiny
from lightning_neurons import NeuronExplainer, load_history
from lightning_neurons.backends.base import Backend
from lightning_neurons.benchmark.common import ProcessGroupCloser
from lightning_neurons.results import ExplanationRound

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["features.0", "features.2", "head"]
N_VAL = 61  # odd: the DistributedSampler pads rank 1 with a duplicate that must not count


def val_data():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(N_VAL, 3, 12, 12, generator=g).round(decimals=1)  # coarse values: ties across ranks
    return TensorDataset(x, torch.randint(0, 3, (N_VAL,), generator=g))


def fit(tmp_path: Path, devices: int, max_epochs: int = 2, **explainer_kwargs) -> Path:
    explainer_kwargs.setdefault("backend", cheap_backend())
    explainer_kwargs.setdefault("top_k", 4)
    cb = NeuronExplainer(
        layers=LAYERS,
        reservoir_size=12,
        vocabulary=["general", "classes"],
        class_names=["zero", "one", "two"],
        evaluate=True,
        ablation=True,
        log_units=2,
        show_progress=False,
        **explainer_kwargs,
    )
    trainer = pl.Trainer(
        strategy="ddp_spawn" if devices > 1 else "auto",
        accelerator="cpu",
        devices=devices,
        max_epochs=max_epochs,
        limit_train_batches=1,
        num_sanity_val_steps=0,
        callbacks=[cb, ProcessGroupCloser()] if devices > 1 else [cb],
        logger=TensorBoardLogger(tmp_path, name="run"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = Tiny(lr=0.0, sync_dist=True)  # weights stay put: compare with one process
    trainer.fit(model, DataLoader(val_data(), batch_size=8), DataLoader(val_data(), batch_size=5))
    return tmp_path / "run" / "version_0" / "neurons"


@pytest.mark.slow  # two spawned processes import Lightning
def test_ddp_spawn_two_processes_explain_exactly_what_one_does(tmp_path):
    # top_k 10: more top samples than the previews show (8 per unit), so the ranks split the other pairs' boxes.
    one = load_history(fit(tmp_path / "one", devices=1, top_k=10))
    two_dir = fit(tmp_path / "two", devices=2, top_k=10)
    two = load_history(two_dir)
    assert one.epochs == two.epochs == [0, 1]
    assert len(one) == len(two) == 2 * (6 + 8 + 3)
    for a, b in zip(one.records, two.records):
        assert a.key == b.key
        assert a.explanation.description == b.explanation.description, a.key
        assert a.explanation.top_sample_ids == b.explanation.top_sample_ids, a.key
        assert a.explanation.score == pytest.approx(b.explanation.score, abs=1e-5, nan_ok=True)
        assert a.explanation.ablation == b.explanation.ablation
        # Multi-concept explanations (on by default): the same combination, concepts in order, weights within 1e-4.
        ca, cb = a.explanation.combination or [], b.explanation.combination or []
        assert [c.text for c in ca] == [c.text for c in cb], a.key
        assert [c.score for c in ca] == pytest.approx([c.score for c in cb], abs=1e-4), a.key
        assert (a.drift.changed, a.drift.concepts_changed) == (b.drift.changed, b.drift.concepts_changed), a.key
    # Each rank found the boxes of one chunk of the pairs; gathered, they are the boxes one process finds (the round
    # files keep them; the history does not). Not vacuous: conv units have boxes smaller than the 12 px image.
    one_dir = tmp_path / "one" / "run" / "version_0" / "neurons"
    for epoch in (0, 1):
        boxes_one, boxes_two = (
            {(u.layer, u.unit): u.boxes for u in ExplanationRound.from_json(d / f"round_epoch={epoch}.json").units}
            for d in (one_dir, two_dir)
        )
        assert boxes_one == boxes_two
    conv_boxes = [b for (layer, _), bs in boxes_two.items() if layer != "head" for b in bs]
    assert conv_boxes and any(tuple(b) != (0, 0, 12, 12) for b in conv_boxes)
    # The comparison above is not vacuous either: units are described, and their kinds (from per-round nulls) agree.
    assert sum(bool(r.explanation.description) for r in one.records) >= len(one.records) // 2
    assert [r.explanation.kind for r in one.records] == [r.explanation.kind for r in two.records]
    # rank 0 wrote one TensorBoard run, the rounds and the report; evaluation metrics were computed
    rounds = sorted(p.name for p in two_dir.glob("round_epoch=*.json"))
    assert rounds == ["round_epoch=0.json", "round_epoch=1.json"]
    evaluation = json.loads((two_dir / "round_epoch=1.json").read_text())["evaluation"]
    reference = json.loads((tmp_path / "one" / "run" / "version_0" / "neurons" / "round_epoch=1.json").read_text())[
        "evaluation"
    ]
    assert evaluation["metrics"]["probe_samples"] == reference["metrics"]["probe_samples"] > 0
    assert evaluation["metrics"]["simulation"] == pytest.approx(reference["metrics"]["simulation"], abs=1e-4)
    assert set(evaluation["baselines"]) == set(reference["baselines"])
    assert list((tmp_path / "two" / "run").iterdir()) == [tmp_path / "two" / "run" / "version_0"]


def round_meta(run_dir: Path, epoch: int) -> dict:
    return json.loads((run_dir / f"round_epoch={epoch}.json").read_text())["meta"]


@pytest.mark.slow  # two spawned processes import Lightning
def test_ddp_with_async_explain_rank_zero_explains_alone_in_the_background_and_equals_one_process(tmp_path):
    """async_explain=True under DDP: rank 0 explains each round alone in its worker (no collective there) while both
    ranks train on; the rounds equal a one-process run's, filed once, under their own epochs."""
    one = load_history(fit(tmp_path / "one", devices=1, async_explain=False))
    two_dir = fit(tmp_path / "two", devices=2, async_explain=True)
    two = load_history(two_dir)
    assert one.epochs == two.epochs == [0, 1]
    for a, b in zip(one.records, two.records, strict=True):
        assert a.key == b.key
        assert (a.explanation.description, a.explanation.kind) == (b.explanation.description, b.explanation.kind)
        assert a.explanation.top_sample_ids == b.explanation.top_sample_ids, a.key
        assert a.explanation.score == pytest.approx(b.explanation.score, abs=1e-5, nan_ok=True)
    assert sum(bool(r.explanation.description) for r in two.records) >= len(two.records) // 2
    for epoch in (0, 1):  # both rounds ran in rank 0's worker, not in the validation hook
        assert round_meta(two_dir, epoch)["background"]["worker_s"] >= 0


@pytest.mark.slow  # two spawned processes import Lightning
def test_ddp_background_skip_is_decided_by_rank_zero_for_every_rank(tmp_path):
    """when_busy='skip' under DDP: only rank 0 knows its worker is busy. Every rank must skip the same round, or the
    round explained at fit end (shared through collectives) would wait for a rank that never comes."""
    slow = Backend(name="stats", encoder=SlowWorkerEncoder(delay=1.0))
    run_dir = fit(tmp_path, devices=2, max_epochs=3, async_explain=True, when_busy="skip", backend=slow)
    history = load_history(run_dir)
    # Round 0 went to the worker, round 1 came while it was busy (skipped on both ranks), round 2 went to the worker
    # or was skipped too; the last recording is explained by fit end if it was skipped: no rank waited forever.
    assert history.epochs[0] == 0 and history.epochs[-1] == 2
    assert 1 not in history.epochs
    assert "background" in round_meta(run_dir, 0)


@pytest.mark.slow  # two spawned processes import Lightning
@pytest.mark.parametrize("on_error", ["warn", "raise"])
def test_ddp_background_failure_follows_on_error_without_a_rank_left_waiting(tmp_path, on_error):
    """Rank 0's worker fails: 'warn' goes on training on both ranks and files nothing for the failed rounds; 'raise'
    ends the fit with the worker's error instead of leaving rank 1 waiting in a collective."""
    failing = Backend(name="stats", encoder=FailingWorkerEncoder())
    if on_error == "warn":
        run_dir = fit(tmp_path, devices=2, async_explain=True, on_error="warn", backend=failing)
        assert not list(run_dir.glob("round_epoch=*.json"))  # no half-filed round
        return
    with pytest.raises(Exception, match="encoder exploded in the worker"):
        fit(tmp_path, devices=2, async_explain=True, on_error="raise", backend=failing)


@pytest.mark.slow  # two processes launched by Lightning's subprocess launcher, each loading the offline pack
def test_ddp_config_through_the_cli_on_two_cpu_processes(tmp_path):
    """configs/ddp.yaml, reduced to one short epoch on 2 CPU processes (strategy=ddp), through the CLI."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    args = [
        sys.executable,
        "-m",
        "lightning_neurons.cli",
        "fit",
        "--config",
        str(ROOT / "configs" / "ddp.yaml"),
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.max_epochs=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.enable_checkpointing=false",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.callbacks.init_args.backend=embedded",
        "--trainer.callbacks.init_args.backend_kwargs={image_size: 64}",
        "--trainer.callbacks.init_args.vocabulary=[classes]",
        "--trainer.callbacks.init_args.top_k=3",
        "--trainer.callbacks.init_args.every_n_epochs=1",
        "--trainer.callbacks.init_args.show_progress=false",
        "--model.init_args.width=8",
        "--data.init_args.train_per_class=4",
        "--data.init_args.val_per_class=4",
        "--data.init_args.image_size=32",
    ]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    history = load_history(tmp_path / "ddp" / "version_0" / "neurons")
    assert history.epochs == [0]
    assert {r.key[0] for r in history.records} == {"features.block3", "features.block4"}
    assert all(r.explanation.description for r in history.records)


def test_the_cli_destroys_the_process_group_after_a_fit_that_ended_well(tmp_path):
    # Left to interpreter shutdown, gloo's threads aborted about one CLI DDP run in seven after it succeeded
    # ("terminate called without an active exception", exit -6; the test above caught it).
    import torch.distributed as dist

    from lightning_neurons.cli import close_process_group

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        assert dist.is_initialized()
        close_process_group()
        assert not dist.is_initialized()
        close_process_group()  # nothing left: a no-op
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
