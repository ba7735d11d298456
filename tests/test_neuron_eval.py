"""NeuronEval's missing-labels and extra-labels tests on the benchmark classifier's output units (reduced run).

The full run is ``benchmarks/neuron_eval.py`` (results in benchmarks/results/neuron_eval.json, table in the README).
"""

from __future__ import annotations

import torch

from lightning_neurons.benchmark.neuron_eval import (
    TESTS,
    NeuronEvalConfig,
    candidate_metrics,
    degrade,
    own_class_auprc,
    run_neuron_eval,
)
from lightning_neurons.evaluation import candidate_metrics as M


def test_degradations_are_neuron_evals_edits_on_labels() -> None:
    gen = torch.Generator().manual_seed(0)
    labels = torch.zeros(400, 2)
    labels[:40, 0] = 1.0
    labels[40:80, 1] = 1.0
    positives = labels.bool()
    missing = degrade(labels, positives, "missing_labels", 0.5, gen)
    extra = degrade(labels, positives, "extra_labels", 1.0, gen)
    assert (missing <= labels).all() and (extra >= labels).all()  # only removals / only additions
    assert 10 <= int(missing[:, 0].sum()) <= 30  # about half of the 40 positives kept
    assert 60 <= int(extra[:, 0].sum()) <= 100  # about as many false positives added as there were positives
    sims = torch.rand(400, 2, generator=gen)
    moved = degrade(sims, positives, "extra_labels", 1.0, gen)
    changed = moved[:, 0] != sims[:, 0]
    assert not changed[:40].any() and changed.any()  # concept 0's positives keep their similarity
    assert set(moved[changed, 0].tolist()) <= set(sims[:40, 0].tolist())  # false positives take a positive's


def test_a_perfect_unit_passes_correlation_and_shows_what_auc_misses_on_rare_concepts() -> None:
    # NeuronEval's theoretical setting: the unit is its concept (a rare one). AUC barely moves with extra labels.
    n = 5000
    labels = torch.zeros(n, 1)
    labels[:5] = 1.0
    acts = labels.clone()
    gen = torch.Generator().manual_seed(0)
    extra = degrade(labels, labels.bool(), "extra_labels", 1.0, gen)
    assert float(M.correlation(acts, extra)) < float(M.correlation(acts, labels)) - 0.1
    drop = float(M.auc(acts, labels, alpha=5 / n)) - float(M.auc(acts, extra, alpha=5 / n))
    assert 0 <= drop < 0.002  # below NeuronEval's epsilon of 0.001 x range, give or take the draw


def test_own_class_auprc_rewards_the_diagonal() -> None:
    assert own_class_auprc(torch.eye(3)) == 1.0
    assert own_class_auprc(1 - torch.eye(3)) < 0.5


def test_reduced_neuron_eval_table_on_real_units() -> None:
    torch.set_num_threads(1)
    cfg = NeuronEvalConfig(
        seeds=(0,),
        draws=3,
        epochs=3,
        train_per_class=24,
        eval_per_class=16,
        sources=("labels",),
        frequencies=(None, 0.02),
    )
    out = run_neuron_eval(cfg)
    names = set(candidate_metrics())
    assert set(out["table"]) == set(out["metrics"]) == names
    for name in names:
        row = out["metrics"][name]["labels"]
        assert set(row) == {"alpha", *TESTS}
        for test in TESTS:
            result = row[test]
            assert isinstance(result["pass"], bool) and 0.0 <= result["decrease_rate"] <= 1.0
            assert set(result["by_frequency"]) == {"natural", "0.02"}
            assert result["pass"] == (result["decrease_rate"] >= cfg.pass_rate)
            assert out["table"][name]["labels"][test] == result["pass"]
    assert out["setup"]["units"]["held_out"] >= 13 and out["setup"]["encoder"] is None
    # What the full run measures (benchmarks/results/neuron_eval.json) holds on this reduced run too.
    assert all(out["table"]["correlation"]["labels"].values())
    assert not all(out["table"]["auc"]["labels"].values())
