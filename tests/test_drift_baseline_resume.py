"""A resume under other settings (vocabulary, class names, top_k, the explanation's own settings, a checkpoint of an
earlier version) starts a new drift baseline: real Trainer, callback, session, pipeline and writers (cheap real
encoder). Filed: 8 of 8 units "changed" after such a resume."""

from __future__ import annotations

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_neurons import load_history
from test_lightning_contract import Tiny, explainer, loaders, trainer


@pytest.mark.parametrize(
    ("first", "second", "named"),
    [
        ({"vocabulary": ["general"]}, {"vocabulary": ["<file>"]}, "vocabulary"),
        ({"class_names": ["a", "b", "c"]}, {"class_names": ["cat", "dog", "car"]}, "class_names"),
        ({"top_k": 3}, {"top_k": 5}, "top_k"),
        # The explanation's own settings decide which units show a concept and which text they show: a stricter
        # q_threshold turns units "no clear concept" (counted as lost before), another selection rule or another
        # normalisation (the crops' colours) changes descriptions of unchanged weights.
        ({"q_threshold": 0.05}, {"q_threshold": 0.5}, "q_threshold"),
        ({"selection": "concept_score"}, {"selection": "correlation"}, "selection"),
        ({}, {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}, "normalisation"),
    ],
)
def test_resume_under_other_settings_reports_no_drift_across_it(tmp_path, first, second, named):
    if second.get("vocabulary") == ["<file>"]:  # another vocabulary: a user file of concepts
        (tmp_path / "concepts.txt").write_text("red\nstripes\ndots\ngrass\nsky\nwheel\n")
        second = {"vocabulary": [str(tmp_path / "concepts.txt")]}
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    # Rounds in the validation hook, so that last.ckpt holds epoch 1's round: with background rounds it is still in
    # flight when the checkpoint is saved, and the resumed run explains it again (test_background covers that).
    first_run = explainer(layers=["head"], async_explain=False, **first)
    trainer(tmp_path, [first_run, ckpt], logger=False, limit_train_batches=1).fit(Tiny(), *loaders())
    resumed = explainer(layers=["head"], **second)
    with pytest.warns(UserWarning, match=rf"settings changed since the checkpoint \({named} "):
        fit = trainer(tmp_path, [resumed], logger=False, max_epochs=3, limit_train_batches=1)
        fit.fit(Tiny(), *loaders(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    history = load_history(tmp_path / "neurons")
    assert history.epochs == [0, 1, 2]
    across = [r.drift for r in history.records if r.key[2] == 2]
    assert len(across) == 3  # the head's 3 units
    assert all(d.baseline and not d.compared for d in across)
    assert not any(d.changed or d.gained or d.lost for d in across)
    (summary,) = history.summary(2)
    assert (summary.n_compared, summary.n_changed, summary.n_baseline) == (0, 0, 3)
    before = [r.drift for r in history.records if r.key[2] == 1]
    assert all(d.compared and not d.baseline for d in before)  # same settings: compared as always


#: The settings the version before the explanation's own settings joined the fingerprint recorded.
EARLIER_VERSION_SETTINGS = ("vocabulary", "concepts", "class_names", "backend", "model", "top_k", "reduction")


def test_a_checkpoint_of_the_version_before_the_explanations_settings_counted_starts_a_new_baseline(
    tmp_path, monkeypatch
):
    """That version fingerprinted seven settings (vocabulary to reduction); its rounds cut crops and merged boxes
    another way (crops at 224 px resized again for a 128 px encoder, boxes merged above IoU 0.8), so a run resumed
    from its checkpoint must not compare across the upgrade. The first fit runs the real pipeline with that
    version's fingerprint (the explanation's settings left out), the resumed one with this version's."""
    import lightning_neurons.identity as identity

    monkeypatch.setattr(identity, "_explanation_summary", lambda *args: {})
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first_run = explainer(layers=["head"], async_explain=False)
    trainer(tmp_path, [first_run, ckpt], logger=False, limit_train_batches=1).fit(Tiny(), *loaders())
    assert tuple(first_run.rounds[-1].identity.settings_summary) == EARLIER_VERSION_SETTINGS
    monkeypatch.undo()

    resumed = explainer(layers=["head"])
    with pytest.warns(UserWarning, match=r"not recorded by the earlier version: selection, .*regions\)"):
        fit = trainer(tmp_path, [resumed], logger=False, max_epochs=3, limit_train_batches=1)
        fit.fit(Tiny(), *loaders(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    history = load_history(tmp_path / "neurons")
    across = [r.drift for r in history.records if r.key[2] == 2]
    assert len(across) == 3 and all(d.baseline and not d.compared for d in across)
    assert not any(d.changed or d.gained or d.lost for d in across)
    assert all(r.drift.compared for r in history.records if r.key[2] == 1)  # within that version: compared
