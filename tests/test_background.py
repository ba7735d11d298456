"""Background explanation (``async_explain``) and the region-embedding cache, with a real Trainer.

The real callback, session, pipeline and writers run; the encoder is the cheap real one of ``_cheap.py``, wrapped so
that a test decides when the worker may go on (a gate), or makes the worker fail. Nothing asserts a time.
"""

import csv
import threading
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _cheap import StatsEncoder
from _tiny import Tiny
from _tiny import quiet_trainer as _quiet_trainer
from lightning_neurons import NeuronExplainer, load_history
from lightning_neurons.backends.base import Backend
from lightning_neurons.background import frozen_copy

UNITS = 8 + 3  # features.2 (8 channels) + head (3 units)


def loaders():
    g = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.rand(24, 3, 10, 10, generator=g), torch.randint(0, 3, (24,), generator=g))
    val = TensorDataset(torch.rand(20, 3, 10, 10, generator=g), torch.randint(0, 3, (20,), generator=g))
    return DataLoader(train, batch_size=4), DataLoader(val, batch_size=5)


class GatedEncoder(StatsEncoder):
    """Off the main thread (the worker), image embedding waits for ``gate``; ``fail`` makes it raise instead."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.fail = fail
        self.worker_calls = 0

    def encode_images(self, images):
        if threading.current_thread() is not threading.main_thread():
            self.worker_calls += 1
            if self.fail:
                raise RuntimeError("encoder exploded in the worker")
            assert self.gate.wait(60), "the test never opened the gate"
        return super().encode_images(images)


class Observer(Callback):
    """Opens the gate once training reached ``open_at_epoch``; notes when the explainer filed its first round."""

    def __init__(self, explainer: NeuronExplainer, encoder: GatedEncoder, open_at_epoch: int = 1) -> None:
        self.explainer, self.encoder, self.open_at_epoch = explainer, encoder, open_at_epoch
        self.filed_at: tuple[int, int] | None = None
        self.busy_at_fit_end: bool | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch >= self.open_at_epoch and not self.encoder.gate.is_set():
            self.encoder.gate.set()
            self.explainer._background.wait(60)  # the worker finishes now; the explainer files it at its next hook
        if self.filed_at is None and self.explainer.rounds:
            self.filed_at = (trainer.current_epoch, trainer.global_step)

    def on_fit_end(self, trainer, pl_module):
        self.busy_at_fit_end = self.explainer._background.busy
        self.encoder.gate.set()


def explainer(encoder, **kwargs):
    kwargs.setdefault("layers", ["features.2", "head"])
    kwargs.setdefault("top_k", 3)
    kwargs.setdefault("vocabulary", ["general"])
    kwargs.setdefault("show_progress", False)
    kwargs.setdefault("async_explain", True)  # these fits run on the CPU, where "auto" keeps rounds in the hook
    return NeuronExplainer(backend=Backend(name="stats", encoder=encoder), **kwargs)


def quiet_trainer(tmp_path, callbacks, max_epochs=2, logger=False, **kwargs):
    kwargs.setdefault("num_sanity_val_steps", 0)
    return _quiet_trainer(callbacks, root=tmp_path, logger=logger, max_epochs=max_epochs, **kwargs)


def fit(tmp_path, callbacks, max_epochs=2, loggers=None, **kwargs):
    logger = loggers if loggers is not None else TensorBoardLogger(tmp_path, name="run")
    trainer = quiet_trainer(tmp_path, callbacks, max_epochs, logger, **kwargs)
    trainer.fit(Tiny(), *loaders())
    return trainer


def table_steps(run_dir: Path, tag: str) -> list[int]:
    events = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    events.Reload()
    return [e.step for e in events.Tensors(f"{tag}/text_summary")]


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_background_round_lands_in_every_sink_under_its_epoch_after_training_moved_on(tmp_path):
    encoder = GatedEncoder()
    cb = explainer(encoder)
    observer = Observer(cb, encoder, open_at_epoch=1)
    tb, csv_logger = TensorBoardLogger(tmp_path, name="run"), CSVLogger(tmp_path, name="csv")
    trainer = fit(tmp_path, [cb, observer], max_epochs=3, loggers=[tb, csv_logger])
    assert encoder.worker_calls > 0  # the rounds ran in the worker
    assert [r.epoch for r in cb.rounds] == [0, 1, 2]
    # round 0 was handed off at the end of epoch 0 and filed while epoch 1 trained, still as epoch 0
    assert observer.filed_at is not None and observer.filed_at[0] == 1
    assert cb.rounds[0].meta["background"]["queued_s"] >= 0
    run_dir = Path(tb.log_dir)
    assert table_steps(run_dir, "neurons/head/table") == [0, 1, 2]
    history = load_history(run_dir / "neurons")
    assert history.epochs == [0, 1, 2] and len(history) == 3 * UNITS
    assert sorted(p.name for p in (run_dir / "neurons").glob("round_epoch=*.json")) == [
        "round_epoch=0.json",
        "round_epoch=1.json",
        "round_epoch=2.json",
    ]
    with open(Path(csv_logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("neurons/head/mean_score")]
    steps_per_epoch = 6
    # the CSV's step axis is the global step captured at hand-off (end of each epoch), not when it was filed
    assert [int(r["step"]) for r in rows] == [steps_per_epoch * (e + 1) - 1 for e in range(3)] or [
        int(r["step"]) for r in rows
    ] == [steps_per_epoch * (e + 1) for e in range(3)]
    assert "neurons/head/mean_score" in trainer.callback_metrics
    assert hook_count(trainer.lightning_module) == 0


def test_auto_keeps_a_cpu_runs_rounds_in_the_validation_hook_and_says_why(tmp_path, caplog):
    # On the CPU a background round competes with training for the same cores: measured slower on 2 cores
    # (benchmarks/train_overhead.py), so the default runs rounds where they were recorded, and says so once.
    import logging

    encoder = GatedEncoder()
    cb = explainer(encoder, async_explain="auto")
    with caplog.at_level(logging.INFO, logger="lightning_neurons"):
        fit(tmp_path, [cb], max_epochs=2, limit_train_batches=2)
    assert [r.epoch for r in cb.rounds] == [0, 1]
    assert encoder.worker_calls == 0 and not any("background" in r.meta for r in cb.rounds)
    said = [r.getMessage() for r in caplog.records if "rounds run in the validation hook" in r.getMessage()]
    assert len(said) == 1 and "trains on the CPU" in said[0] and "async_explain=True" in said[0]
    assert NeuronExplainer(layers=["head"]).config.speed.async_explain == "auto"  # the default
    with pytest.raises(ValueError, match="async_explain must be True, False or 'auto'"):
        NeuronExplainer(layers=["head"], async_explain="sometimes")


def test_fit_end_waits_for_the_round_in_flight(tmp_path):
    encoder = GatedEncoder()
    cb = explainer(encoder, every_n_epochs=2, explain_on_fit_end=False)
    observer = Observer(cb, encoder, open_at_epoch=99)  # opened only in on_fit_end, before the explainer's
    trainer = fit(tmp_path, [observer, cb], max_epochs=2)
    assert observer.busy_at_fit_end is True  # the last round was still in the background when fit ended
    assert [r.epoch for r in cb.rounds] == [1]
    assert load_history(Path(trainer.log_dir) / "neurons").epochs == [1]
    assert table_steps(Path(trainer.log_dir), "neurons/head/table") == [1]


def test_worker_failure_warns_and_training_goes_on(tmp_path):
    cb = explainer(GatedEncoder(fail=True), on_error="warn")
    with pytest.warns(UserWarning, match=r"explaining round 0 failed \(RuntimeError: encoder exploded in the worker"):
        trainer = fit(tmp_path, [cb], max_epochs=2, limit_train_batches=2)
    assert cb.rounds == [] and trainer.global_step == 4  # both epochs trained
    assert hook_count(trainer.lightning_module) == 0


def test_worker_failure_raises_on_the_main_thread_with_on_error_raise(tmp_path):
    cb = explainer(GatedEncoder(fail=True), on_error="raise")
    model = Tiny()
    trainer = quiet_trainer(tmp_path, [cb], max_epochs=3)
    with pytest.raises(RuntimeError, match="encoder exploded in the worker"):
        trainer.fit(model, *loaders())
    assert trainer.current_epoch < 3 and cb.rounds == []
    assert hook_count(model) == 0


def test_checkpoint_taken_while_a_round_is_in_flight_holds_finished_rounds_only(tmp_path):
    encoder = GatedEncoder()
    cb = explainer(encoder, history_dir=str(tmp_path / "hist"))
    observer = Observer(cb, encoder, open_at_epoch=1)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    fit(tmp_path, [cb, observer, ckpt], max_epochs=2)
    state = torch.load(tmp_path / "ckpt" / "epoch=0.ckpt", weights_only=False)["callbacks"][cb.state_key]
    # saved at the end of epoch 0 while round 0 was in the background: no trace of it
    assert state["last_explained_epoch"] is None and state["last_recording_explained"] is False
    assert state["pending_round"] == 0
    history_state = state["session"]["history"]
    assert not history_state.get("records") and not history_state.get("store", {}).get("rounds")
    # a run resumed from it explains the later epochs; every round on disk is whole, each epoch once
    resumed = explainer(StatsEncoder(), history_dir=str(tmp_path / "hist"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = quiet_trainer(tmp_path, [resumed], max_epochs=3)
        trainer.fit(Tiny(), *loaders(), ckpt_path=tmp_path / "ckpt" / "epoch=0.ckpt")
    # the round in flight at the checkpoint is explained again on resume (the checkpoint has its weights), then
    # the later ones; the file's rounds are whole, each epoch once
    assert [r.epoch for r in resumed.rounds] == [0, 1, 2]
    history = load_history(tmp_path / "hist")
    assert history.epochs == [0, 1, 2]
    assert all(len([r for r in history.records if r.explanation.epoch == e]) == UNITS for e in history.epochs)


def test_when_busy_skip_skips_the_next_round_with_a_warning(tmp_path):
    encoder = GatedEncoder()
    cb = explainer(encoder, when_busy="skip", explain_on_fit_end=False)
    observer = Observer(cb, encoder, open_at_epoch=2)  # round 0 is still in flight at the end of epoch 1
    with pytest.warns(UserWarning, match="round 1 is skipped: round 0 is still being explained"):
        fit(tmp_path, [cb, observer], max_epochs=3)
    assert [r.epoch for r in cb.rounds] == [0, 2]


def test_frozen_copy_has_the_weights_and_no_recording_hooks():
    from lightning_neurons.recording.recorder import ActivationRecorder

    model = Tiny()
    recorder = ActivationRecorder(model, ["features.2", "head"], top_k=2).attach()
    keep = model.head.register_forward_hook(lambda m, a, out: None)  # the user's own hook stays
    twin = frozen_copy(model)
    recorder.detach()
    assert hook_count(twin) == 1 and twin._trainer is None
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))
    assert not twin.training and not any(p.requires_grad for p in twin.parameters())
    keep.remove()
    assert hook_count(model) == 0


# ---------------------------------------------------------------------- the region-embedding cache
class CountingEncoder(StatsEncoder):
    def __init__(self) -> None:
        super().__init__()
        self.images = 0

    def encode_images(self, images):
        self.images += images.shape[0]
        return super().encode_images(images)


def test_cache_gives_the_same_rounds_and_embeds_each_region_once(tmp_path):
    rounds = {}
    counts = {}
    for cached in (False, True):
        encoder = CountingEncoder()
        cb = explainer(encoder, async_explain=False, embedding_cache=cached)
        fit(tmp_path / str(cached), [cb], max_epochs=3, limit_train_batches=1)
        rounds[cached], counts[cached] = cb.rounds, encoder.images
    for plain, cached in zip(rounds[False], rounds[True]):
        assert [(u.key, u.description, u.alternatives) for u in plain.units] == [
            (u.key, u.description, u.alternatives) for u in cached.units
        ]
        assert torch.allclose(
            torch.tensor([u.score for u in plain.units]), torch.tensor([u.score for u in cached.units]), atol=1e-6
        )
        assert "embedding_cache" not in plain.meta
    stats = [r.meta["embedding_cache"] for r in rounds[True]]
    assert stats[0]["misses"] > 0
    # later rounds reuse the regions of earlier ones (the control crops at least: same reservoir, same boxes)
    assert all(s["hits"] > 0 for s in stats[1:])
    assert counts[True] < counts[False]
    assert counts[True] <= sum(s["misses"] for s in stats)  # only misses reach the encoder


def test_cache_is_bounded_by_bytes():
    from lightning_neurons.explanation.embedding_cache import RegionEmbeddingCache

    cache = RegionEmbeddingCache(max_bytes=3 * (4 * 32 + 256))
    bank = (torch.rand(4, 3, 8, 8) * 255).to(torch.uint8)
    keys = cache.sample_keys(torch.arange(4), bank)
    boxes = torch.tensor([[0, 0, 8, 8]] * 4)
    cache.embed(StatsEncoder(), bank, torch.arange(4), boxes, keys, crop_size=8, batch_size=2)
    assert len(cache) == 3 and cache.evictions == 1 and cache.nbytes <= cache.max_bytes
    # sample 0 was evicted (least recently used); samples 1-3 hit
    cache.embed(StatsEncoder(), bank, torch.arange(1, 4), boxes[:3], keys, crop_size=8, batch_size=2)
    assert cache.hits == 3
    # other pixels under the same id miss: the key holds the pixels' fingerprint
    other = bank.clone()
    other[1] = 255 - other[1]
    cache.embed(
        StatsEncoder(),
        other,
        torch.tensor([1]),
        boxes[:1],
        cache.sample_keys(torch.arange(4), other),
        crop_size=8,
        batch_size=2,
    )
    assert cache.misses == 5


def test_the_explainer_pickles_for_ddp_spawn_without_its_worker():
    # ddp_spawn pickles the Trainer's callbacks; the worker's thread lock made that fail ("cannot pickle
    # '_thread.lock' object") once background rounds were on by default.
    import pickle

    from lightning_neurons import NeuronExplainer

    explainer = NeuronExplainer(layers=["net.0"])
    twin = pickle.loads(pickle.dumps(explainer))
    assert twin._background.outstanding is None and not twin._background.busy
    assert twin._background.collect() == []  # its lock works in the new process
