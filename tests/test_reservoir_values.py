"""The multi-concept stage reads each reservoir sample's whole-map value, not the max of a random subset of positions.

The forward stage keeps at most ``ceil(max_control_values / reservoir)`` random positions of each reservoir sample's
map for the quantile threshold; for maps larger than that, the maximum over those positions is below the unit's real
value on the sample, which the multi-concept fit then regressed on.
"""

from __future__ import annotations

import pytest
import torch

from lightning_neurons.explanation.forward import RoundSamples, forward_samples
from lightning_neurons.explanation.multi_concept import _reservoir_values
from lightning_neurons.explanation.pipeline import ExplainConfig
from test_pipeline import CFG, ListSource, PlantedNet, make_data, record


def _true_values(model: PlantedNet, images: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[U, R]`` max and mean of each unit's ``pool`` map on the given samples, computed directly."""
    with torch.no_grad():
        maps = model.pool(model.act(model.detect(images[ids])))  # [R, U, 16, 16]
    return maps.flatten(2).amax(dim=2).T, maps.flatten(2).mean(dim=2).T


def test_reservoir_values_are_whole_map_values_for_large_maps() -> None:
    images, _, _ = make_data(48)
    model = PlantedNet().eval()
    rec = record(model, ["pool"], images, top_k=4, reservoir=12)
    # 12 reservoir samples x 8 positions kept of each 16 x 16 map: the threshold's sample is a subset.
    cfg = ExplainConfig(**CFG, max_control_values=96)
    samples = RoundSamples.of(rec)
    forward = forward_samples(model, samples, ListSource(images), cfg, torch.device("cpu"))
    lm = forward.layers["pool"]
    want_max, want_mean = _true_values(model, images, samples.reservoir)
    assert lm.control_values().shape == (4, 12 * 8)  # the quantile sample stays bounded
    got = _reservoir_values(lm.reservoir_values("max"), samples.reservoir.numel(), 4, torch.device("cpu"))
    torch.testing.assert_close(got, want_max)
    torch.testing.assert_close(lm.reservoir_values("mean"), want_mean)
    # What the stage read before: the max over the kept positions, below the real value for some samples.
    subset = lm.control_values().reshape(4, 12, 8).amax(dim=2)
    assert bool((subset < want_max - 1e-6).any()) and bool((subset <= want_max + 1e-6).all())


def test_reservoir_values_reject_an_unknown_reduction() -> None:
    images, _, _ = make_data(16)
    model = PlantedNet().eval()
    rec = record(model, ["pool"], images, top_k=2, reservoir=4)
    cfg = ExplainConfig(**CFG)
    forward = forward_samples(model, RoundSamples.of(rec), ListSource(images), cfg, torch.device("cpu"))
    with pytest.raises(ValueError, match="'max' or 'mean'"):
        forward.layers["pool"].reservoir_values("median")
