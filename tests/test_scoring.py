import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from sklearn.metrics import roc_auc_score

from lightning_neurons.explanation.scoring import (
    batched_auc,
    concept_scores,
    mann_whitney_auc,
    rank_weights,
    score_layer,
)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_sklearn_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 5, (12,), generator=g).float()  # many ties
    neg = torch.randint(0, 4, (30,), generator=g).float()
    expected = roc_auc_score([1] * 12 + [0] * 30, torch.cat([pos, neg]).numpy())
    assert mann_whitney_auc(pos, neg) == pytest.approx(expected)


def test_batched_auc_rows_and_invalid_slots():
    g = torch.Generator().manual_seed(3)
    pos = torch.rand(4, 6, generator=g)
    neg = torch.rand(4, 20, generator=g)
    valid = torch.ones(4, 6, dtype=torch.bool)
    valid[1, 3:] = False
    valid[3] = False
    auc = batched_auc(pos, valid, neg)
    for u in range(3):
        p = pos[u][valid[u]]
        expected = roc_auc_score([1] * len(p) + [0] * 20, torch.cat([p, neg[u]]).numpy())
        assert auc[u].item() == pytest.approx(expected, abs=1e-6)
    assert torch.isnan(auc[3])


def test_rank_weights_decrease_and_sum_to_one():
    w = rank_weights(torch.tensor([[True, True, True, False]]))
    assert w[0, 0] > w[0, 1] > w[0, 2] > 0 and w[0, 3] == 0
    assert w.sum().item() == pytest.approx(1.0)


def _everything_setup():
    """8 units, each truly about concept u; concept 8 'matches everything' (high similarity with every crop)."""
    g = torch.Generator().manual_seed(0)
    units, k, num_c = 8, 5, 9
    crop_sims = torch.rand(units * k + 40, num_c, generator=g) * 0.2
    for u in range(units):
        crop_sims[u * k : (u + 1) * k, u] += 0.5  # each unit's crops match its own concept
    crop_sims[:, 8] = 0.74 + 0.02 * torch.rand(crop_sims.shape[0], generator=g)  # matches everything, more
    crop_index = torch.arange(units * k).reshape(units, k)
    control_sims = crop_sims[units * k :]
    return crop_sims, crop_index, control_sims


@pytest.mark.parametrize("correction", ["control", "soft_wpmi"])
def test_corrections_demote_concept_that_matches_everything(correction):
    crop_sims, crop_index, control_sims = _everything_setup()
    valid = crop_index >= 0
    # without correction the everything-concept wins for every unit ...
    raw = torch.einsum("uk,ukc->uc", rank_weights(valid), crop_sims[crop_index])
    assert (raw.argmax(dim=1) == 8).all()
    # ... with either correction every unit gets its own concept
    res = score_layer(crop_sims, crop_index, control_sims, correction, num_alternatives=3)
    assert res.top_indices[:, 0].tolist() == list(range(8))
    assert (res.auc > 0.9).all() and (res.margin > 0.3).all()
    assert res.top_indices.shape == (8, 4)


def test_score_layer_handles_empty_slots_and_bad_correction():
    crop_sims, crop_index, control_sims = _everything_setup()
    crop_index = crop_index.clone()
    crop_index[0, 2:] = -1
    res = score_layer(crop_sims, crop_index, control_sims, "control", num_alternatives=2)
    assert res.top_indices[0, 0] == 0
    with pytest.raises(ValueError, match="correction"):
        concept_scores(crop_sims[crop_index.clamp_min(0)], crop_index >= 0, control_sims, "nope")


def test_control_z_score_option_keeps_own_concepts_and_validates():
    crop_sims, crop_index, control_sims = _everything_setup()
    res = score_layer(crop_sims, crop_index, control_sims, "control", num_alternatives=3, control_scale="std")
    assert res.top_indices[:, 0].tolist() == list(range(8))
    plain = concept_scores(crop_sims[crop_index], crop_index >= 0, control_sims, "control")
    z = concept_scores(crop_sims[crop_index], crop_index >= 0, control_sims, "control", control_scale="std")
    assert torch.allclose(z * control_sims.std(dim=0).clamp_min(1e-4)[None], plain, atol=1e-5)
    with pytest.raises(ValueError, match="control_scale"):
        concept_scores(crop_sims[crop_index], crop_index >= 0, control_sims, "control", control_scale="mad")
