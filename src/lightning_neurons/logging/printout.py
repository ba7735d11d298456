"""Terminal printouts of rounds and histories, built from the row every sink shows (:mod:`~.rows`).

Library code returns lines; only the CLI prints them.

Example:
    >>> from lightning_neurons.results import ExplanationRound, UnitExplanation
    >>> rnd = ExplanationRound(0, [UnitExplanation("fc", 0, 0, "bottle neck", 0.9, kind="unclear")])
    >>> round_lines(rnd)
    ['epoch 0: 1 units explained', '  fc unit 0: no clear concept [unclear, score 0.900]']
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from lightning_neurons.explanation.multi_concept import format_combination
from lightning_neurons.logging.rows import concept_distribution, format_row, record_row, unit_row
from lightning_neurons.results import ExplanationRound, UnitExplanation

if TYPE_CHECKING:
    from lightning_neurons.drift.history import HistoryRecord, RunHistory


def round_lines(rnd: ExplanationRound, units_per_layer: int = 5) -> list[str]:
    """The ``lightning-neurons explain`` printout of a round: per layer its first units and its concept distribution.

    Args:
        rnd: The round.
        units_per_layer: Units listed per layer.
    """
    threshold = rnd.meta.get("confidence_threshold")
    threshold = None if threshold is None else float(threshold)
    lines = [f"epoch {rnd.epoch}: {len(rnd)} units explained"]
    for layer in rnd.layers:
        units = rnd.layer(layer)
        for u in units[:units_per_layer]:
            lines.append(f"  {layer} " + format_row(unit_row(u, confidence_threshold=threshold)))
        if len(rnd.layers) > 1 or len(units) > units_per_layer:
            lines.append(f"  {layer}: " + distribution_line(units, threshold))
    return lines


def distribution_line(units: Sequence[UnitExplanation], threshold: float | None = None) -> str:
    """One line of a layer's concept distribution: concept units and the most frequent concept's share.

    Example:
        >>> from lightning_neurons.results import UnitExplanation
        >>> distribution_line([UnitExplanation("fc", i, 0, "dog", 0.5, kind="concept") for i in range(2)])
        "2/2 units with a concept; most frequent 'dog' (100%)"
    """
    dist = concept_distribution(units, threshold)
    top = f"most frequent {dist.top_concept!r} ({dist.top_concept_share:.0%})" if dist.top_concept else "none"
    return f"{dist.n_concept}/{dist.n_units} units with a concept; {top}"


def history_lines(history: RunHistory) -> list[str]:
    """The ``lightning-neurons history`` printout, from the rows every sink shows.

    One line per layer and epoch (units, changes of meaning, with multi-concept explanations also changes of the
    concept set, units that gained and lost a concept, dead units, mean score and similarity, stable units, the most
    frequent concept's share), then the units whose meaning changed, gained or lost a concept, by their shown texts
    (never a raw best concept), then, apart, the units whose description kept its meaning while their
    combination's concept set changed.

    Example:
        >>> from lightning_neurons.drift.history import RunHistory
        >>> history_lines(RunHistory())
        ['(empty history)']
    """
    if not len(history):
        return ["(empty history)"]
    records = history.records
    multi = any(r.explanation.combination for r in records)
    width = max([24, *(len(layer) for layer in history.layers)])
    concepts_head = f" {'concepts':>9}" if multi else ""
    lines = [
        f"{'layer':<{width}} {'epoch':>5} {'units':>5} {'changed':>9}{concepts_head} {'gained':>6} {'lost':>5} "
        f"{'dead':>5} {'mean score':>10} {'mean sim':>8} {'stable':>6} {'top concept':>11}"
    ]
    by_round: dict[tuple[str, int], list[HistoryRecord]] = {}
    for r in records:
        by_round.setdefault((r.drift.layer, r.drift.epoch), []).append(r)
    for s in history.summary():
        rows = by_round.get((s.layer, s.epoch), [])
        threshold = next((r.confidence_threshold for r in rows if r.confidence_threshold is not None), None)
        share = concept_distribution([r.explanation for r in rows], threshold).top_concept_share
        changed = f"{s.n_changed}/{s.n_compared}" if s.n_compared else ("baseline" if s.n_baseline else "-")
        concepts = f" {f'{s.n_concepts_changed}/{s.n_compared}' if s.n_compared else '-':>9}" if multi else ""
        sim = "-" if s.mean_similarity is None else f"{s.mean_similarity:.3f}"
        lines.append(
            f"{s.layer:<{width}} {s.epoch:>5} {s.n_units:>5} {changed:>9}{concepts} {s.n_gained:>6} {s.n_lost:>5} "
            f"{s.n_dead:>5} {s.mean_score:>10.3f} {sim:>8} {s.n_stable:>6} {share:>11.0%}"
        )
    for flag, head in (
        ("changed", "meaning changes:"),
        ("gained", "gained a concept:"),
        ("lost", "lost a concept:"),
    ):
        moved = [(r, record_row(r)) for r in records if getattr(r.drift, flag)]
        if moved:
            lines.append(head)
            lines += [
                f"  {r.drift.layer}[{r.drift.unit}] epoch {r.drift.epoch}: {row['previous_description']!r} -> "
                f"{row['description']!r} (similarity {r.drift.similarity:.2f})"
                for r, row in moved
            ]
    concept_changes = [r for r in records if r.drift.concepts_only_changed]
    if concept_changes:
        lines.append("concept-set changes (same meaning, other concepts in the combination):")
        lines += [f"  {_concept_change(history, r)}" for r in concept_changes]
    return lines


def _concept_change(history: RunHistory, record: HistoryRecord) -> str:
    # "fc[7] epoch 2: 'fruit' [fruit (0.74) + dog (0.26)] -> 'fruit' [fruit (0.65) + grass (0.35)] (concept overlap
    # 0.33)"; the previous combination from the previous record, else from the drift (a restored checkpoint).
    d = record.drift
    previous = None
    if d.previous_epoch is not None and (d.layer, d.unit, d.previous_epoch) in history:
        previous = history.get(d.layer, d.unit, d.previous_epoch)
    before = previous.explanation.combination if previous is not None else d.previous_combination
    row = record_row(record)
    was = repr(row["previous_description"] or "")
    if before is not None:
        was += f" [{format_combination(before)}]"
    now = repr(row["description"]) + (f" [{row['combination']}]" if row["combination"] else "")
    overlap = "" if d.concept_jaccard is None else f" (concept overlap {d.concept_jaccard:.2f})"
    return f"{d.layer}[{d.unit}] epoch {d.epoch}: {was} -> {now}{overlap}"


__all__ = ["distribution_line", "history_lines", "round_lines"]
