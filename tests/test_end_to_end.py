"""Whole-product tests: real Lightning training, the embedded offline backend, history and TensorBoard files.

The "must show" tests of the drift and post-hoc issues: units change meaning when the training data switches
concept, a resumed run reproduces the uninterrupted history, and a checkpoint explained post hoc gives the
descriptions the callback logged for that epoch.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, Subset

from lightning_neurons import NeuronExplainer, explain, load_history
from lightning_neurons.demo import PhotoPatchesDataModule, SmallCNN
from lightning_neurons.demo.data import IMAGE_MEAN, IMAGE_STD
from lightning_neurons.drift.round_store import RoundStore

CLASSES = ["cat", "brick wall", "grass", "coffee cup"]
SWAP = {"cat": "brick wall", "brick wall": "cat"}


class _FixedOrderData(PhotoPatchesDataModule):
    """Training batches mix the classes in one fixed order, the same in every run (resume must replay it)."""

    def train_dataloader(self) -> DataLoader:
        loader = super().train_dataloader()
        order = torch.randperm(len(loader.dataset), generator=torch.Generator().manual_seed(0)).tolist()
        return DataLoader(Subset(loader.dataset, order), batch_size=loader.batch_size, shuffle=False)


def _datamodule(swap_from_epoch: int | None = None) -> PhotoPatchesDataModule:
    return _FixedOrderData(
        classes=CLASSES,
        train_per_class=40,
        val_per_class=8,
        image_size=32,
        batch_size=32,
        shuffle=False,
        swap=SWAP if swap_from_epoch is not None else None,
        swap_from_epoch=swap_from_epoch or 0,
    )


def _explainer(**kwargs) -> NeuronExplainer:
    settings = dict(
        layers=["head"],  # the output units: their meaning is their class, so the truth is known
        top_k=6,
        vocabulary=["classes"],
        reservoir_size=8,
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
        log_units=4,
        show_progress=False,
        on_error="raise",
    )
    settings.update(kwargs)
    return NeuronExplainer(**settings)


def _trainer(root: Path, callbacks: list, max_epochs: int, name: str = "run") -> pl.Trainer:
    return pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=TensorBoardLogger(str(root), name=name, version=0),
        callbacks=callbacks,
        reload_dataloaders_every_n_epochs=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        num_sanity_val_steps=0,
    )


def _descriptions(history, layer: str = "head") -> dict[tuple[int, int], str]:
    return {(r.key[1], r.key[2]): r.explanation.description for r in history.records if r.key[0] == layer}


@pytest.fixture(scope="module")
def drift_run(tmp_path_factory):
    """Five epochs; from epoch 2 on the "cat" class is trained on brick-wall crops and vice versa."""
    root = tmp_path_factory.mktemp("drift")
    pl.seed_everything(0)
    checkpoints = ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, filename="{epoch}")
    explainer = _explainer()
    trainer = _trainer(root, [explainer, checkpoints], max_epochs=5)
    trainer.fit(SmallCNN(num_classes=len(CLASSES), width=8, lr=1e-2), _datamodule(swap_from_epoch=2))
    return root, explainer, trainer


def test_units_acquire_and_change_meaning_at_the_right_epoch(drift_run):
    root, explainer, trainer = drift_run
    assert explainer.num_hooks == 0
    history = load_history(Path(trainer.log_dir) / "neurons")
    assert history.epochs == [0, 1, 2, 3, 4]
    described = _descriptions(history)
    cat, brick = CLASSES.index("cat"), CLASSES.index("brick wall")
    # Before the swap each class unit is named after its own class, afterwards after the swapped photo.
    assert described[(cat, 1)] == "cat" and described[(brick, 1)] == "brick wall"
    assert described[(cat, 4)] == "brick wall" and described[(brick, 4)] == "cat"
    # The untouched classes keep their meaning throughout.
    for unit in (CLASSES.index("grass"), CLASSES.index("coffee cup")):
        assert {described[(unit, e)] for e in range(1, 5)} == {CLASSES[unit]}
    # The descriptions move (text similarity below the drift threshold) only with the data switch: ...
    moved = {(d.unit, d.epoch) for d in history.drift() if d.similarity is not None and d.similarity < d.threshold}
    assert all(epoch >= 2 for _, epoch in moved)  # nothing moves before the data switch ...
    first_move = {unit: min(e for u, e in moved if u == unit) for unit in (cat, brick)}
    assert min(first_move.values()) == 2  # ... the first swapped unit moves in the epoch of the switch ...
    assert {u for u, _ in moved} == {cat, brick}  # ... and only the swapped units ever move
    # ... but a move counts as a change of meaning only between two rounds of kind "concept" (issue 21): on
    # 32-pixel patches with 8 reservoir images these class units are not told apart from colour statistics
    # (kinds "unclear" / "low_level"), so the swap is not claimed as a change, a gain or a loss of a concept.
    kinds = {(r.key[1], r.key[2]): r.explanation.kind for r in history.records}
    for d in history.drift():
        both = (
            d.previous_epoch is not None and kinds[(d.unit, d.previous_epoch)] == kinds[(d.unit, d.epoch)] == "concept"
        )
        assert d.changed == (both and (d.unit, d.epoch) in moved)
        if d.previous_epoch is not None and "dead" not in (kinds[(d.unit, d.epoch)], kinds[(d.unit, d.previous_epoch)]):
            assert d.gained == (kinds[(d.unit, d.epoch)] == "concept" != kinds[(d.unit, d.previous_epoch)])
            assert d.lost == (kinds[(d.unit, d.previous_epoch)] == "concept" != kinds[(d.unit, d.epoch)])
        else:
            assert not (d.gained or d.lost)  # a first round or a dead unit never gains or loses a concept
    events_of_meaning = {d.unit for d in history.drift() if d.changed or d.gained or d.lost}
    assert events_of_meaning <= {cat, brick}  # an untouched unit is never reported as changing meaning
    # What every sink shows follows the kind: the best concept only for kind "concept".
    for r in history.records:
        assert (r.explanation.shown == r.explanation.description) == (r.explanation.kind == "concept")

    # TensorBoard shows the same: the per-layer table and the per-unit description at global_step = epoch.
    events = EventAccumulator(trainer.log_dir, size_guidance={"tensors": 0, "images": 0, "scalars": 0}).Reload()
    text_tags = events.Tags()["tensors"]
    assert "neurons/head/table/text_summary" in text_tags
    steps = [e.step for e in events.Tensors(f"neurons/head/{cat}/description/text_summary")]
    assert steps == [0, 1, 2, 3, 4]
    last = events.Tensors(f"neurons/head/{cat}/description/text_summary")[-1]
    card, final = last.tensor_proto.string_val[0].decode(), history.get("head", cat, 4).explanation
    assert final.description == "brick wall" and final.shown in card  # the shown text, as every sink shows it
    assert ("brick wall" in card) == (final.kind == "concept")  # the best concept only where it is a concept
    fraction = {e.step: e.value for e in events.Scalars("neurons/head/fraction_changed")}
    n_changed = {e: sum(d.changed for d in history.drift() if d.epoch == e) for e in range(1, 5)}
    assert fraction[1] == 0.0 and all(fraction[e] == pytest.approx(n_changed[e] / 4) for e in range(1, 5))
    assert any(tag.endswith("/top_k") for tag in events.Tags()["images"])
    assert (Path(trainer.log_dir) / "neurons" / "report.html").stat().st_size > 1000


def test_resume_from_mid_run_checkpoint_reproduces_history(drift_run, tmp_path):
    root, _, trainer = drift_run
    uninterrupted = load_history(Path(trainer.log_dir) / "neurons")
    pl.seed_everything(0)
    explainer = _explainer()
    resumed_trainer = _trainer(tmp_path, [explainer], max_epochs=5, name="resumed")
    resumed_trainer.fit(
        SmallCNN(num_classes=len(CLASSES), width=8, lr=1e-2),
        _datamodule(swap_from_epoch=2),
        ckpt_path=str(root / "ckpt" / "epoch=1.ckpt"),
    )
    resumed = load_history(Path(resumed_trainer.log_dir) / "neurons")
    assert resumed.epochs == [0, 1, 2, 3, 4]  # no gap, no duplicate
    assert _descriptions(resumed) == _descriptions(uninterrupted)
    store = RoundStore(Path(resumed_trainer.log_dir) / "neurons" / "history")
    assert [f.epoch for f in store.files()] == [0, 1, 2, 3, 4]  # each round written once
    frame = resumed.to_pandas()
    keys = list(zip(frame["unit"], frame["epoch"]))
    assert len(keys) == len(set(keys))


def test_posthoc_checkpoint_reproduces_logged_descriptions(drift_run, tmp_path):
    root, explainer, trainer = drift_run
    logged = explainer.rounds[3]
    assert logged.epoch == 3
    model = SmallCNN.load_from_checkpoint(str(root / "ckpt" / "epoch=3.ckpt"))
    datamodule = _datamodule()
    datamodule.setup("validate")
    rnd = explain(
        model,
        datamodule.val_dataloader(),
        ["head"],
        top_k=6,
        epoch=3,
        output_dir=tmp_path / "posthoc",
        vocabulary=["classes"],
        class_names=CLASSES,
        reservoir_size=8,
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
        show_progress=False,
    )
    assert [u.description for u in rnd.units] == [u.description for u in logged.units]
    assert [u.top_sample_ids for u in rnd.units] == [u.top_sample_ids for u in logged.units]
    assert load_history(tmp_path / "posthoc").epochs == [3]


def test_validate_after_fit_continues_the_same_history(tmp_path):
    """A callback reused for trainer.validate keeps its history and file in line (no rewrite, no warning)."""
    import warnings

    pl.seed_everything(0)
    explainer = _explainer(layers=["head"], top_k=3)
    trainer = _trainer(tmp_path, [explainer], max_epochs=1)
    model = SmallCNN(num_classes=len(CLASSES), width=4)
    data = _datamodule()
    trainer.fit(model, data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. "history.jsonl already holds history records"
        warnings.filterwarnings("ignore", message=".*(num_workers|LeafSpec|log_every_n_steps).*")
        trainer.validate(model, data)
    history = load_history(Path(trainer.log_dir) / "neurons")
    # validate after fit files its round under the epoch that last trained the weights (round identity): epoch 0
    # of a one-epoch fit, the same weights as fit's round, so it replaces that epoch instead of adding an epoch 1.
    assert history.epochs == [0] and explainer.num_hooks == 0
    assert len(history) == len(explainer.rounds[-1].units)  # replaced, not duplicated
    assert [r.epoch for r in explainer.rounds] == [0, 0]
    assert explainer.rounds[0].identity.weights == explainer.rounds[1].identity.weights
