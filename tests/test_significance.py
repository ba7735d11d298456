"""The headline score, the per-round significance tests, kinds, and per-layer determinism (issue 21, items 1-3)."""

import functools
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score
from torch.utils.data import DataLoader

from _cheap import cheap_backend
from _explained import COLOURS, ColourEncoder, ColourImages, colour_model
from lightning_neurons import collect_top_k, explain
from lightning_neurons.backends.base import Backend
from lightning_neurons.demo import PhotoPatches, SmallCNN
from lightning_neurons.explanation import metrics
from lightning_neurons.explanation.pipeline import explain_recording
from lightning_neurons.explanation.seeding import hashed_folds, layer_seed
from lightning_neurons.explanation.settings import ExplainConfig
from lightning_neurons.explanation.significance import (
    STATISTICS,
    UnitSamples,
    benjamini_hochberg,
    concept_gain,
    image_statistics,
    layer_significance,
    permutation_test,
)
from lightning_neurons.recording.samples import DataLoaderSampleSource
from lightning_neurons.results import DEAD_UNIT


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ metrics: known answers
def test_correlation_and_cosine_match_their_definitions_with_weights_leaving_samples_out():
    g = _gen()
    acts, sims = torch.randn(5, 40, generator=g), torch.randn(40, 7, generator=g)
    corr = metrics.correlation(acts, sims)
    for u in range(5):
        for c in range(7):
            want = torch.corrcoef(torch.stack([acts[u], sims[:, c]]))[0, 1]
            assert corr[u, c].item() == pytest.approx(want.item(), abs=1e-5)
    # weights 0 leave samples out: the same as slicing them away; per-unit [U, N, C] concepts give the same answer
    w = torch.ones(5, 40)
    w[:, 30:] = 0
    assert torch.allclose(metrics.correlation(acts, sims, w), metrics.correlation(acts[:, :30], sims[:30]), atol=1e-5)
    per_unit = sims[None].expand(5, -1, -1)
    assert torch.allclose(metrics.correlation(acts, per_unit), corr, atol=1e-6)
    cos = metrics.cosine(acts, sims)
    want = torch.nn.functional.normalize(acts, dim=1) @ torch.nn.functional.normalize(sims, dim=0)
    assert torch.allclose(cos, want, atol=1e-5)
    assert metrics.correlation(torch.ones(1, 4), sims[:4]).abs().max() == 0  # a constant unit correlates with nothing


def test_auc_and_auprc_match_sklearn():
    g = _gen(1)
    acts = torch.randn(3, 60, generator=g).round(decimals=1)  # ties included
    labels = torch.rand(60, 4, generator=g) < 0.3
    auc, ap = metrics.auc(acts, labels), metrics.auprc(acts + 1e-4 * torch.arange(60), labels)
    for u in range(3):
        for c in range(4):
            assert auc[u, c].item() == pytest.approx(roc_auc_score(labels[:, c], acts[u]), abs=1e-5)
            want = average_precision_score(labels[:, c], acts[u] + 1e-4 * torch.arange(60))
            assert ap[u, c].item() == pytest.approx(want, abs=1e-5)
    assert math.isnan(metrics.auc(acts, torch.zeros(60, 1, dtype=torch.bool))[0, 0].item())


def test_correlation_keeps_its_scale_when_concepts_are_added_and_wpmi_does_not():
    g = _gen(2)
    sims = torch.rand(200, 3, generator=g)
    acts = (sims[:, 0] + 0.3 * torch.rand(200, generator=g))[None]
    more = torch.cat([sims, torch.rand(200, 300, generator=g)], dim=1)  # 300 more concepts
    assert metrics.correlation(acts, more)[0, 0].item() == pytest.approx(metrics.correlation(acts, sims)[0, 0].item())
    assert metrics.wpmi(acts, more)[0, 0].item() != pytest.approx(metrics.wpmi(acts, sims)[0, 0].item(), abs=1e-2)
    assert metrics.wpmi(acts, sims).argmax().item() == 0


# ------------------------------------------------------------------ (a) permutation test and BH
def test_permutation_p_values_of_null_units_are_roughly_uniform_and_a_driven_unit_is_small():
    g = _gen(3)
    sims = torch.rand(120, 20, generator=g)
    null = torch.rand(300, 120, generator=g)  # activations independent of every concept
    p = permutation_test(null, sims, None, permutations=99, generator=_gen(4))
    assert float(p.min()) >= 0.01 - 1e-6 and float(p.max()) <= 1.0
    assert 0.42 < float(p.mean()) < 0.58, float(p.mean())
    assert 0.02 <= float((p <= 0.05).float().mean()) <= 0.09
    assert 0.15 <= float((p <= 0.25).float().mean()) <= 0.35
    driven = (sims[:, 7] + 0.5 * torch.rand(120, generator=g))[None]
    assert permutation_test(driven, sims, None, permutations=99, generator=_gen(4)).item() == pytest.approx(0.01)
    # a unit's p-value does not depend on the memory budget (how many permutations go into one block)
    small = permutation_test(null[:4], sims, None, permutations=99, generator=_gen(5), budget=5000)
    large = permutation_test(null[:4], sims, None, permutations=99, generator=_gen(5))
    assert torch.equal(small, large)


def test_units_that_cannot_be_significant_stop_early_and_the_others_keep_their_p_values():
    from lightning_neurons.explanation.significance import benjamini_hochberg, sequential_stop

    g = _gen(11)
    sims = torch.rand(150, 30, generator=g)
    strength = torch.linspace(0.0, 0.6, 60)[:, None]  # from null units to clearly driven ones
    acts = strength * sims[:, :1].T + torch.rand(60, 150, generator=g)
    acts[:3] = 0.7  # constant units: NaN either way
    stop = sequential_stop(200, 0.05)
    assert stop == 21
    full_gen, seq_gen = _gen(12), _gen(12)
    full = permutation_test(acts, sims, None, permutations=200, generator=full_gen)
    seq = permutation_test(acts, sims, None, permutations=200, generator=seq_gen, stop_after=stop)
    assert torch.equal(full_gen.get_state(), seq_gen.get_state())  # the same draws: later tests see the same numbers
    assert full[:3].isnan().all() and seq[:3].isnan().all()
    stopped = seq >= stop / 200
    going = seq < stop / 200
    assert 10 <= int(stopped.sum()) <= 50 and int(going.sum()) >= 10  # both kinds are in the layer
    assert torch.equal(seq[going], full[going])  # the units that went on: the same permutations, the same p-values
    assert bool((full[stopped] >= (stop + 1) / 201 - 1e-7).all())  # the stopped ones were above it with all 200
    assert bool((seq[stopped] <= 1.0).all())
    # Benjamini-Hochberg: every q-value below h / B is the same, and so is every decision at q <= 0.05.
    q_full, q_seq = benjamini_hochberg(full), benjamini_hochberg(seq)
    small = q_full < stop / 200
    assert int(small.sum()) >= 5 and torch.equal(q_seq[small], q_full[small])
    assert torch.equal(q_seq <= 0.05, q_full <= 0.05) and bool((q_seq[~small & ~q_seq.isnan()] >= stop / 200).all())


def test_permutations_stay_inside_each_units_samples():
    sims = torch.eye(4).repeat(10, 1)
    acts = sims[:, 1][None].repeat(2, 1) * 3.0
    weights = torch.ones(2, 40)
    weights[1, ::2] = 0  # unit 1 has 20 samples; the ones left out must not be shuffled in
    acts[1, ::2] = 100.0
    p = permutation_test(acts, sims, weights, permutations=49, generator=_gen(0))
    assert p.tolist() == pytest.approx([0.02, 0.02])


def test_benjamini_hochberg_matches_the_step_up_rule():
    p = torch.tensor([0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205, 0.212, 0.216])
    # q_(i) = min_{j >= i} p_(j) * m / j
    want = [0.01, 0.04, 0.084, 0.084, 0.084, 0.1, 0.10571, 0.216, 0.216, 0.216]
    assert benjamini_hochberg(p).tolist() == pytest.approx(want, abs=1e-4)
    assert benjamini_hochberg(p[torch.randperm(10, generator=_gen())]).sort().values.tolist() == pytest.approx(
        want, abs=1e-4
    )


# ------------------------------------------------------------------ (b) beyond image statistics
def _synthetic_layer():
    """300 samples with image statistics; concept 0 follows brightness (as real concept similarities do), concept 1
    is independent of every statistic. Unit 0 tracks brightness, unit 1 tracks concept 1, unit 2 is noise, unit 3
    never fires."""
    g = _gen(7)
    n, f = 300, len(STATISTICS)
    stats = torch.rand(n, f, generator=g)
    brightness = stats[:, STATISTICS.index("brightness")]
    sims = 0.1 * torch.rand(n, 6, generator=g)
    sims[:, 0] += brightness
    sims[:, 1] += torch.rand(n, generator=g)
    acts = torch.stack(
        [
            brightness + 0.05 * torch.rand(n, generator=g),
            sims[:, 1] + 0.05 * torch.rand(n, generator=g),
            torch.rand(n, generator=g),
            torch.zeros(n),
        ]
    )
    samples = UnitSamples(
        reservoir_ids=torch.arange(n),
        reservoir_values=acts,
        reservoir_rows=torch.arange(n),
        top_ids=torch.full((4, 1), -1),
        top_values=torch.zeros(4, 1),
        top_rows=torch.zeros(4, 1, dtype=torch.long),
    )
    return samples, sims, stats


def test_a_brightness_unit_is_low_level_a_concept_unit_is_concept_noise_unclear_and_zero_dead():
    samples, sims, stats = _synthetic_layer()
    folds = hashed_folds(torch.arange(300), 5, seed=0)
    sig = layer_significance(samples, sims, stats, folds=folds, num_folds=5, permutations=99, generator=_gen(0))
    assert sig.kinds == ["low_level", "concept", "unclear", "dead"]
    assert sig.low_level[0] == "brightness"
    assert sig.q_values[0] <= 0.05 and sig.q_values[1] <= 0.05 and sig.q_values[2] > 0.05
    assert sig.gain[0] < 0.05 < 0.5 < sig.gain[1]
    assert sig.correlations[0].argmax() == 0 and sig.correlations[1].argmax() == 1
    assert math.isnan(sig.p_values[3]) and bool(sig.dead[3]) and not bool(sig.dead[:3].any())


def test_concept_gain_chooses_the_concept_inside_the_training_folds():
    # 40 concepts of pure noise: choosing the best on all samples would leak; chosen per fold, the gain stays ~0.
    g = _gen(8)
    stats, sims = torch.rand(150, 4, generator=g), torch.rand(150, 40, generator=g)
    acts = (stats[:, 0] + 0.3 * torch.rand(150, generator=g))[None]
    gain, cv_stats, cv_both = concept_gain(acts, sims, torch.ones(1, 150), stats, torch.arange(150) % 5)
    assert cv_stats.item() > 0.8 and gain.item() < 0.02


def test_image_statistics_name_what_they_measure():
    images = torch.zeros(4, 3, 16, 16)
    images[0] = 1.0  # white
    images[1, 0] = 1.0  # red
    images[2, :, :8, :8] = 1.0  # white top-left corner
    images[3, :, :, ::2] = 1.0  # stripes
    stats = image_statistics((images * 255).to(torch.uint8))
    col = {name: stats[:, i] for i, name in enumerate(STATISTICS)}
    assert col["brightness"].argmax() == 0 and col["red"][1] == 1.0 and col["green"][1] == 0.0
    assert col["saturation"].argmax() == 1 and col["top-left blue"].argmax() in (0, 2)
    assert col["top-left blue"][2] == 1.0 and col["bottom-right blue"][2] == 0.0
    assert col["edges"].argmax() == 3 and col["red spread"][3] == pytest.approx(0.5)


# ------------------------------------------------------------------ the pipeline: dead units, kinds, settings
@functools.lru_cache(maxsize=1)
def _colour_round():
    loader = DataLoader(ColourImages(n=48), batch_size=16)
    return explain(
        colour_model([0, 1, 2]),
        loader,
        ["feat"],
        top_k=4,
        backend=Backend("colour", ColourEncoder()),
        vocabulary=["classes"],
        class_names=[*COLOURS, "thing"],
        show_progress=False,
    )


def test_a_unit_that_is_zero_on_every_probe_image_is_a_dead_unit_without_a_concept():
    # issue 21: "A unit that is zero on every probe image is described (blue thing, score 0.84)".
    dead = _colour_round().get("feat", 3)
    assert dead.activations and max(dead.activations) == 0.0
    assert dead.kind == "dead" and dead.shown == DEAD_UNIT
    assert dead.description == "" and dead.alternatives == [] and dead.combination is None
    assert math.isnan(dead.score) and dead.p_value is None and dead.concept_gain is None


def test_score_is_the_correlation_of_the_shown_description_and_auc_stays_secondary():
    rnd = _colour_round()
    for unit in rnd.layer("feat")[:3]:
        assert -1.0 <= unit.score <= 1.0 and unit.score > 0.9
        assert unit.auc is not None and 0.0 <= unit.auc <= 1.0
        assert unit.p_value is not None and unit.q_value is not None and unit.p_value <= unit.q_value + 1e-9
        assert unit.low_level == unit.description  # colour detectors follow their colour's mean
    assert rnd.meta["kinds"]["dead"] == 1 and sum(rnd.meta["kinds"].values()) == 4


def test_new_settings_are_validated_and_confidence_threshold_is_deprecated():
    for bad in (
        {"selection": "best"},
        {"permutations": -1},
        {"q_threshold": 0.0},
        {"gain_margin": 3.0},
        {"cv_folds": 1},
        {"ridge": -1.0},
    ):
        with pytest.raises(ValueError):
            ExplainConfig(**bad)
    with pytest.warns(DeprecationWarning, match="confidence_threshold"):
        ExplainConfig(confidence_threshold=0.7)
    assert ExplainConfig().selection == "concept_score" and ExplainConfig().permutations == 200


# ------------------------------------------------------------------ determinism per layer
def test_layer_seeds_are_stable_across_processes():
    # BLAKE2b of (seed, name, purpose): fixed numbers, unlike Python's salted hash()
    assert layer_seed(0, "features.block2", "permutation") == layer_seed(0, "features.block2", "permutation")
    assert layer_seed(0, "a") == 6331946935357654970


def _photo_loader() -> DataLoader:
    return DataLoader(PhotoPatches(samples_per_class=4, image_size=40), batch_size=16)


WORDS = ["red", "green", "blue", "stripes", "dots", "grass", "sky", "cat", "coffee", "rocket", "coins", "brick"]


def _records(layers, seed=0):
    torch.manual_seed(0)
    model = SmallCNN(num_classes=4, width=8).eval()
    loader = _photo_loader()
    recording = collect_top_k(model, loader, layers, top_k=4, seed=seed, show_progress=False)
    cfg = ExplainConfig(crop_size=32, preview_units={}, show_progress=False, seed=seed)
    return explain_recording(model, recording, DataLoaderSampleSource(loader), cheap_backend(), WORDS, cfg)


def test_a_layers_records_are_the_same_explained_alone_or_beside_another_layer():
    # issue 21: "The same checkpoint explained with one layer instead of two changes 7-8 of 160 descriptions of the
    # shared layer, the score by up to 0.20 ... with identical top-k sets."
    alone = _records(["features.block2"])
    beside = _records(["features.block1", "features.block2", "features.block3"])  # layers before and after it
    want = [u.to_dict() for u in alone.layer("features.block2")]
    assert want and any(u["description"] for u in want)
    for other in (beside,):
        got = [u.to_dict() for u in other.layer("features.block2")]
        assert len(got) == len(want)
        for have, expected in zip(got, want):
            for field, value in expected.items():
                if isinstance(value, float) and not math.isnan(value):
                    assert have[field] == pytest.approx(value, rel=1e-5, abs=1e-6), (have["unit"], field)
                elif field != "epoch":
                    assert have[field] == value or (value != value and have[field] != have[field]), (
                        have["unit"],
                        field,
                    )


def test_the_reservoir_rows_kept_once_give_the_tests_of_the_repeated_rows() -> None:
    from lightning_neurons.explanation.metrics import SharedSampleValues, correlation
    from lightning_neurons.explanation.significance import concept_gain, permutation_test

    g = torch.Generator().manual_seed(3)
    units, reservoir, own, concepts = 6, 40, 5, 7
    shared, per_unit = torch.rand(reservoir, concepts, generator=g), torch.rand(units, own, concepts, generator=g)
    split = SharedSampleValues(shared, per_unit)
    dense = split.dense()
    assert dense.shape == (units, reservoir + own, concepts)
    acts = torch.rand(units, reservoir + own, generator=g)
    acts[0] += 3 * dense[0, :, 2]  # one unit that follows a concept
    weights = torch.ones(units, reservoir + own)
    weights[1, -2:] = 0  # a top sample that is also in the reservoir counts once
    torch.testing.assert_close(correlation(acts, split, weights), correlation(acts, dense, weights))
    p_split = permutation_test(acts, split, weights, permutations=49, generator=torch.Generator().manual_seed(0))
    p_dense = permutation_test(acts, dense, weights, permutations=49, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(p_split, p_dense)
    assert float(p_split[0]) <= 0.02
    statistics = torch.rand(reservoir + own, 4, generator=g)
    folds = torch.arange(reservoir + own) % 5
    for a, b in zip(
        concept_gain(acts, split, weights, statistics, folds), concept_gain(acts, dense, weights, statistics, folds)
    ):
        torch.testing.assert_close(a, b)
    chosen = torch.tensor([2, 0, 1, 6, 3, 4])
    torch.testing.assert_close(split.column(chosen), dense.gather(2, chosen[:, None, None].expand(-1, 45, 1))[..., 0])
