"""Multi-concept explanations: a planted combination is recovered, and kept only when it simulates better."""

from __future__ import annotations

import pytest
import torch

from lightning_neurons.explanation.multi_concept import (
    _greedy_nnls,
    _nnls_small,
    combination_embedding,
    explain_combinations,
    fit_combination,
    format_combination,
)
from lightning_neurons.results import Alternative, ExplanationRound, UnitExplanation


def _space(n: int = 200, c: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.normalize(torch.randn(n, c, generator=gen), dim=-1)
    return images, torch.eye(c)  # concept j is axis j, so sim(image, concept j) = image[:, j]


def test_fit_combination_recovers_a_planted_sparse_combination() -> None:
    images, concepts = _space()
    acts = 3 * images[:, 2] + 1 * images[:, 7] + 0.01 * torch.randn(len(images), generator=torch.Generator())
    pairs = fit_combination(acts, images @ concepts.T, max_concepts=3)
    assert [i for i, _ in pairs[:2]] == [2, 7]
    assert abs(pairs[0][1] / pairs[1][1] - 3) < 0.3 and all(w >= 0 for _, w in pairs)
    assert fit_combination(torch.ones(len(images)), images) == []  # a constant unit has nothing to explain


def test_a_combination_is_kept_only_where_it_beats_the_description_held_out() -> None:
    images, concepts = _space()
    texts = [f"c{j}" for j in range(concepts.shape[0])]
    acts = torch.stack([images[:, 0] + images[:, 1], images[:, 3]], dim=1)  # unit 0: two concepts; unit 1: one
    rnd = ExplanationRound(
        epoch=0,
        units=[UnitExplanation("l", 0, 0, "c0", 0.9), UnitExplanation("l", 1, 0, "c3", 0.9)],
    )
    kept = explain_combinations(rnd, "l", acts, images, texts, concepts)
    assert list(kept) == [0]
    assert {a.text for a in kept[0][:2]} == {"c0", "c1"}
    assert format_combination(kept[0][:2]).count("+") == 1
    emb = combination_embedding([(0, 1.0), (1, 1.0)], concepts)
    assert torch.equal(emb[:2], torch.ones(2))
    assert (
        format_combination([Alternative("stripes", 1.0), Alternative("zebra", 1.0)]) == "stripes (0.50) + zebra (0.50)"
    )


def test_a_combination_round_trips_through_the_round_and_the_history(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from lightning_neurons.drift.history import HistoryRecord, RunHistory

    combo = [Alternative("stripes", 0.7), Alternative("zebra", 0.3)]
    unit = UnitExplanation("l", 0, 1, "stripes", 0.8, combination=combo)
    plain = UnitExplanation("l", 1, 1, "grass", 0.6)
    rnd = ExplanationRound(epoch=1, units=[unit, plain])
    again = ExplanationRound.from_json(rnd.to_json())
    assert again.get("l", 0).combination == combo and again.get("l", 1).combination is None
    history = RunHistory()
    history.add_round(rnd, lambda texts: torch.eye(8)[: len(texts)])
    records = {r.explanation.unit: r for r in history.records}
    assert records[0].to_dict()["combination"] == [{"text": "stripes", "score": 0.7}, {"text": "zebra", "score": 0.3}]
    assert "combination" not in records[1].to_dict()
    assert HistoryRecord.from_dict(records[0].to_dict()).explanation.combination == combo


def test_units_below_the_confidence_threshold_show_no_clear_concept() -> None:
    from lightning_neurons.explanation.scoring import NO_CLEAR_CONCEPT, confident, shown_description

    assert confident(0.9, 0.8) and not confident(0.8, 0.8) and not confident(float("nan"), 0.5)
    assert shown_description("stripes", 0.7, 0.8) == NO_CLEAR_CONCEPT == "no clear concept"
    assert shown_description("stripes", 0.7, None) == "stripes" == shown_description("stripes", 0.9, 0.8)


def test_collinear_concepts_do_not_make_the_fit_fail_as_singular() -> None:
    # Two concepts whose similarities are identical on every sample (a random or tiny encoder gives such pairs) made
    # the batched subset solve raise "input matrix is singular" for the whole layer; the fit now falls back to the
    # minimum-norm solution, which predicts as well as the one-concept fit.
    gen = torch.Generator().manual_seed(0)
    one_top, one_res = torch.rand(4, 6, 1, generator=gen), torch.rand(20, 1, generator=gen)
    acts_top = torch.rand(4, 6, generator=gen)
    acts_res = 2 * one_res[:, 0].repeat(4, 1) + 0.1 * torch.rand(4, 20, generator=gen)
    ones = (torch.ones(4, 6), torch.ones(4, 20))
    _, w_two = _greedy_nnls(one_top.repeat(1, 1, 2), one_res.repeat(1, 2), acts_top, acts_res, *ones, max_concepts=2)
    _, w_one = _greedy_nnls(one_top, one_res, acts_top, acts_res, *ones, max_concepts=1)
    assert torch.isfinite(w_two).all() and (w_two >= 0).all()
    assert torch.allclose(w_two.sum(1), w_one.sum(1), rtol=1e-3)  # the same prediction, however it is split
    # The exact subset solver on a singular Gram matrix: the optimum objective (-1), not an error.
    gram, rhs = torch.tensor([[[1.0, 1.0], [1.0, 1.0]]]), torch.tensor([[1.0, 1.0]])
    w = _nnls_small(gram, rhs, torch.ones(1, 2, dtype=torch.bool))
    assert (w >= 0).all() and float(w[0] @ gram[0] @ w[0] - 2 * (w * rhs).sum()) == pytest.approx(-1.0)
