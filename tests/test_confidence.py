"""Sanity and diversity: the explanation confidence, the "no clear concept" threshold and the frequency penalty.

The real pipeline explains two 1x1-conv networks on colour images with a colour encoder: one whose units are
colour detectors (what training makes here) and one with random positive weights, whose units all follow
brightness and so fire on the same brightest images whatever their colour (what a random network's units that
all look alike do). AUC against random controls cannot tell them apart well; the confidence must.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections import Counter, OrderedDict

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from _explained import COLOURS, ColourEncoder, ColourImages
from lightning_neurons import collect_top_k
from lightning_neurons.backends.base import Backend
from lightning_neurons.config import RunConfig
from lightning_neurons.drift.history import HistoryRecord, RunHistory
from lightning_neurons.explanation.pipeline import explain_recording
from lightning_neurons.explanation.scoring import NO_CLEAR_CONCEPT, frequency_penalty, score_layer, shared_units
from lightning_neurons.explanation.settings import ExplainConfig
from lightning_neurons.logging.base import RoundOutput
from lightning_neurons.logging.report import render_report
from lightning_neurons.logging.tensorboard import NeuronTensorBoardLogger
from lightning_neurons.recording.samples import DataLoaderSampleSource

UNITS = 6


def _model(weight: torch.Tensor) -> nn.Sequential:
    model = nn.Sequential(OrderedDict(feat=nn.Conv2d(3, UNITS, 1, bias=False), pool=nn.AdaptiveAvgPool2d(1)))
    with torch.no_grad():
        model.feat.weight.copy_(weight[:, :, None, None])
    return model.eval()


def _explain(weight: torch.Tensor, **settings):
    """Explain with the deprecated confidence computed (``confidence_samples``; off by default since kinds decide)."""
    loader = DataLoader(ColourImages(n=48), batch_size=16)
    model = _model(weight)
    recording = collect_top_k(model, loader, ["feat"], top_k=4, show_progress=False)
    # The confidence was built for descriptions chosen by the corrected concept score.
    cfg = ExplainConfig(confidence_samples=256, selection="concept_score", show_progress=False, **settings)
    backend = Backend("colour", ColourEncoder())
    return explain_recording(
        model, recording, DataLoaderSampleSource(loader), backend, [*COLOURS, "thing"], cfg, epoch=0
    )


def _trained() -> torch.Tensor:
    return torch.eye(3).repeat(2, 1) * torch.tensor([1.0, 1.0, 1.0, 0.8, 0.8, 0.8])[:, None]  # colour detectors


def _random() -> torch.Tensor:
    return 0.5 + 0.03 * torch.rand(UNITS, 3, generator=torch.Generator().manual_seed(0))  # brightness followers


@pytest.fixture(scope="module")
def rounds():
    return _explain(_trained()), _explain(_random())


def test_random_weights_sit_near_chance_and_trained_units_clear_the_threshold(rounds):
    trained, random = rounds
    threshold = ExplainConfig().confidence_threshold
    assert trained.meta["confidence_threshold"] == threshold
    t_conf = torch.tensor([u.confidence for u in trained.units])
    r_conf = torch.tensor([u.confidence for u in random.units])
    assert (t_conf > threshold).all(), t_conf
    assert float(r_conf.median()) < 0.75 and float(r_conf.mean()) < float(t_conf.mean()) - 0.2, (r_conf, t_conf)
    assert float((r_conf > threshold).float().mean()) <= 0.2, r_conf
    # The old score (AUC against random controls) is not what tells them apart: random units pass it too.
    assert min(u.auc for u in random.units) > 0.5
    assert {u.description for u in trained.units} == set(COLOURS)


def test_kinds_replace_the_confidence_colour_detectors_are_low_level_and_brightness_followers_never_concepts(rounds):
    trained, random = rounds
    # Colour detectors are explained by the colour statistics alone: "low-level: red", never an object word.
    assert [u.kind for u in trained.units] == ["low_level"] * UNITS
    assert [u.low_level for u in trained.units] == [u.description for u in trained.units]
    assert all(u.q_value is not None and u.q_value <= 0.05 for u in trained.units)
    assert all(u.shown == f"low-level: {u.description}" for u in trained.units)
    # Units that all follow brightness are associated with no colour concept.
    assert not any(u.kind == "concept" for u in random.units)
    assert all(u.score < max(t.score for t in trained.units) for u in random.units)


def test_the_kind_decides_what_is_shown_not_the_threshold(rounds):
    _, random = rounds
    assert [u.kind for u in random.units] == ["unclear"] * UNITS
    for threshold in (0.85, None):  # deprecated: it no longer shows or hides anything
        assert NO_CLEAR_CONCEPT in NeuronTensorBoardLogger.table(random.units, {}, threshold=threshold)
    assert RunConfig.from_arguments("feat", confidence_threshold=None).explain.confidence_threshold is None


def test_threshold_none_shows_every_description(rounds):
    import dataclasses

    _, random = rounds
    # Records made before kinds (kind=None) keep the confidence rule they were shown with; a unit's kind wins over it.
    legacy = [dataclasses.replace(u, kind=None) for u in random.units]
    assert NO_CLEAR_CONCEPT in NeuronTensorBoardLogger.table(legacy, {}, threshold=0.85)
    assert NO_CLEAR_CONCEPT not in NeuronTensorBoardLogger.table(legacy, {}, threshold=None)
    assert RunConfig.from_arguments("feat", confidence_threshold=None).explain.confidence_threshold is None
    assert ExplainConfig().confidence_samples == 0  # the confidence decides nothing now: not computed by default


def _generic_layer(shared: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """10 units of 4 crops each. Concept 0 is generic: a little above the controls on every unit's crops, more than
    each unit's own concept ``1 + u``. The first ``shared`` units fire on the same crops, which really match
    concept 11 strongly."""
    g = torch.Generator().manual_seed(0)
    units, k, num_c = 10, 4, 12
    crop_sims = 0.1 * torch.rand(units * k + 40, num_c, generator=g)
    crop_sims[: units * k, 0] += 0.5
    for u in range(units):
        crop_sims[u * k : (u + 1) * k, 1 + u] += 0.4
    crop_index = torch.arange(units * k).reshape(units, k)
    crop_index[:shared] = crop_index[0]
    if shared:
        crop_sims[:k, 11] += 0.7
    return crop_sims, crop_index, crop_sims[units * k :]


def test_frequency_penalty_lowers_the_top_share_of_a_generic_concept():
    crop_sims, crop_index, control = _generic_layer(shared=0)
    plain = score_layer(crop_sims, crop_index, control)
    penalised = score_layer(crop_sims, crop_index, control, frequency_weight=1.0)
    assert plain.top_indices[:, 0].tolist() == [0] * 10  # the generic concept wins everywhere
    assert penalised.top_indices[:, 0].tolist() == list(range(1, 11))  # each unit's own concept
    assert max(Counter(penalised.top_indices[:, 0].tolist()).values()) == 1


def test_frequency_penalty_keeps_a_concept_the_units_really_share():
    crop_sims, crop_index, control = _generic_layer(shared=5)
    penalised = score_layer(crop_sims, crop_index, control, frequency_weight=1.0)
    assert penalised.top_indices[:5, 0].tolist() == [11] * 5  # same top samples: the shared concept stays
    assert penalised.top_indices[5:, 0].tolist() == list(range(6, 11))
    sharing = shared_units(crop_index, crop_index >= 0, 0.5)
    assert sharing[:5, :5].all() and not sharing[:5, 5:].any()
    # Every unit shares only with itself: the penalty is the plain mean over the other units.
    scores = score_layer(crop_sims, crop_index, control).scores
    others = (scores.sum(dim=0, keepdim=True) - scores) / (scores.shape[0] - 1)
    assert torch.allclose(frequency_penalty(scores, None, 1.0), scores - others, atol=1e-6)


def test_shared_units_by_top_sample_overlap():
    samples = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 9], [5, 6, 7, 8]])
    valid = torch.ones(3, 4, dtype=torch.bool)
    expected = [[True, True, False], [True, True, False], [False, False, True]]
    assert shared_units(samples, valid, 0.5).tolist() == expected
    assert shared_units(samples, valid, 1.0)[0, 1].item() is False


def test_tensorboard_and_report_show_no_clear_concept_and_the_threshold(rounds, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    _, random = rounds
    history = RunHistory()
    drift = history.add_round(random, Backend("colour", ColourEncoder()).encode_descriptions, epoch=0)
    writer = SummaryWriter(str(tmp_path))
    NeuronTensorBoardLogger(writer, log_units=None).write_round(
        RoundOutput(random, drift, history.summary(0), step=0, epoch=0)
    )
    writer.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    threshold = random.meta["confidence_threshold"]
    assert acc.Scalars("neurons/confidence_threshold")[0].value == pytest.approx(threshold)
    unclear = [u for u in random.units if u.kind == "unclear"]
    assert unclear
    table = acc.Tensors("neurons/feat/table/text_summary")[0].tensor_proto.string_val[0].decode()
    assert NO_CLEAR_CONCEPT in table and f"confidence threshold {threshold:.3f}" in table
    text = acc.Tensors(f"neurons/feat/{unclear[0].unit}/description/text_summary")[0].tensor_proto.string_val[0]
    # The raw best concept is never shown (every sink shows the same row); the kind and its q-value say why.
    assert text.decode().startswith(f"**{NO_CLEAR_CONCEPT}** (unclear, score ")
    assert unclear[0].description not in text.decode()
    share = acc.Scalars("neurons/feat/confident_fraction")[0].value
    # the deprecated scalar still counts the units above the confidence threshold (it decides nothing shown)
    assert share == pytest.approx(sum(u.confidence > threshold for u in random.units) / len(random.units))

    html = render_report(history)
    assert NO_CLEAR_CONCEPT in html and f"units with confidence &le; {threshold:g}" in html
    # The history keeps the raw best concept, its confidence and the threshold.
    record = history.records[[r.explanation.unit for r in history.records].index(unclear[0].unit)]
    back = HistoryRecord.from_dict(record.to_dict())
    assert back.explanation.description == unclear[0].description != NO_CLEAR_CONCEPT
    assert back.explanation.confidence == pytest.approx(unclear[0].confidence)
    assert back.confidence_threshold == pytest.approx(threshold)


def test_old_history_records_load_without_confidence():
    record = HistoryRecord.from_dict({"layer": "l", "unit": 0, "epoch": 0, "description": "red", "score": 0.9})
    assert record.explanation.confidence is None and record.confidence_threshold is None
    assert "confidence" not in record.to_dict() and "confidence_threshold" not in record.to_dict()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"confidence_threshold": 1.5}, "confidence_threshold"),
        ({"confidence_threshold": True}, "confidence_threshold"),
        ({"frequency_penalty": -0.1}, "frequency_penalty"),
        ({"frequency_penalty": "high"}, "frequency_penalty"),
        ({"selection": "auc"}, "selection"),
        ({"permutations": -1}, "permutations"),
        ({"permutations": 2.5}, "permutations"),
        ({"permutations": True}, "permutations"),
        ({"q_threshold": 0.0}, "q_threshold"),
        ({"q_threshold": "0.05"}, "q_threshold"),
        ({"gain_margin": 2.0}, "gain_margin"),
        ({"gain_margin": True}, "gain_margin"),
    ],
)
def test_flat_arguments_are_validated(arguments, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_arguments("feat", **arguments)


def test_explain_config_validation_and_flat_views():
    for bad in ({"confidence_samples": -1}, {"shared_overlap": 0.0}, {"frequency_penalty": -1.0}):
        with pytest.raises(ValueError):
            ExplainConfig(**bad)
    cfg = RunConfig.from_arguments("feat", confidence_threshold=None, frequency_penalty=0.0).explain
    assert cfg.confidence_threshold is None and cfg.frequency_penalty == 0.0
    from lightning_neurons import NeuronExplainer

    explainer = NeuronExplainer("feat", confidence_threshold=0.7, frequency_penalty=0.5)
    assert explainer.confidence_threshold == 0.7 and explainer.frequency_penalty == 0.5


def test_significance_settings_flow_from_the_callback_into_explain_config():
    from lightning_neurons import NeuronExplainer

    flat = {"selection": "correlation", "permutations": 50, "q_threshold": 0.1, "gain_margin": 0.02}
    defaults = ExplainConfig()
    assert all(getattr(defaults, k) != v for k, v in flat.items())  # each value below differs from the default
    explainer = NeuronExplainer(layers=["feat"], backend="embedded", **flat)
    assert {k: getattr(explainer.config.explain, k) for k in flat} == flat
    assert {k: getattr(explainer, k) for k in flat} == flat  # the callback's read-only flat views
    assert RunConfig.from_arguments("feat").explain.permutations == defaults.permutations  # same defaults
