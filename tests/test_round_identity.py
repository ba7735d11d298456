"""Every round knows its run, weights, epoch, step and settings, in real sequences of fit / validate / Trainers.

Each test runs the real callback, session, pipeline and writers with a real Trainer (the cheap encoder as backend).
"""

import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from _cheap import cheap_backend
from lightning_neurons import load_history
from lightning_neurons.identity import weights_fingerprint
from lightning_neurons.results import ExplanationRound
from test_lightning_contract import Tiny, data, explainer, loaders, trainer


def neurons_dir(t) -> Path:
    return Path(t.log_dir) / "neurons"


def test_an_explainer_reused_in_a_second_trainer_starts_a_new_run(tmp_path):
    cb = explainer(layers=["head"])
    first = trainer(tmp_path / "a", cb, max_epochs=2, limit_train_batches=2)
    first.fit(Tiny(), *loaders())
    first_history = load_history(neurons_dir(first))
    first_run = cb.rounds[-1].identity.run
    assert first_history.epochs == [0, 1]
    # a sweep in a notebook: the same callback object, a new Trainer and model
    second = trainer(tmp_path / "b", cb, max_epochs=1, limit_train_batches=2)
    second.fit(Tiny(), *loaders())
    assert [r.epoch for r in cb.rounds] == [0]  # its epoch 0 is explained, not skipped as "done"
    assert cb.rounds[0].identity.run != first_run
    assert cb.outputs()["History"].parent == neurons_dir(second)
    assert load_history(neurons_dir(second)).epochs == [0]
    assert len(load_history(neurons_dir(second))) == 3  # nothing of the first run copied in
    assert load_history(neurons_dir(first)).records == first_history.records  # the first run is untouched


def test_validate_before_fit_does_not_stand_in_for_the_fitted_epoch_0(tmp_path):
    cb = explainer(layers=["head"])
    t = trainer(tmp_path, cb, max_epochs=2, limit_train_batches=3)
    model = Tiny()
    t.validate(model, loaders()[1], verbose=False)
    untrained = cb.rounds[-1].identity
    assert (untrained.epoch, untrained.step) == (0, 0)
    t.fit(model, *loaders())
    fitted = [r.identity for r in cb.rounds[1:]]
    assert [(i.epoch, i.step) for i in fitted] == [(0, 3), (1, 6)]  # epoch 0 of the fit is explained
    assert fitted[0].weights != untrained.weights and fitted[0].run == untrained.run
    history = load_history(neurons_dir(t))
    assert history.epochs == [0, 1]
    for unit in range(3):  # epoch 0 is the fitted weights' round
        assert history.get("head", unit, 0).explanation.description == cb.rounds[1].get("head", unit).description


def test_validate_after_fit_files_the_round_under_the_last_fitted_epoch(tmp_path):
    cb = explainer(layers=["head"])
    t = trainer(tmp_path, cb, max_epochs=2, limit_train_batches=2)
    model = Tiny()
    t.fit(model, *loaders())
    t.validate(model, loaders()[1], verbose=False)
    last_fit, validated = cb.rounds[-2].identity, cb.rounds[-1].identity
    assert validated.epoch == 1 and validated.step == 4  # not epoch 2: no epoch 2 was trained
    assert validated.weights == last_fit.weights == weights_fingerprint(model)
    assert load_history(neurons_dir(t)).epochs == [0, 1]


def test_validate_with_ckpt_path_takes_the_checkpoints_step_and_weights(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    cb = explainer(layers=["head"])
    t = trainer(tmp_path, [cb, ckpt], max_epochs=3, limit_train_batches=2)
    model = Tiny()
    t.fit(model, *loaders())
    by_epoch = {r.epoch: r.identity for r in cb.rounds}
    t.validate(model, loaders()[1], ckpt_path=str(tmp_path / "ckpt" / "epoch=1.ckpt"), verbose=False)
    revisit = cb.rounds[-1].identity
    assert (revisit.epoch, revisit.step) == (1, 4)
    assert revisit.weights == by_epoch[1].weights != by_epoch[2].weights
    assert load_history(neurons_dir(t)).epochs == [0, 1, 2]


def test_settings_fingerprint_changes_with_what_a_round_means(tmp_path):
    runs = {}
    for name, kwargs in {"a": {}, "same": {}, "top_k": {"top_k": 2}, "vocab": {"vocabulary": ["classes"]}}.items():
        cb = explainer(layers=["head"], class_names=["x", "y", "z"], **kwargs)
        trainer(tmp_path / name, cb, max_epochs=1, limit_train_batches=1).fit(Tiny(), *loaders())
        runs[name] = cb.rounds[-1].identity
    assert runs["a"].settings == runs["same"].settings
    assert runs["a"].run != runs["same"].run
    assert len({runs["a"].settings, runs["top_k"].settings, runs["vocab"].settings}) == 3
    assert runs["top_k"].settings_summary["top_k"] == 2
    assert runs["vocab"].settings_summary["class_names"].startswith("3 names")


def test_the_encoders_image_size_and_number_format_are_part_of_the_settings(tmp_path):
    """The embedded encoder's precision="auto" is bfloat16 on some CPUs only, and image_size is a per-call option:
    neither is in the encoder's name, yet both change every crop's embedding. A run resumed on another CPU, or with
    another image size, starts a new drift baseline instead of counting the difference as drift."""
    runs = {}
    variants = {
        "float32": {"compute_dtype": torch.float32},
        "again": {"compute_dtype": torch.float32},
        "bfloat16": {"compute_dtype": torch.bfloat16},
        "small": {"compute_dtype": torch.float32, "image_size": 128},
    }
    for name, attributes in variants.items():
        backend = cheap_backend()
        for attribute, value in attributes.items():
            setattr(backend.encoder, attribute, value)
        cb = explainer(layers=["head"], backend=backend)
        trainer(tmp_path / name, cb, max_epochs=1, limit_train_batches=1).fit(Tiny(), *loaders())
        runs[name] = cb.rounds[-1].identity
    assert runs["float32"].settings == runs["again"].settings
    assert len({runs[n].settings for n in ("float32", "bfloat16", "small")}) == 3
    assert runs["bfloat16"].settings_summary["model"] == "stats:stats@compute_dtype=bfloat16"
    assert runs["small"].settings_summary["model"] == "stats:stats@image_size=128,compute_dtype=float32"
    # Crops are cut at the encoder's side: the summary says which (and how boxes are merged).
    assert runs["small"].settings_summary["regions"].startswith("crops 128, ")
    assert runs["float32"].settings_summary["regions"].startswith("crops 224, ")
    assert "merge IoU 0.7" in runs["float32"].settings_summary["regions"]


def test_identity_is_written_with_the_round_and_read_back(tmp_path):
    from lightning_neurons.results import ExplanationRound

    cb = explainer(layers=["head"])
    t = trainer(tmp_path, cb, max_epochs=1, limit_train_batches=1)
    t.fit(Tiny(), *loaders())
    saved = ExplanationRound.from_json(neurons_dir(t) / "round_epoch=0.json")
    assert saved.identity == cb.rounds[0].identity and saved.identity.step == 1


PRECISIONS = ["32-true", "64-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true"]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_precision_runs_a_reduced_fit_with_the_callback(tmp_path, precision):
    # On a CPU Lightning runs "16-mixed" as "bf16-mixed" (fp16 autocast is GPU-only) and says so.
    default = torch.get_default_dtype()
    cb = explainer(on_error="raise")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*AMP with fp16 is not supported on CPU.*")
        t = trainer(tmp_path, cb, max_epochs=1, limit_train_batches=2, precision=precision, accelerator="cpu")
    t.fit(Tiny(), *loaders())
    assert torch.get_default_dtype() == default
    assert [r.epoch for r in cb.rounds] == [0]
    assert len(cb.rounds[0]) == 8 + 3 and all(u.shown for u in cb.rounds[0])
    assert load_history(neurons_dir(t)).epochs == [0]


def test_a_failing_round_with_on_error_warn_lets_training_go_on(tmp_path, monkeypatch):
    # A failure while the recording is read back (the 64-true crash was there) is an explanation-round failure too.
    from lightning_neurons.recording.recorder import ActivationRecorder

    real = ActivationRecorder.result

    def broken(self, epoch=None):
        if epoch is None:  # the one-batch check before step 0 passes; the validation passes' read-back fails
            return real(self, epoch)
        raise RuntimeError("The size of tensor a (56) must match the size of tensor b (28)")

    monkeypatch.setattr(ActivationRecorder, "result", broken)
    cb = explainer(layers=["head"])
    model = Tiny()
    with pytest.warns(UserWarning, match="reading the recording of round 0 failed.*size of tensor a") as record:
        trainer(tmp_path, cb, max_epochs=2, limit_train_batches=2).fit(model, *loaders())
    assert model.train_steps == 4 and cb.rounds == []
    assert not [w for w in record if "no validation loop runs" in str(w.message)]


# ---------------------------------------------------------------------- samplers: id = streamed position
class Reversed:
    """A batch sampler that streams the dataset backwards in batches of 4 (deterministic, not a BatchSampler)."""

    def __init__(self, n):
        self.batches = [list(range(n - 1, -1, -1))[i : i + 4] for i in range(0, n, 4)]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


class EveryOther(torch.utils.data.Sampler):
    def __init__(self, n):
        self.order = list(range(0, n, 2)) + list(range(1, n, 2))

    def __iter__(self):
        return iter(self.order)

    def __len__(self):
        return len(self.order)


def _recorded_values_match_fetched_images(model, cb, val):
    from lightning_neurons.recording.samples import DataLoaderSampleSource

    head = cb.last_recording.layers["head"]
    source = DataLoaderSampleSource(val)
    for unit in range(head.num_units):
        ids = head.sample_ids[unit].tolist()
        images, _ = source.fetch(ids)
        with torch.no_grad():
            again = model.eval()(images)[:, unit]
        torch.testing.assert_close(again, head.values[unit], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["batch_sampler", "sampler"])
def test_custom_samplers_fetch_the_images_that_were_recorded(tmp_path, kind):

    dataset = data(20, seed=1)
    if kind == "batch_sampler":
        val = DataLoader(dataset, batch_sampler=Reversed(len(dataset)))
    else:
        val = DataLoader(dataset, sampler=EveryOther(len(dataset)), batch_size=3)
    cb = explainer(layers=["head"], top_k=4)
    model = Tiny()
    trainer(tmp_path, cb, max_epochs=1, limit_train_batches=2).fit(model, loaders()[0], val)
    _recorded_values_match_fetched_images(model, cb, val)
    assert len(cb.rounds) == 1


# ---------------------------------------------------------------------- the probe data, read before step 0
class Named(torch.utils.data.TensorDataset):
    classes = ["red thing", "green thing", "blue thing"]


def test_class_names_of_the_val_loader_passed_to_fit_are_read(tmp_path):

    val = DataLoader(Named(*data(20, seed=1).tensors), batch_size=5)
    cb = explainer(layers=["head"], vocabulary=["classes"])
    trainer(tmp_path, cb, max_epochs=1, limit_train_batches=1).fit(Tiny(), loaders()[0], val)
    assert cb.rounds[0].identity.settings_summary["class_names"].startswith("3 names")
    assert {u.description for u in cb.rounds[0]} <= set(Named.classes)


class MixedSizes(torch.utils.data.Dataset):
    def __len__(self):
        return 20

    def __getitem__(self, i):
        side = 10 if i < 15 else 12
        return torch.rand(3, side, side), i % 3


def test_validation_images_of_mixed_sizes_fail_before_the_first_training_step(tmp_path):
    from torch.utils.data import DataLoader

    model = Tiny()
    cb = explainer(layers=["head"])
    with pytest.raises(ValueError, match=r"different sizes \(\[3, 10, 10\] at index 0, \[3, 12, 12\] at index 1[5-9]"):
        trainer(tmp_path, cb, max_epochs=1).fit(model, loaders()[0], DataLoader(MixedSizes(), batch_size=5))
    assert model.train_steps == 0


def test_a_recording_that_cannot_work_fails_before_the_first_training_step(tmp_path, monkeypatch):
    import lightning_neurons.recording.topk as topk

    def broken(values, ids):
        raise RuntimeError("The size of tensor a (56) must match the size of tensor b (28)")

    monkeypatch.setattr(topk, "sort_keys", broken)
    model = Tiny()
    with pytest.raises(ValueError, match="recording one validation batch .* failed under precision='32-true'"):
        trainer(tmp_path, explainer(layers=["head"]), max_epochs=1).fit(model, *loaders())
    assert model.train_steps == 0


class Normalised(torch.utils.data.TensorDataset):
    def __init__(self, images, labels, transform=None):
        super().__init__((images - 0.5) / 0.25, labels)
        self.transform = transform


def test_normalised_inputs_without_image_mean_warn_once_with_the_fix(tmp_path):

    val = DataLoader(Normalised(*data(20, seed=1).tensors), batch_size=5)
    with pytest.warns(UserWarning, match="look normalised .* image_mean/image_std are not set") as record:
        trainer(tmp_path, explainer(layers=["head"]), max_epochs=2, limit_train_batches=1).fit(
            Tiny(), loaders()[0], val
        )
    assert len([w for w in record if "look normalised" in str(w.message)]) == 1


def test_normalize_of_a_torchvision_transform_is_read_from_the_dataset(tmp_path, recwarn):
    from torchvision import transforms

    transform = transforms.Compose([transforms.Normalize([0.5] * 3, [0.25] * 3)])
    val = DataLoader(Normalised(*data(20, seed=1).tensors, transform=transform), batch_size=5)
    cb = explainer(layers=["head"])
    trainer(tmp_path, cb, max_epochs=1, limit_train_batches=1).fit(Tiny(), loaders()[0], val)
    assert not [w for w in recwarn if "look normalised" in str(w.message)]
    assert cb._run_config.explain.image_mean == (0.5, 0.5, 0.5)


def test_where_the_outputs_went_is_logged_once_at_fit_end(tmp_path, caplog):
    import logging

    cb = explainer(layers=["head"])
    with caplog.at_level(logging.INFO):
        t = trainer(tmp_path, cb, max_epochs=2, limit_train_batches=1)
        t.fit(Tiny(), *loaders())
    lines = [r.getMessage() for r in caplog.records if "wrote History" in r.getMessage()]
    assert len(lines) == 1
    assert str(neurons_dir(t) / "history") in lines[0] and "report.html" in lines[0]


def test_log_units_naming_a_unit_no_layer_has_fails_before_the_first_training_step(tmp_path):
    model = Tiny()
    with pytest.raises(ValueError, match=r"log_units=\[100\] names units that no chosen layer has: 100 .*'head' has 3"):
        trainer(tmp_path, explainer(layers=["head"], log_units=[100]), max_epochs=1).fit(model, *loaders())
    assert model.train_steps == 0


def test_an_empty_vocabulary_file_is_named_in_the_error(tmp_path):
    empty = tmp_path / "my_concepts.txt"
    empty.write_text("# nothing yet\n\n")
    model = Tiny()
    with pytest.raises(ValueError, match=f"concept file {empty} holds no concepts"):
        trainer(tmp_path, explainer(layers=["head"], vocabulary=[str(empty)]), max_epochs=1).fit(model, *loaders())
    assert model.train_steps == 0


def test_the_embedding_cache_goes_where_lightning_neurons_cache_says(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_NEURONS_CACHE", str(tmp_path / "cache"))
    trainer(tmp_path, explainer(layers=["head"]), max_epochs=1, limit_train_batches=1).fit(Tiny(), *loaders())
    assert list((tmp_path / "cache" / "embeddings").glob("stats-*.pt"))


# ---------------------------------------------------------------------- the history file: every round read back
class TamperWithHistory(pl.Callback):
    """Deletes or truncates a round file of the run's history store by hand before epoch 1 trains (as a user cleaning
    up would)."""

    def __init__(self, explainer, how):
        self.explainer, self.how, self.done = explainer, how, False

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch < 1 or self.done:
            return
        session = self.explainer.session
        rounds = sorted((session.output_dir / "history").glob("round-*.parquet")) if session else []
        if not rounds:  # epoch 0's round is not written yet (explained in the background): next epoch then
            return
        self.done = True
        path = rounds[0]
        if self.how == "delete":
            path.unlink()
        else:
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 3])


@pytest.mark.parametrize("how", ["delete", "truncate"])
def test_a_history_file_deleted_or_truncated_between_epochs_is_rewritten(tmp_path, how):
    cb = explainer(layers=["head"], async_explain=False)  # epoch 0's round is on disk when epoch 1 starts
    t = trainer(tmp_path, [cb, TamperWithHistory(cb, how)], max_epochs=3, limit_train_batches=1)
    with pytest.warns(UserWarning, match=f"history round files were {how}d since this run last wrote them"):
        t.fit(Tiny(), *loaders())
    on_disk = load_history(neurons_dir(t))
    assert on_disk.epochs == [0, 1, 2]  # what the report shows is what the file holds
    for unit in range(3):
        for rnd in cb.rounds:
            assert on_disk.get("head", unit, rnd.epoch).explanation.description == rnd.get("head", unit).description


def test_no_lock_file_is_left_in_the_run_folder(tmp_path):
    t = trainer(tmp_path, explainer(layers=["head"]), max_epochs=1, limit_train_batches=1)
    t.fit(Tiny(), *loaders())
    assert list((neurons_dir(t) / "history").glob("round-*.parquet"))
    assert not list(neurons_dir(t).rglob("*.lock"))


# ---------------------------------------------------------------------- post hoc into a folder that holds rounds
def _explain(layer, epoch, folder, model=None):
    from lightning_neurons import explain

    return explain(
        model or Tiny(),
        loaders()[1],
        layer,
        top_k=3,
        epoch=epoch,
        output_dir=folder,
        backend=cheap_backend(),
        vocabulary=["general"],
        show_progress=False,
    )


def test_explain_into_an_existing_folder_continues_its_epochs(tmp_path):
    for epoch in range(3):
        _explain("head", epoch, tmp_path)
    _explain("head", 3, tmp_path)
    history = load_history(tmp_path)
    assert history.epochs == [0, 1, 2, 3]
    assert {history.get("head", u, 3).drift.previous_epoch for u in range(3)} == {2}  # drift against epoch 2
    _explain("head", 1, tmp_path)  # re-explaining an earlier epoch keeps the later ones
    assert load_history(tmp_path).epochs == [0, 1, 2, 3]


def test_explain_of_another_layer_keeps_the_folders_round_of_the_first(tmp_path):
    model = Tiny()
    first = _explain("head", 1, tmp_path, model)
    _explain("features.2", 1, tmp_path, model)
    history = load_history(tmp_path)
    assert history.layers == ["head", "features.2"] and history.epochs == [1]
    for unit in first:
        assert history.get("head", unit.unit, 1).explanation.description == unit.description
    report = (tmp_path / "report.html").read_text()
    assert "head" in report and "features.2" in report


# ---------------------------------------------------------------------- the history command
def _run_folder(tmp_path):
    cb = explainer()
    t = trainer(tmp_path, cb, max_epochs=2, limit_train_batches=1)
    t.fit(Tiny(), *loaders())
    return neurons_dir(t)


def test_history_command_reads_only_and_exports_when_asked(tmp_path, capsys):
    from lightning_neurons.cli import main

    folder = _run_folder(tmp_path)
    before = sorted(p.name for p in folder.iterdir())
    assert main(["history", str(folder), "--layer", "head", "--limit", "1"]) == 0
    out = capsys.readouterr().out
    assert "features.2" not in out and "head" in out
    assert "stable: units whose meaning held for the last 3 comparisons; that needs 4 explained rounds" in out
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing written unasked
    # --export: a file of one's choosing; the history read is never overwritten
    assert (
        main(["history", str(folder), "--export", str(tmp_path / "h.csv"), "--export", str(tmp_path / "h.json")]) == 0
    )
    assert (tmp_path / "h.csv").read_text().count("\n") == 1 + 2 * (8 + 3)
    assert main(["history", str(folder / "history"), "--export", str(folder / "history")]) == 2
    assert "is the history being read" in capsys.readouterr().err
    assert load_history(folder).epochs == [0, 1]
    # a CSV export is not a history: one error line, and it stays as it was
    text = (tmp_path / "h.csv").read_text()
    assert main(["history", str(tmp_path / "h.csv")]) == 2
    assert "CSV export" in capsys.readouterr().err and (tmp_path / "h.csv").read_text() == text
    # JSON Lines under a .json name, and the JSON export, both read back
    assert main(["history", str(folder), "--export", str(tmp_path / "lines.jsonl")]) == 0
    (tmp_path / "lines.json").write_bytes((tmp_path / "lines.jsonl").read_bytes())
    for path in (tmp_path / "lines.json", tmp_path / "h.json"):
        assert main(["history", str(path)]) == 0
        assert "(empty history)" not in capsys.readouterr().out
        assert len(load_history(path)) == 2 * (8 + 3)


def test_history_limit_lists_at_most_n_units_per_section():
    from lightning_neurons.cli import _limited

    lines = ["table", "meaning changes:", "  a", "  b", "  c", "gained a concept:", "  d"]
    assert _limited(lines, 2) == [
        "table",
        "meaning changes:",
        "  a",
        "  b",
        "  ... and 1 more (--limit 0 shows all)",
        "gained a concept:",
        "  d",
    ]
    assert _limited(lines, 0) == lines


def test_the_report_shows_every_units_crops_while_log_units_limits_the_cards(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cb = explainer(log_units=2)
    t = trainer(tmp_path, cb, max_epochs=1, limit_train_batches=1)
    t.fit(Tiny(), *loaders())
    previews = neurons_dir(t) / "previews"
    for layer, n in (("features.2", 8), ("head", 3)):
        assert sorted(int(p.parent.name) for p in (previews / layer).glob("*/epoch_0.png")) == list(range(n))
    report = (neurons_dir(t) / "report.html").read_text()
    assert "no crops saved" not in report
    tags = EventAccumulator(str(t.log_dir), size_guidance={"images": 0}).Reload().Tags()["images"]
    assert sorted(tag for tag in tags if tag.startswith("neurons/head/")) == [
        "neurons/head/0/top_k",
        "neurons/head/1/top_k",
    ]


def test_the_history_stores_combination_weights_normalised_as_every_view_shows_them(tmp_path):
    from lightning_neurons.drift.history import RunHistory
    from lightning_neurons.results import Alternative, ExplanationRound, UnitExplanation

    history = RunHistory(path=tmp_path / "history.jsonl")
    combo = [Alternative("stripes", 44.24), Alternative("zebra", 167.3)]
    unit = UnitExplanation("fc", 0, epoch=0, description="stripes", score=0.8, combination=combo)
    history.add_round(ExplanationRound(0, [unit]), cheap_backend().encoder.encode_texts)
    stored = load_history(tmp_path / "history.jsonl").get("fc", 0, 0).explanation.combination
    assert [a.text for a in stored] == ["stripes", "zebra"]
    assert [round(a.score, 4) for a in stored] == [round(44.24 / 211.54, 4), round(167.3 / 211.54, 4)]


# ---------------------------------------------------------------------- lightning-neurons explain: its options
class WideTiny(Tiny):
    """A module with an init argument and no save_hyperparameters: the checkpoint cannot rebuild it alone."""

    def __init__(self, width):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(width, 8, 3, stride=2)
        )


class TinyData(pl.LightningDataModule):
    classes = ["a", "b", "c"]

    def val_dataloader(self):
        return loaders()[1]


def test_explain_command_takes_model_args_seed_reservoir_log_units_and_class_names(tmp_path, capsys):
    from lightning_neurons.cli import main

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}")
    trainer(tmp_path, [ckpt], max_epochs=1, limit_train_batches=1).fit(WideTiny(5), *loaders())
    command = [
        "explain", "--checkpoint", str(tmp_path / "ckpt" / "epoch=0.ckpt"),
        "--model-class", "test_round_identity.WideTiny", "--data", "test_round_identity.TinyData",
        "--layers", "head", "--top-k", "2", "--backend-args", '{"generator": false}', "--vocabulary", "classes",
        "-o", str(tmp_path / "out"),
    ]  # fmt: skip
    assert main(command) == 2  # without its arguments the model cannot be rebuilt: one line that names the fix
    assert "--model-args" in capsys.readouterr().err
    options = ["--model-args", '{"width": 5}', "--class-names", "x", "y", "z", "--seed", "3"]
    options += ["--reservoir-size", "5", "--log-units", "0", "2"]
    assert main([*command, *options]) == 0
    rnd = ExplanationRound.from_json(tmp_path / "out" / "round_epoch=0.json")
    assert {u.description for u in rnd} <= {"x", "y", "z"}
    assert rnd.identity.settings_summary["class_names"].startswith("3 names")
    tags = EventAccumulator(str(tmp_path / "out"), size_guidance={"images": 0}).Reload().Tags()["images"]
    assert sorted(tags) == ["neurons/head/0/top_k", "neurons/head/2/top_k"]


def test_checkpoints_of_one_epoch_are_filed_in_step_order_with_their_steps(tmp_path):
    from lightning_neurons import explain_checkpoints

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=3, filename="{epoch}-{step}")
    model = Tiny()
    trainer(tmp_path, [ckpt], max_epochs=2, limit_train_batches=6).fit(model, *loaders())
    # epoch 1 has steps 9 and 12: by file name "step=12" sorts before "step=9"
    assert {p.name for p in (tmp_path / "ckpt").glob("epoch=1*")} == {"epoch=1-step=9.ckpt", "epoch=1-step=12.ckpt"}
    with pytest.warns(UserWarning, match="several checkpoints share an epoch"):
        rounds = explain_checkpoints(
            tmp_path / "ckpt", Tiny, loaders()[1], "head", output_dir=tmp_path / "out", top_k=3,
            backend=cheap_backend(), vocabulary=["general"], show_progress=False,
        )  # fmt: skip
    assert [(r.identity.epoch, r.identity.step) for r in rounds] == [(0, 3), (0, 6), (1, 9), (1, 12)]
    assert rounds[-1].identity.weights == weights_fingerprint(model)  # the last round is the final weights
    history = load_history(tmp_path / "out")
    for unit in range(3):  # epoch 1 holds the latest weights of epoch 1
        assert history.get("head", unit, 1).explanation.description == rounds[-1].get("head", unit).description


def test_a_one_off_explain_without_epoch_never_replaces_a_folders_epoch_0(tmp_path):
    _explain("head", 0, tmp_path)
    with pytest.raises(ValueError, match=r"already holds the rounds of epochs \[0\]: pass epoch="):
        _explain("head", None, tmp_path)


class StreamOfMixedSizes(torch.utils.data.IterableDataset):
    """An iterable probe set (the check before step 0 cannot sample it) whose last batch has another size."""

    def __iter__(self):
        g = torch.Generator().manual_seed(1)
        for i in range(20):
            side = 10 if i < 15 else 12
            yield torch.rand(3, side, side, generator=g), i % 3


def test_mixed_sizes_in_a_streamed_probe_set_fail_the_round_with_the_fix_not_a_stack_error(tmp_path):
    model = Tiny()
    with pytest.warns(UserWarning, match=r"different sizes \(\[3, 10, 10\] in batch 0, \[3, 12, 12\] in batch 3\)"):
        trainer(tmp_path, explainer(layers=["head"]), max_epochs=1, limit_train_batches=1).fit(
            model, loaders()[0], DataLoader(StreamOfMixedSizes(), batch_size=5)
        )
    assert model.train_steps == 1
