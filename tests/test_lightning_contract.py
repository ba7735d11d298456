"""The Lightning contract in real use: schedules, several explainers, resume, early failures, odd forwards.

Every test runs the real callback, session, pipeline and writers (a cheap real encoder as the Backend).
"""

import logging
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _cheap import cheap_backend
from _tiny import Tiny, quiet_trainer
from lightning_neurons import NeuronExplainer, load_history


def data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 3, 10, 10, generator=g), torch.randint(0, 3, (n,), generator=g))


def loaders():
    return DataLoader(data(24), batch_size=4), DataLoader(data(20, seed=1), batch_size=5)


def explainer(**kwargs):
    kwargs.setdefault("layers", ["features.2", "head"])
    kwargs.setdefault("top_k", 3)
    kwargs.setdefault("backend", cheap_backend())
    kwargs.setdefault("vocabulary", ["general"])
    kwargs.setdefault("show_progress", False)
    return NeuronExplainer(**kwargs)


def trainer(tmp_path, callbacks, logger=True, **kwargs):
    kwargs.setdefault("max_epochs", 2)
    kwargs.setdefault("num_sanity_val_steps", 0)
    logger = TensorBoardLogger(tmp_path, name="run") if logger is True else logger
    return quiet_trainer(callbacks, root=tmp_path, logger=logger, **kwargs)


def table_steps(run_dir: Path, tag: str) -> list[int]:
    events = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    events.Reload()
    return [e.step for e in events.Tensors(f"{tag}/text_summary")]


def hook_count(model):
    return sum(len(m._forward_hooks) for m in model.modules())


# ---------------------------------------------------------------------- schedules
def test_several_validation_passes_per_epoch_explain_the_end_of_epoch_pass_once(tmp_path):
    cb = explainer()
    t = trainer(tmp_path, cb, val_check_interval=0.5)
    t.fit(Tiny(), *loaders())
    assert [r.epoch for r in cb.rounds] == [0, 1]  # no second round at fit end
    history = load_history(Path(t.log_dir) / "neurons")
    assert history.epochs == [0, 1] and len(history) == 2 * (8 + 3)
    assert table_steps(Path(t.log_dir), "neurons/head/table") == [0, 1]  # one table per step
    # the explained pass is the last one of the epoch: a fresh validation of the final weights matches it
    final = explainer()
    trainer(tmp_path / "check", final).validate(t.lightning_module, loaders()[1], verbose=False)
    assert (
        final.last_recording.layers["head"].sample_ids.tolist() == cb.last_recording.layers["head"].sample_ids.tolist()
    )


def test_fast_dev_run_explains_nothing_and_says_so_once(tmp_path, caplog):
    cb = explainer()
    with caplog.at_level(logging.INFO), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*(num_workers|LeafSpec|log_every_n_steps|fast_dev_run).*")
        trainer(tmp_path, cb, fast_dev_run=True).fit(Tiny(), *loaders())
    assert cb.rounds == [] and cb.last_recording is None
    assert [r.message for r in caplog.records if "NeuronExplainer" in r.message] == [
        f"NeuronExplainer[{cb.identity}]: fast_dev_run is on, so no round is explained"
    ]
    assert not list(tmp_path.rglob("history.jsonl")) and not list(tmp_path.rglob("round-*.parquet"))


def test_schedule_that_validation_cannot_serve_warns_at_setup(tmp_path):
    cb = explainer(every_n_epochs=2, explain_on_fit_end=False)
    with pytest.warns(UserWarning, match=r"epochs \[1, 3\] are scheduled .* only epochs \[5\] will be explained"):
        trainer(tmp_path, cb, max_epochs=6, check_val_every_n_epoch=3, limit_train_batches=1).fit(Tiny(), *loaders())
    assert [r.epoch for r in cb.rounds] == [5]


def test_step_based_validation_keys_rounds_by_global_step(tmp_path):
    cb = explainer()
    t = trainer(tmp_path, cb, max_epochs=None, max_steps=9, check_val_every_n_epoch=None, val_check_interval=3)
    t.fit(Tiny(), *loaders())  # 6 training batches per epoch: passes at steps 3, 6 (epoch 1), 9
    assert [r.epoch for r in cb.rounds] == [3, 6, 9]
    assert load_history(Path(t.log_dir) / "neurons").epochs == [3, 6, 9]
    assert table_steps(Path(t.log_dir), "neurons/head/table") == [3, 6, 9]


# ---------------------------------------------------------------------- several explainers
def test_two_explainers_write_their_own_folders_prefixes_and_state(tmp_path):
    a = explainer(layers=["features.2"])
    b = explainer(layers=["head"])
    t = trainer(tmp_path, [a, b])
    t.fit(Tiny(), *loaders())
    run = Path(t.log_dir)
    assert a.identity == "features.2-stats-general" and b.identity == "head-stats-general"
    fa, fb = run / f"neurons-{a.identity}", run / f"neurons-{b.identity}"
    assert load_history(fa).layers == ["features.2"] and load_history(fb).layers == ["head"]
    assert (fa / "report.html").is_file() and (fb / "report.html").is_file()
    assert a.outputs()["History"] == fa / "history"
    assert table_steps(run, f"neurons-{b.identity}/head/table") == [0, 1]
    assert table_steps(run, f"neurons-{a.identity}/features.2/table") == [0, 1]
    assert a.state_key != b.state_key


def test_explainers_on_one_layer_that_differ_in_backend_or_predicate_coexist(tmp_path):
    first = explainer(layers=["head"])
    other_vocabulary = explainer(layers=["head"], vocabulary=["general", "classes"], class_names=["a", "b", "c"])
    one = explainer(layers=lambda name, m: name == "head")
    two = explainer(layers=lambda name, m: name == "features.2")
    callbacks = [first, other_vocabulary, one, two]
    assert len({cb.state_key for cb in callbacks}) == 4
    t = trainer(tmp_path, callbacks, max_epochs=1)  # Trainer() raises on duplicate state keys
    t.fit(Tiny(), *loaders())
    assert all(len(cb.rounds) == 1 for cb in callbacks)
    assert len({tuple(cb.outputs().values()) for cb in callbacks}) == 4


def test_resume_with_changed_layers_warns_and_continues_the_common_layers(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = explainer(layers=["features.2", "head"])
    trainer(tmp_path, [first, ckpt], logger=False, limit_train_batches=1).fit(Tiny(), *loaders())
    # Another derived name, another state key; the same top_k (another one would start a new drift baseline).
    resumed = explainer(layers=["head"])
    with pytest.warns(UserWarning, match="layers changed"):
        trainer(
            tmp_path,
            [resumed, ModelCheckpoint(dirpath=tmp_path / "ckpt2")],
            logger=False,
            max_epochs=3,
            limit_train_batches=1,
        ).fit(Tiny(), *loaders(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    history = load_history(tmp_path / "neurons")
    assert history.epochs == [0, 1, 2]
    assert [r.key[2] for r in history.records if r.key[:2] == ("head", 0)] == [0, 1, 2]
    assert history.get("head", 0, 2).drift.previous_epoch == 1  # drift continued across the resume


# ---------------------------------------------------------------------- failing early
class TupleOut(nn.Module):
    def forward(self, x):
        return x, x.mean()


class FiveD(nn.Module):
    def forward(self, x):
        return x[:, :, None]


class Tokens(nn.Module):
    def forward(self, x):
        return x.flatten(2).transpose(1, 2)[:, :7]  # 7 tokens: no square grid, no class token + square


class WithBlock(Tiny):
    """Tiny with an extra block on the conv features whose output the explainer is pointed at."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x):
        h = self.features(x)
        self.block(h)  # runs (so its hook fires); the head does not need it
        return self.head(h.amax(dim=(2, 3)))


@pytest.mark.parametrize(
    ("block", "match"), [(TupleOut(), "output_selector"), (FiveD(), "shape"), (Tokens(), "square")]
)
def test_unsupported_layer_outputs_fail_before_the_first_training_step(tmp_path, block, match):
    model = WithBlock(block)
    with pytest.raises(ValueError, match=match):
        trainer(tmp_path, explainer(layers=["block"], on_error="warn")).fit(model, *loaders())
    assert model.train_steps == 0 and hook_count(model) == 0


def test_unwritable_history_dir_fails_in_setup(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    model = Tiny()
    with pytest.raises(PermissionError, match="history_dir"):
        trainer(tmp_path, explainer(history_dir=str(blocker / "neurons"))).fit(model, *loaders())
    assert model.train_steps == 0


# ---------------------------------------------------------------------- odd forwards, validate
class HFStyle(pl.LightningModule):
    """Hugging Face style: the steps call ``self.model(pixel_values=...)``, ``forward`` is not ``forward(images)``."""

    def __init__(self) -> None:
        super().__init__()
        self.model = _PixelModel()

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.model(pixel_values=batch["pixel_values"]), batch["labels"])

    def validation_step(self, batch, batch_idx):
        self.log(
            "val_loss", nn.functional.cross_entropy(self.model(pixel_values=batch["pixel_values"]), batch["labels"])
        )

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class _PixelModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 5, 3)
        self.classifier = nn.Linear(5, 3)

    def forward(self, pixel_values):
        return self.classifier(self.conv(pixel_values).amax(dim=(2, 3)))


def _dict_batches(dataset):
    return [{"pixel_values": x, "labels": y} for x, y in DataLoader(dataset, batch_size=5)]


def pixel_forward(module, images):
    return module.model(pixel_values=images)


def test_forward_fn_explains_a_model_whose_forward_is_not_forward_images(tmp_path):
    class Batches(torch.utils.data.Dataset):
        def __init__(self, dataset):
            self.items = [{"pixel_values": x, "labels": y} for x, y in dataset]

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    cb = explainer(layers=["model.conv"], forward_fn=pixel_forward, ablation=True)
    train = DataLoader(Batches(data(24)), batch_size=4)
    val = DataLoader(Batches(data(20, seed=1)), batch_size=5)
    trainer(tmp_path, cb, max_epochs=1).fit(HFStyle(), train, val)
    assert len(cb.rounds) == 1 and all(u.description or u.kind == "dead" for u in cb.rounds[0])
    assert any(u.description for u in cb.rounds[0])
    assert any(u.ablation for u in cb.rounds[0])


def test_validate_with_ckpt_path_files_the_round_under_the_checkpoints_epoch(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    cb = explainer(layers=["head"])
    t = trainer(tmp_path, [cb, ckpt], max_epochs=3, limit_train_batches=1)
    model = Tiny()
    t.fit(model, *loaders())
    run = Path(t.log_dir) / "neurons"
    before = load_history(run)
    assert before.epochs == [0, 1, 2]
    t.validate(model, loaders()[1], ckpt_path=str(tmp_path / "ckpt" / "epoch=1.ckpt"), verbose=False)
    assert cb.rounds[-1].epoch == 1
    after = load_history(run)
    assert after.epochs == [0, 1, 2]  # the later history is kept
    for unit in range(3):
        assert after.get("head", unit, 1).explanation.description == cb.rounds[-1].get("head", unit).description
        assert after.get("head", unit, 2).explanation.description == before.get("head", unit, 2).explanation.description


def test_sharded_strategies_are_refused_in_setup_not_left_to_hang(tmp_path):
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy

    from lightning_neurons.callback import refuse_sharded_strategy

    refuse_sharded_strategy(DDPStrategy())
    with pytest.raises(ValueError, match="FSDPStrategy.*explain_checkpoints"):
        refuse_sharded_strategy(FSDPStrategy())

    class MyDeepSpeed(DeepSpeedStrategy):  # a subclass is sharded as well
        def __init__(self):
            pass

    with pytest.raises(ValueError, match="DeepSpeedStrategy"):
        refuse_sharded_strategy(MyDeepSpeed())
    # NeuronExplainer.setup calls it first (FSDP itself needs a GPU, so the full fit cannot run on this CPU)
    import inspect

    assert "refuse_sharded_strategy(trainer.strategy)" in inspect.getsource(NeuronExplainer.setup)


# ---------------------------------------------------------------------- monitors and run folders
class Frozen(Tiny):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_early_stopping_on_fraction_changed_stops_a_real_fit(tmp_path):
    from lightning.pytorch.callbacks import EarlyStopping

    stop = EarlyStopping(monitor="neurons/head/fraction_changed", mode="min", patience=1)
    cb = explainer(layers=["head"])
    t = trainer(tmp_path, [cb, stop], max_epochs=10, limit_train_batches=1)
    t.fit(Frozen(), *loaders())
    # frozen weights: 1.0 at the first round (nothing to compare), then 0.0, 0.0 -> no improvement -> stop
    assert stop.stopped_epoch == 2 and t.current_epoch == 3
    assert [r.epoch for r in cb.rounds] == [0, 1, 2]
    assert float(t.callback_metrics["neurons/head/fraction_changed"]) == 0.0
    assert "neurons/head/mean_score" in t.callback_metrics


def test_every_run_gets_its_own_folder_with_mlflow_and_csv_loggers(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import CSVLogger, MLFlowLogger

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    folders = []
    for _ in range(2):
        cb = explainer(layers=["head"])
        mlflow = MLFlowLogger(experiment_name="neurons", tracking_uri=f"file:{tmp_path / 'mlruns'}")
        t = trainer(tmp_path, cb, logger=[mlflow, CSVLogger(tmp_path, name="csv")], max_epochs=1)
        t.fit(Tiny(), *loaders())
        folders.append(cb.outputs()["History"].parent)
        assert str(mlflow.run_id) in str(folders[-1])
    assert folders[0] != folders[1]
    for folder in folders:
        assert load_history(folder).epochs == [0]  # no run appended to the other's history


def test_a_new_run_never_appends_to_another_runs_history(tmp_path):
    first = explainer(layers=["head"])
    trainer(tmp_path, first, logger=False, max_epochs=1).fit(Tiny(), *loaders())
    assert first.outputs()["History"] == tmp_path / "neurons" / "history"
    # no logger, same default_root_dir: the second run gets a folder of its own (and says so)
    second = explainer(layers=["head"])
    with pytest.warns(UserWarning, match="already holds another run's history"):
        trainer(tmp_path, second, logger=False, max_epochs=1).fit(Tiny(), *loaders())
    assert second.outputs()["History"] == tmp_path / "neurons_1" / "history"
    assert len(load_history(tmp_path / "neurons")) == len(load_history(tmp_path / "neurons_1")) == 3
    # an explicit history_dir holding another run's history is refused before the first training step
    model = Tiny()
    with pytest.raises(FileExistsError, match="another run's history"):
        trainer(tmp_path, explainer(layers=["head"], history_dir=str(tmp_path / "neurons")), logger=False).fit(
            model, *loaders()
        )
    assert model.train_steps == 0
    assert len(load_history(tmp_path / "neurons")) == 3  # untouched
