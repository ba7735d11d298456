"""Drift and quality of a round as flat metrics the Trainer can watch.

:func:`round_metrics` turns a :class:`~lightning_neurons.logging.base.RoundOutput` into ``{name: float}``. The
session puts these into ``trainer.callback_metrics`` after each round, so that ``EarlyStopping``,
``ModelCheckpoint(monitor=...)`` and learning-rate schedulers can use them, and every logger family logs them as
scalars. Names (``<prefix>`` is ``neurons`` unless the explainer has its own):

- ``<prefix>/<layer>/fraction_changed``: fraction of the layer's compared units whose meaning changed since their
  previous explained round (a concept in both rounds, description similarity below the threshold; see
  :mod:`lightning_neurons.drift.metrics`). At a layer's first round (or the first after a change of settings, a new
  baseline) nothing can be
  compared and it is **1.0** (no meaning is settled yet), so a ``mode="min"`` monitor never sees a premature best
  value of 0.
- ``<prefix>/<layer>/fraction_concepts_changed``: fraction of the layer's compared units whose concept set changed:
  the meaning, or a multi-concept combination's concepts (Jaccard below
  :data:`~lightning_neurons.drift.metrics.COMBINATION_CHANGE_JACCARD`); at least ``fraction_changed``, equal to it
  without combinations, 1.0 at the first round like it.
- ``<prefix>/<layer>/fraction_gained`` / ``fraction_lost``: fraction of the compared units that gained a concept
  (no concept before: low-level or unclear) or lost one since their previous round (from the second round on).
- ``<prefix>/<layer>/top_concept_share``: units of the layer's most frequent shown concept over its units shown with
  a concept (:func:`~lightning_neurons.logging.rows.concept_distribution`); near 1 the layer collapsed onto one word.
- ``<prefix>/<layer>/concept_units``: units shown with a concept.
- ``<prefix>/<layer>/mean_score``: mean headline score of the layer's units.
- ``<prefix>/<layer>/mean_similarity``: mean description similarity to the previous round (from the second round
  on; absent at the first).
- ``<prefix>/<layer>/stable_units``: units whose last ``N`` comparisons were all unchanged
  (``N`` = :data:`~lightning_neurons.drift.metrics.DEFAULT_STABLE_ROUNDS` unless the history says otherwise).
- ``<prefix>/<layer>/stable_fraction``: ``stable_units`` over the layer's explained units.
- ``<prefix>/<layer>/dead_units``: units of kind ``"dead"`` (records without kinds: no description or no positive
  activation on the probe; :func:`~lightning_neurons.logging.rows.is_dead`).
- ``evaluation/<method>/<metric>`` (``evaluate=True``): the quality metrics of the explanations (``<method>`` =
  the backend's name) and of the ``random`` / ``constant`` / ``label`` baselines, nested keys joined by ``/``.

Example:
    >>> from lightning_neurons.drift.metrics import LayerDriftSummary
    >>> from lightning_neurons.results import ExplanationRound, UnitExplanation
    >>> rnd = ExplanationRound(1, [UnitExplanation("fc", 0, 1, "dots", 0.8, activations=[2.0])])
    >>> s = LayerDriftSummary("fc", 1, 1, 1, 0, 0.0, 0.8, 0.9, 1.0, 3, 0)
    >>> m = round_metrics(RoundOutput(rnd, [], [s], step=1, epoch=1, evaluation={"embedded": {"simulation": 0.2}}))
    >>> m["neurons/fc/fraction_changed"], m["neurons/fc/dead_units"], m["evaluation/embedded/simulation"]
    (0.0, 0.0, 0.2)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from lightning_neurons.logging.base import RoundOutput
from lightning_neurons.logging.rows import is_dead, layer_distribution

#: Per-layer metric names (the last tag component), in the order :func:`round_metrics` writes them.
LAYER_METRIC_NAMES = (
    "fraction_changed",
    "fraction_concepts_changed",
    "fraction_gained",
    "fraction_lost",
    "top_concept_share",
    "concept_units",
    "mean_score",
    "mean_similarity",
    "stable_units",
    "stable_fraction",
    "dead_units",
)


def metric_name(prefix: str, layer: str, name: str) -> str:
    """The documented name of a per-layer metric.

    Example:
        >>> metric_name("neurons", "features.3", "fraction_changed")
        'neurons/features.3/fraction_changed'
    """
    return f"{prefix}/{layer}/{name}"


def round_metrics(output: RoundOutput, *, first_round_changed: float | None = 1.0) -> dict[str, float]:
    """Per-layer drift figures and the evaluation metrics of one round, as ``{name: float}`` (finite values only).

    Args:
        output: The round, its drift summaries and (``evaluate=True``) its evaluation.
        first_round_changed: ``fraction_changed`` and ``fraction_concepts_changed`` of a layer at its first round
            (nothing compared yet); ``None`` leaves them out, as the logger charts do (they start at the second
            round, like TensorBoard's).

    Returns:
        The metrics named in this module's documentation; a layer without a summary gets only ``top_concept_share``,
        ``concept_units`` and ``dead_units``.
    """
    from lightning_neurons.evaluation.harness import flatten_metrics

    prefix = output.prefix
    metrics: dict[str, float] = {}
    summaries = {s.layer: s for s in output.summaries}
    for layer in output.round.layers:
        units = output.round.layer(layer)
        s = summaries.get(layer)
        if s is not None:
            if s.n_compared:
                metrics[metric_name(prefix, layer, "fraction_changed")] = float(s.fraction_changed)
                metrics[metric_name(prefix, layer, "fraction_concepts_changed")] = float(s.fraction_concepts_changed)
            elif first_round_changed is not None:
                metrics[metric_name(prefix, layer, "fraction_changed")] = float(first_round_changed)
                metrics[metric_name(prefix, layer, "fraction_concepts_changed")] = float(first_round_changed)
            if s.n_compared:
                metrics[metric_name(prefix, layer, "fraction_gained")] = float(s.fraction_gained)
                metrics[metric_name(prefix, layer, "fraction_lost")] = float(s.fraction_lost)
            if s.mean_score is not None and math.isfinite(s.mean_score):
                metrics[metric_name(prefix, layer, "mean_score")] = float(s.mean_score)
            if s.n_compared and s.mean_similarity is not None:
                metrics[metric_name(prefix, layer, "mean_similarity")] = float(s.mean_similarity)
            metrics[metric_name(prefix, layer, "stable_units")] = float(s.n_stable)
            if s.n_units:
                metrics[metric_name(prefix, layer, "stable_fraction")] = s.n_stable / s.n_units
        dist = layer_distribution(output, layer)
        metrics[metric_name(prefix, layer, "top_concept_share")] = float(dist.top_concept_share)
        metrics[metric_name(prefix, layer, "concept_units")] = float(dist.n_concept)
        metrics[metric_name(prefix, layer, "dead_units")] = float(sum(is_dead(u) for u in units))
    if output.evaluation:
        metrics.update(flatten_metrics(output.evaluation, "evaluation"))
    return metrics


def unit_metrics(output: RoundOutput, layer: str, units: Sequence[int]) -> dict[str, float]:
    """Per-unit scalars of the logged units: ``<prefix>/<layer>/<unit>/score`` and ``.../drift`` (finite only).

    Example:
        >>> from lightning_neurons.results import ExplanationRound, UnitExplanation
        >>> rnd = ExplanationRound(0, [UnitExplanation("fc", 0, 0, "red", 0.75)])
        >>> unit_metrics(RoundOutput(rnd, drift=[], summaries=[], step=0, epoch=0), "fc", [0])
        {'neurons/fc/0/score': 0.75}
    """
    drift = {(d.layer, d.unit): d for d in output.drift if d.layer == layer}
    metrics: dict[str, float] = {}
    for unit in units:
        u = output.round.get(layer, unit)
        if math.isfinite(u.score):
            metrics[f"{output.prefix}/{layer}/{unit}/score"] = float(u.score)
        d = drift.get((layer, unit))
        if d is not None and d.drift is not None:
            metrics[f"{output.prefix}/{layer}/{unit}/drift"] = float(d.drift)
    return metrics


__all__ = ["LAYER_METRIC_NAMES", "metric_name", "round_metrics", "unit_metrics"]
