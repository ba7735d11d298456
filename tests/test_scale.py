"""Scale paths: the fast multi-epoch drift summary, the vectorised unit assembly and the paginated report give the
same results as the straightforward code."""

from __future__ import annotations

import math
import random

import pytest

from lightning_neurons.drift.metrics import UnitDrift, summarize_layer, summarize_layer_epochs


def _random_timelines(seed: int, units: int = 30, epochs: int = 12) -> dict[int, list[UnitDrift]]:
    rng = random.Random(seed)
    out: dict[int, list[UnitDrift]] = {}
    for u in range(units):
        timeline = []
        previous = None
        for e in sorted(rng.sample(range(epochs), rng.randint(0, epochs))):
            d = UnitDrift("fc", u, e, f"c{rng.randint(0, 3)}", rng.random())
            if previous is not None:
                d.previous_epoch, d.previous_description = previous.epoch, previous.description
                d.similarity = rng.random()
                d.changed = d.similarity < 0.5
                d.jaccard = rng.random()
            timeline.append(d)
            previous = d
        out[u] = timeline
    return out


def _comparable(d: dict) -> dict:
    return {k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in d.items()}


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("stable_rounds", [1, 3])
def test_summarize_layer_epochs_equals_summarize_layer_per_epoch(seed, stable_rounds):
    timelines = _random_timelines(seed)
    epochs = [11, 0, 3, 5, 7, 2, 20]  # any order, and epochs nobody was explained at
    fast = summarize_layer_epochs("fc", epochs, timelines, stable_rounds)
    slow = [summarize_layer("fc", e, timelines, stable_rounds) for e in epochs]
    assert [_comparable(s.to_dict()) for s in fast] == [_comparable(s.to_dict()) for s in slow]
