"""A round that holds training up longer than the epoch trained is reported once, with what makes rounds cheaper.

The fits run the real callback, session, pipeline and writers, with the cheap real encoder of ``_cheap.py``.
"""

from __future__ import annotations

import logging

import pytest

import lightning_neurons.round_cost as round_cost
from _cheap import StatsEncoder
from lightning_neurons.round_cost import TrainingClock, slow_round_message
from test_background import explainer, fit


def test_the_message_names_the_wait_the_training_and_the_settings_that_make_rounds_cheaper():
    message = slow_round_message("features.2,head", key=3, round_s=12.0, trained_s=4.0)
    assert message is not None
    assert "training waited 12.0 s for round 3, 3.0x the 4.0 s it trained" in message
    for setting in ("every_n_epochs", "top_k", "image_size", "async_explain"):
        assert setting in message
    assert slow_round_message("x", 0, round_s=3.9, trained_s=4.0) is None  # shorter than the training
    assert slow_round_message("x", 0, round_s=100.0, trained_s=None) is None  # training time not known


def test_the_clock_measures_training_from_the_epoch_start_to_its_validation_pass():
    clock = TrainingClock()
    clock.validation_started(now=5.0)
    assert clock.trained_s is None  # no epoch started (trainer.validate)
    clock.epoch_started(now=10.0)
    clock.validation_started(now=12.5)
    assert clock.trained_s == pytest.approx(2.5)
    clock.epoch_started(now=20.0)
    assert clock.trained_s is None


def _said(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "training waited" in r.getMessage()]


@pytest.mark.parametrize("ratio, expected", [(0.0, 1), (1e9, 0)])
def test_a_fit_says_it_once_when_rounds_outlast_training(tmp_path, caplog, monkeypatch, ratio, expected):
    # The threshold is moved instead of timing a slow round: a test must not depend on how fast this machine is.
    monkeypatch.setattr(round_cost, "SLOW_ROUND_RATIO", ratio)
    cb = explainer(StatsEncoder(), async_explain=False)
    with caplog.at_level(logging.INFO):
        fit(tmp_path, [cb], max_epochs=3, limit_train_batches=2)
    assert [r.epoch for r in cb.rounds] == [0, 1, 2]
    said = _said(caplog)
    assert len(said) == expected  # three rounds held training up; it is said once
    if expected:
        assert "round 0" in said[0] and "NeuronExplainer[" in said[0]
        caplog.clear()
        with caplog.at_level(logging.INFO):  # the same callback in another Trainer: another run, said again
            fit(tmp_path / "again", [cb], max_epochs=1, limit_train_batches=2)
        assert len(_said(caplog)) == 1


def test_rounds_that_hold_no_training_up_are_not_reported(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(round_cost, "SLOW_ROUND_RATIO", 0.0)
    # The schedule explains nothing during the fit, only at its end: training never waited.
    cb = explainer(StatsEncoder(), async_explain=False, every_n_epochs=None, explain_on_fit_end=True)
    with caplog.at_level(logging.INFO):
        fit(tmp_path, [cb], max_epochs=2, limit_train_batches=2)
    assert [r.epoch for r in cb.rounds] == [1]
    assert _said(caplog) == []
