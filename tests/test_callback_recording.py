import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from _cheap import StatsEncoder, cheap_backend
from _tiny import quiet_trainer
from lightning_neurons import NeuronExplainer
from lightning_neurons.backends.base import Backend
from lightning_neurons.checkpoints import load_checkpoint
from lightning_neurons.recording.recorder import ActivationRecorder, collect_top_k
from lightning_neurons.recording.types import Recording


class FailingEncoder(StatsEncoder):
    """A real encoder whose image side breaks: every explanation round fails inside the pipeline."""

    def encode_images(self, images):
        raise RuntimeError("explanation exploded")


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # logger-less trainers write their neurons/ folder into the working directory


def Explainer(**kwargs):
    """The real callback, session, pipeline and writers, with a cheap real encoder."""
    kwargs.setdefault("backend", cheap_backend())
    kwargs.setdefault("vocabulary", ["general"])
    kwargs.setdefault("show_progress", False)
    return NeuronExplainer(**kwargs)


class Tiny(pl.LightningModule):
    def __init__(self, crash: bool = False) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2))
        self.head = nn.Linear(8, 3)
        self.crash = crash
        self.train_steps = 0

    def forward(self, x):
        return self.head(self.features(x).amax(dim=(2, 3)))

    def training_step(self, batch, batch_idx):
        self.train_steps += 1
        if self.crash:
            raise RuntimeError("boom in training_step")
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def dataset(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 10, 10, generator=g), torch.randint(0, 3, (n,), generator=g))


def loaders(n_val=20):
    return DataLoader(dataset(24), batch_size=8), DataLoader(dataset(n_val, seed=1), batch_size=6)


def trainer(callbacks, max_epochs=1, tmp_path=None, **kw):
    return quiet_trainer(callbacks, root=tmp_path, max_epochs=max_epochs, **kw)


def hook_count(model):
    return sum(len(m._forward_hooks) for m in model.modules())


LAYERS = ["features.0", "features.2", "head"]


def test_fit_records_same_topk_as_collect_and_removes_hooks():
    torch.manual_seed(0)
    model = Tiny()
    cb = Explainer(layers=LAYERS, top_k=5, reservoir_size=6)
    train, val = loaders()
    trainer(cb, max_epochs=2).fit(model, train, val)
    assert hook_count(model) == 0 and cb.num_hooks == 0
    assert [r.epoch for r in cb.rounds] == [0, 1]
    rec = cb.last_recording
    assert rec.epoch == 1 and rec.num_samples == 20 and rec.reservoir_ids.numel() == 6
    ref = collect_top_k(model, val, LAYERS, top_k=5, reservoir_size=6, show_progress=False)
    for name in LAYERS:
        assert torch.equal(rec.layers[name].sample_ids, ref.layers[name].sample_ids)
        torch.testing.assert_close(rec.layers[name].values, ref.layers[name].values)
    assert torch.equal(rec.reservoir_ids, ref.reservoir_ids)
    labels = dataset(20, seed=1).tensors[1]
    assert rec.labels and all(labels[i] == lab for i, lab in rec.labels.items())
    # the real session explained every unit from the recorded samples
    last = cb.rounds[-1]
    assert len(last) == 6 + 8 + 3 and last.get("head", 0).top_sample_ids == rec.layers["head"].sample_ids[0].tolist()


def test_glob_and_predicate_layers_and_unknown_layer_fails_in_setup():
    model = Tiny()
    cb = Explainer(layers="features.*", top_k=2)
    trainer(cb).validate(model, loaders()[1], verbose=False)
    assert sorted(cb.last_recording.layers) == ["features.0", "features.1", "features.2"]
    cb = Explainer(layers=lambda name, m: isinstance(m, nn.Linear), top_k=2)
    trainer(cb).validate(model, loaders()[1], verbose=False)
    assert list(cb.last_recording.layers) == ["head"]
    model = Tiny()
    with pytest.raises(ValueError, match="features.2"):
        trainer(Explainer(layers=["features.3"])).fit(model, *loaders())
    assert model.train_steps == 0 and hook_count(model) == 0


def test_validate_only_run_and_hooks_removed():
    model = Tiny()
    cb = Explainer(layers=LAYERS, top_k=3)
    trainer(cb).validate(model, loaders()[1], verbose=False)
    assert hook_count(model) == 0
    assert [r.epoch for r in cb.rounds] == [0]
    assert cb.last_recording.num_samples == 20


def test_crash_in_training_step_leaves_no_hook():
    model = Tiny(crash=True)
    cb = Explainer(layers=LAYERS, top_k=3)
    # the sanity check passes through validation; then training_step raises
    with pytest.raises(RuntimeError, match="boom"):
        trainer(cb, num_sanity_val_steps=2).fit(model, *loaders())
    assert hook_count(model) == 0


def test_crash_inside_validation_leaves_no_hook():
    class Bad(Tiny):
        def validation_step(self, batch, batch_idx):
            assert hook_count(self) == 3  # hooks are on during a recorded pass
            raise ValueError("bad validation")

    model = Bad()
    with pytest.raises(ValueError, match="bad validation"):
        trainer(Explainer(layers=LAYERS)).validate(model, loaders()[1], verbose=False)
    assert hook_count(model) == 0


def test_sanity_check_is_skipped(monkeypatch):
    attached = []
    original = ActivationRecorder.attach
    monkeypatch.setattr(ActivationRecorder, "attach", lambda self: attached.append(1) or original(self))
    cb = Explainer(layers=LAYERS)
    trainer(cb, num_sanity_val_steps=2).fit(Tiny(), *loaders())
    assert len(attached) == 1  # the one real validation pass, not the sanity check
    assert cb.last_recording.num_samples == 20


@pytest.mark.parametrize(
    ("kwargs", "max_epochs", "expected"),
    [
        ({"every_n_epochs": 2, "explain_on_fit_end": False}, 4, [1, 3]),
        ({"every_n_epochs": None, "epochs": [0, 2], "explain_on_fit_end": False}, 3, [0, 2]),
        ({"every_n_epochs": None, "explain_on_fit_end": True}, 3, [2]),
        ({"every_n_epochs": 2, "explain_on_fit_end": True}, 3, [1, 2]),
        ({"every_n_epochs": 2, "explain_on_fit_end": True}, 2, [1]),  # fit end: already explained
    ],
)
def test_schedule(kwargs, max_epochs, expected):
    cb = Explainer(layers="head", top_k=2, **kwargs)
    train, val = loaders()
    trainer(cb, max_epochs=max_epochs, limit_train_batches=1).fit(Tiny(), train, val)
    assert [r.epoch for r in cb.rounds] == expected
    assert cb.last_recording.epoch == max_epochs - 1 or not kwargs.get("explain_on_fit_end", True)


def test_not_scheduled_epochs_are_not_recorded():
    attached = []
    cb = Explainer(layers="head", every_n_epochs=2, explain_on_fit_end=False)
    model = Tiny()

    class Spy(pl.Callback):
        def on_validation_batch_end(self, trainer, pl_module, *args, **kwargs):
            attached.append((trainer.current_epoch, hook_count(pl_module)))

    trainer([cb, Spy()], max_epochs=2, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=0).fit(
        model, *loaders()
    )
    assert attached == [(0, 0), (1, 1)]


def test_no_validation_loop_warns_and_skips():
    cb = Explainer(layers=LAYERS)
    with pytest.warns(UserWarning, match="no validation loop"):
        trainer(cb, limit_val_batches=0).fit(Tiny(), loaders()[0])
    assert cb.rounds == [] and cb.last_recording is None


def test_top_k_larger_than_validation_set():
    cb = Explainer(layers=LAYERS, top_k=10, reservoir_size=100)
    trainer(cb).validate(Tiny(), DataLoader(dataset(4), batch_size=3), verbose=False)
    lt = cb.last_recording.layers["features.2"]
    assert lt.values.shape == (8, 10)
    assert (lt.sample_ids[:, :4] >= 0).all() and (lt.sample_ids[:, 4:] == -1).all()
    assert sorted(cb.last_recording.reservoir_ids.tolist()) == [0, 1, 2, 3]


def test_iterable_validation_dataset():
    class Stream(IterableDataset):
        def __iter__(self):
            ds = dataset(20, seed=1)
            return iter(ds[i] for i in range(20))

    model = Tiny()
    cb = Explainer(layers=LAYERS, top_k=4)
    loader = DataLoader(Stream(), batch_size=6)
    trainer(cb).validate(model, loader, verbose=False)
    ref = collect_top_k(model, loaders()[1], LAYERS, top_k=4, show_progress=False)
    for name in LAYERS:
        assert torch.equal(cb.last_recording.layers[name].sample_ids, ref.layers[name].sample_ids)
    # samples fetched back from the stream: every unit explained (a dead unit gets no description, by design)
    assert len(cb.rounds) == 1 and all(u.description or u.kind == "dead" for u in cb.rounds[0])
    assert any(u.description for u in cb.rounds[0])


def test_explanation_failure_warns_or_raises():
    failing = Backend("failing", FailingEncoder())
    cb = Explainer(layers=LAYERS, backend=failing)
    model = Tiny()
    with pytest.warns(UserWarning, match="explaining round 0 failed"):
        trainer(cb, max_epochs=2, limit_train_batches=1).fit(model, *loaders())
    assert model.train_steps == 2 and cb.rounds == []  # training went on
    model = Tiny()
    # in the validation hook, raise stops training at once (a background round raises at the next hook instead:
    # tests/test_background.py)
    sync = Explainer(layers=LAYERS, on_error="raise", backend=failing, async_explain=False)
    with pytest.raises(RuntimeError, match="exploded"):
        trainer(sync, max_epochs=2, limit_train_batches=1).fit(model, *loaders())
    assert model.train_steps == 1 and hook_count(model) == 0


def test_session_setup_failure_raises_before_training():
    model = Tiny()
    with pytest.raises(ValueError, match="backend"):
        trainer(Explainer(layers=LAYERS, backend="no-such-backend")).fit(model, *loaders())
    assert model.train_steps == 0


def test_resume_from_checkpoint_keeps_state(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    # rounds in the validation hook, so each checkpoint holds its epoch's round (a round still in the background
    # when a checkpoint is saved is explained again on resume: tests/test_background.py)
    cb = Explainer(layers=LAYERS, top_k=3, async_explain=False)
    trainer([cb, ckpt], max_epochs=2, limit_train_batches=1, tmp_path=tmp_path).fit(Tiny(), *loaders())
    assert [r.epoch for r in cb.rounds] == [0, 1]

    cb2 = Explainer(layers=LAYERS, top_k=3, async_explain=False)
    t2 = trainer([cb2, ModelCheckpoint(dirpath=tmp_path)], max_epochs=3, limit_train_batches=1, tmp_path=tmp_path)
    t2.fit(Tiny(), *loaders(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert [r.epoch for r in cb2.rounds] == [2]
    assert cb2.session is None and cb2._session_state["history"]  # torn down, state kept
    from lightning_neurons.drift.history import RunHistory

    assert RunHistory.from_state_dict(cb2._session_state["history"]).epochs == [0, 1, 2]  # history continued
    state = load_checkpoint(tmp_path / "last.ckpt")["callbacks"]
    own = next(v for k, v in state.items() if k.startswith("NeuronExplainer"))
    assert own["layers"] == LAYERS and own["last_explained_epoch"] == 1
    restored = Recording.from_state(own["last_recording"])
    assert restored.epoch == 1 and set(restored.layers) == set(LAYERS)

    cb3 = Explainer(layers=LAYERS[:2], top_k=3)
    cb3.setup(trainer([cb3]), Tiny(), "fit")
    with pytest.warns(UserWarning, match="layers changed"):
        cb3.load_state_dict(own)
    assert cb3.last_recording.epoch == 1 and cb3.last_explained_epoch == 1


def test_bf16_mixed_precision_channels_last_matches_fp32():
    torch.manual_seed(0)
    model = Tiny()
    val = DataLoader(dataset(48, seed=2), batch_size=16)
    cb32 = Explainer(layers=LAYERS, top_k=6)
    trainer(cb32).validate(model, val, verbose=False)
    model = model.to(memory_format=torch.channels_last)
    cb16 = Explainer(layers=LAYERS, top_k=6)
    trainer(cb16, precision="bf16-mixed").validate(model, val, verbose=False)
    for name in LAYERS:
        a, b = cb32.last_recording.layers[name], cb16.last_recording.layers[name]
        torch.testing.assert_close(b.values, a.values, rtol=0.05, atol=0.05)
        overlap = [len(set(x.tolist()) & set(y.tolist())) / 6 for x, y in zip(a.sample_ids, b.sample_ids)]
        assert sum(overlap) / len(overlap) > 0.8


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layers": []}, "layers"),
        ({"layers": "x", "top_k": 0}, "top_k"),
        ({"layers": "x", "reduction": "median"}, "reduction"),
        ({"layers": "x", "token_mode": "cls"}, "token_mode"),
        ({"layers": "x", "every_n_epochs": 0}, "every_n_epochs"),
        ({"layers": "x", "epochs": [-1]}, "epochs"),
        ({"layers": "x", "on_error": "ignore"}, "on_error"),
        ({"layers": "x", "correction": "none"}, "correction"),
        ({"layers": "x", "ablation_measure": "loss"}, "ablation_measure"),
        ({"layers": "x", "reservoir_size": -1}, "reservoir_size"),
        ({"layers": "x", "vocabulary": ["general", "/no/such/file.txt"]}, "vocabulary"),
        ({"layers": "x", "image_mean": [0.5, 0.5, 0.5]}, "image_std"),
        ({"layers": "x", "image_mean": [0.5] * 3, "image_std": [0.0] * 3}, "image_std"),
        ({"layers": "x", "log_units": -2}, "log_units"),
        ({"layers": "x", "output_selector": {"x": 1.5}}, "output_selector"),
    ],
)
def test_bad_arguments_fail_in_init(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NeuronExplainer(**kwargs)


def test_arguments_are_stored_under_their_names():
    import inspect

    cb = NeuronExplainer(layers=["a"], vocabulary=["general", "llm"], class_names=["cat"], log_units=[1, 2])
    for name in inspect.signature(NeuronExplainer.__init__).parameters:
        if name != "self":
            assert hasattr(cb, name), name
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(cb.vocabulary) == ["general", "llm"] and cb.layers == ["a"]


class SkipsItsForward(Tiny):
    """A validation_step that never calls the model (it logs a constant): no chosen layer ever runs."""

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", torch.tensor(0.0))


def test_layers_that_never_run_in_validation_warn_and_write_no_empty_round():
    model = SkipsItsForward()
    cb = Explainer(layers=LAYERS, top_k=3)
    never_ran = r"layers 'features.0', 'features.2', 'head' did not run in any of the 4 probe batches.*self\(x\)"
    with pytest.warns(RuntimeWarning, match=never_ran):
        trainer(cb, max_epochs=2).fit(model, *loaders())
    # before: two rounds with no unit were filed as if the epochs had been explained
    assert cb.rounds == [] and hook_count(model) == 0
    assert model.train_steps == 6  # training itself was not touched


class FourChannels(Tiny):
    """RGBA-like inputs: the layers record fine, but no crop can be cut from a 4-channel input."""

    def __init__(self) -> None:
        super().__init__()
        self.features[0] = nn.Conv2d(4, 6, 3, padding=1)


def four_channel_loaders():
    data = TensorDataset(torch.rand(24, 4, 10, 10), torch.randint(0, 3, (24,)))
    return DataLoader(data, batch_size=8), DataLoader(data, batch_size=6)


def test_non_image_inputs_fail_before_the_first_training_step_with_the_fix():
    model = FourChannels()
    with pytest.raises(ValueError, match=r"\[N, 1 or 3, H, W\], got shape \(6, 4, 10, 10\).*forward_fn"):
        trainer(Explainer(layers=LAYERS, top_k=3)).fit(model, *four_channel_loaders())
    # before: the epoch trained, then every scheduled explanation failed with a warning
    assert model.train_steps == 0 and hook_count(model) == 0


def test_non_image_model_is_explained_from_images_through_forward_fn():
    rgb = TensorDataset(torch.rand(24, 3, 10, 10), torch.randint(0, 3, (24,)))

    def with_alpha(net, images):
        return net(torch.cat([images, torch.ones_like(images[:, :1])], dim=1))

    class RgbValidation(FourChannels):
        def validation_step(self, batch, batch_idx):
            self.log("val_loss", nn.functional.cross_entropy(with_alpha(self, batch[0]), batch[1]))

    model = RgbValidation()
    cb = Explainer(layers=LAYERS, top_k=3, forward_fn=with_alpha)
    trainer(cb).fit(model, four_channel_loaders()[0], DataLoader(rgb, batch_size=6))
    assert [r.epoch for r in cb.rounds] == [0] and len(cb.rounds[0]) == 6 + 8 + 3
