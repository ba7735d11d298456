"""Drift between consecutive explanations of a unit, and per-layer summaries of it.

Only meaning counts. A unit's meaning *changed* between two explained epochs when it has a concept in both
(``UnitExplanation.kind == "concept"``, or ``None`` in records written before kinds existed, judged as before) and
the text-embedding cosine similarity of its two descriptions is below a threshold (:data:`DEFAULT_CHANGE_THRESHOLD`).
A unit that moves from no concept (``"low_level"``, ``"unclear"``) to a concept *gained* one (semantics forming); the
reverse *lost* one; both are counted apart from ``changed``. Two rounds without a concept ("no clear concept" on both
sides, or low-level statistics) are never a change, and a ``"dead"`` unit (never active on the probe) is never
changed, gained or lost. Identical descriptions (after trimming and case folding) have similarity exactly 1 and are
never embedded.

A change of the settings that decide what a round means (vocabulary, class names, backend and its model, top_k,
reduction; :mod:`lightning_neurons.drift.baseline`) starts a new *baseline*: the unit is not compared across it
(``compared`` is false, ``baseline`` true), so a change of settings is never reported as a change of meaning.

The threshold default, 0.75, was chosen for MiniLM-like sentence encoders (``all-MiniLM-L6-v2``, the embedded
backend's text encoder), where paraphrases score above it and different concepts below it, e.g.
``"red" / "red color"`` 0.90, ``"striped" / "stripes"`` 0.84, ``"blue sky" / "sky"`` 0.79,
``"dog face" / "dog head"`` 0.77 versus ``"red" / "blue"`` 0.73, ``"wheel" / "tire"`` 0.72, ``"dog" / "cat"``
0.66, ``"grass" / "sky"`` 0.47. CLIP text towers give higher similarities to unrelated texts; raise the threshold
(about 0.85-0.9) with them.

Multi-concept explanations are also compared as sets, and judged apart from the description: a unit's *concept
set* is the concepts of its combination (``UnitExplanation.combination``), or its description alone when it has
none, and ``concept_jaccard`` is the Jaccard index of the two rounds' concept sets (only where at least one of the
two rounds has a combination). Combinations churn far more between rounds than descriptions do, so they never make
a unit *changed*; they make it ``concepts_changed``, which is true where the meaning changed or where that index
is below :data:`COMBINATION_CHANGE_JACCARD` (fewer than half the concepts shared: ``{stripes, zebra}`` ->
``{stripes, grass}`` is a concept-set change, ``{stripes, zebra, grass}`` -> ``{stripes, zebra}`` or
``{stripes}`` -> ``{stripes, zebra}`` is not). :class:`LayerDriftSummary` counts both (``n_changed``,
``n_concepts_changed``); stability (``n_stable``, ``first_stable_epoch``) follows ``changed``.

Example:
    >>> import torch
    >>> from lightning_neurons.results import UnitExplanation
    >>> def embed(texts):  # any Callable[[list[str]], Tensor]; normally Backend.encode_descriptions
    ...     return torch.nn.functional.normalize(torch.tensor([[len(t), 1.0] for t in texts]), dim=1)
    >>> old = [UnitExplanation("fc", 0, epoch=1, description="dots", score=0.7, top_sample_ids=[1, 2])]
    >>> new = [UnitExplanation("fc", 0, epoch=2, description="dots", score=0.8, top_sample_ids=[2, 3])]
    >>> d = compare_units({("fc", 0): old[0]}, new, embed)[0]
    >>> (d.changed, d.similarity, round(d.jaccard, 3), round(d.score_delta, 3))
    (False, 1.0, 0.333, 0.1)
    >>> from lightning_neurons.results import Alternative
    >>> old[0].combination = [Alternative("dots", 0.7), Alternative("grass", 0.3)]
    >>> new[0].combination = [Alternative("dots", 0.6), Alternative("sky", 0.4)]
    >>> d = compare_units({("fc", 0): old[0]}, new, embed)[0]
    >>> (d.changed, d.concepts_changed, round(d.concept_jaccard, 3))
    (False, True, 0.333)
    >>> old[0].kind, new[0].kind = "unclear", "concept"
    >>> d = compare_units({("fc", 0): old[0]}, new, embed)[0]
    >>> (d.changed, d.gained, d.lost)
    (False, True, False)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Container, Hashable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_neurons.results import Alternative, UnitExplanation, shown_text

#: Cosine similarity below which two descriptions of a unit count as different meanings (MiniLM-like encoders).
DEFAULT_CHANGE_THRESHOLD = 0.75

#: Jaccard index of two rounds' concept sets below which a unit with a combination counts as ``concepts_changed``.
COMBINATION_CHANGE_JACCARD = 0.5

#: Number of most recent comparisons without a change for a unit to count as stable.
DEFAULT_STABLE_ROUNDS = 3

#: Embeds a batch of texts; returns ``[len(texts), D]`` (normalised here, so any scale is fine).
EmbedFn = Callable[[list[str]], Tensor]


def has_concept(kind: str | None) -> bool:
    """Whether a unit of this kind is shown with a concept: ``"concept"``, or ``None`` (a record made before kinds).

    Example:
        >>> has_concept("concept"), has_concept(None), has_concept("unclear"), has_concept("low_level")
        (True, True, False, False)
    """
    return kind is None or kind == "concept"


def meaning_change(previous_kind: str | None, kind: str | None, similarity: float, threshold: float) -> str | None:
    """What a unit's move between two compared rounds counts as: ``"changed"``, ``"gained"``, ``"lost"`` or ``None``.

    The one rule of drift. ``"changed"``: a concept on both sides (or records without kinds) whose descriptions'
    similarity is below ``threshold``. ``"gained"`` / ``"lost"``: a concept on one side only, both kinds known.
    Nothing otherwise: no concept on either side (two "no clear concept" rounds differ in their raw best concept
    only, which nobody is shown), or a dead unit on either side.

    Example:
        >>> meaning_change("concept", "concept", 0.2, 0.75), meaning_change("unclear", "unclear", 0.1, 0.75)
        ('changed', None)
        >>> meaning_change("low_level", "concept", 0.9, 0.75), meaning_change("concept", "dead", 0.0, 0.75)
        ('gained', None)
    """
    if kind == "dead" or previous_kind == "dead":
        return None
    if has_concept(previous_kind) and has_concept(kind):
        return "changed" if similarity < threshold else None
    if previous_kind is None or kind is None:  # a legacy record beside a known non-concept kind: unknown
        return None
    if has_concept(kind):
        return "gained"
    return "lost" if has_concept(previous_kind) else None


@dataclass
class UnitDrift:
    """How one unit's explanation moved from its previous explained epoch to this one.

    The comparison fields are ``None`` (and ``changed`` is ``False``) for the first explained epoch of a unit.

    Args:
        layer: Layer name.
        unit: Unit index.
        epoch: Epoch of the current explanation.
        description: Current description.
        score: Current score (AUC).
        previous_epoch: The unit's previous explained epoch, ``None`` if this is its first.
        previous_description: The description at ``previous_epoch``.
        similarity: Cosine similarity of the two descriptions' text embeddings (1.0 for identical texts).
        changed: The meaning changed: a concept in both rounds and ``similarity < threshold`` (the description's
            meaning; combinations never set it; see :func:`meaning_change`).
        jaccard: Jaccard index of the two top-k sample-id sets.
        score_delta: Current score minus previous score.
        threshold: The change threshold that was applied.
        concept_jaccard: Jaccard index of the two rounds' concept sets (:func:`concept_set`); ``None`` on the first
            round and where neither round has a combination.
        previous_combination: The combination at ``previous_epoch`` (``None`` without one), for printouts of what
            changed; not stored in the history (the previous record holds it) and not compared by ``==``.
        kind: The unit's kind this round (``UnitExplanation.kind``; ``None`` for records without kinds).
        previous_kind: Its kind at ``previous_epoch`` (for printouts, like ``previous_combination``; the previous
            record holds it).
        previous_shown: The text shown for it at ``previous_epoch`` (``UnitExplanation.shown``; for printouts).
        gained: It has a concept now and had none (``"low_level"`` / ``"unclear"``) at ``previous_epoch``.
        lost: It had a concept at ``previous_epoch`` and has none now (dead units never gain or lose one).
        baseline: The settings that decide what a round means changed since its previous explanation, so this
            round starts a new baseline and is not compared (:mod:`lightning_neurons.drift.baseline`).

    Example:
        >>> d = UnitDrift("fc", 0, 2, "fruit", 0.8, 1, "fruit", 1.0, concept_jaccard=0.2)
        >>> (d.changed, d.concepts_changed, d.concepts_only_changed)
        (False, True, True)
    """

    layer: str
    unit: int
    epoch: int
    description: str
    score: float
    previous_epoch: int | None = None
    previous_description: str | None = None
    similarity: float | None = None
    changed: bool = False
    jaccard: float | None = None
    score_delta: float | None = None
    threshold: float = DEFAULT_CHANGE_THRESHOLD
    concept_jaccard: float | None = None
    previous_combination: list[Alternative] | None = field(default=None, compare=False)
    kind: str | None = None
    previous_kind: str | None = field(default=None, compare=False)
    previous_shown: str | None = field(default=None, compare=False)
    gained: bool = False
    lost: bool = False
    baseline: bool = False

    @property
    def dead(self) -> bool:
        """Whether the unit is dead this round (never active on the probe)."""
        return self.kind == "dead"

    @property
    def concepts_changed(self) -> bool:
        """The concept set changed: ``changed``, or ``concept_jaccard <`` :data:`COMBINATION_CHANGE_JACCARD`.

        Derived, not stored: a change of meaning is a change of the concept set too (a one-concept set, the
        description), and ``concept_jaccard`` is set only where either round has a combination and both rounds have
        a concept.
        """
        overlap = self.concept_jaccard
        return self.changed or (overlap is not None and overlap < COMBINATION_CHANGE_JACCARD)

    @property
    def concepts_only_changed(self) -> bool:
        """The concept set changed while the description kept its meaning (``concepts_changed and not changed``)."""
        return self.concepts_changed and not self.changed

    @property
    def compared(self) -> bool:
        """Whether there was a previous explanation to compare with."""
        return self.previous_epoch is not None

    @property
    def drift(self) -> float | None:
        """Semantic distance ``1 - similarity`` (``None`` without a previous explanation)."""
        return None if self.similarity is None else 1.0 - self.similarity

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dictionary (with the derived ``concepts_changed``)."""
        return {**asdict(self), "concepts_changed": self.concepts_changed}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UnitDrift:
        """Inverse of :meth:`to_dict`; ignores unknown keys (so a full history record is accepted).

        Dictionaries written before ``concepts_changed`` existed get ``changed`` from :func:`stored_changed`.
        """
        names = cls.__dataclass_fields__.keys()
        kwargs = {k: data[k] for k in names if k in data}
        kwargs["changed"] = stored_changed(data)
        combo = data.get("previous_combination")
        if combo:
            kwargs["previous_combination"] = [
                a if isinstance(a, Alternative) else Alternative(str(a["text"]), float(a["score"])) for a in combo
            ]
        return cls(**kwargs)


def stored_changed(data: Mapping[str, Any]) -> bool:
    """``changed``, the description's change of meaning, of a stored record (history record or ``to_dict``).

    Records written before ``concepts_changed`` existed counted a concept-set change as ``changed`` too; for them,
    where the record has a ``concept_jaccard``, ``changed`` is judged again from the stored similarity and threshold
    (``concepts_changed`` then follows from it and ``concept_jaccard``, as for every record).

    Example:
        >>> old = {"changed": True, "similarity": 1.0, "threshold": 0.75, "concept_jaccard": 0.25}
        >>> stored_changed(old)
        False
        >>> stored_changed({**old, "changed": False, "concepts_changed": True})
        False
    """
    changed = bool(data.get("changed", False))
    similarity = data.get("similarity")
    if "concepts_changed" in data or data.get("concept_jaccard") is None or similarity is None:
        return changed
    return float(similarity) < float(data.get("threshold", DEFAULT_CHANGE_THRESHOLD))


@dataclass
class LayerDriftSummary:
    """Drift of one layer at one explained epoch.

    Args:
        layer: Layer name.
        epoch: The epoch summarised.
        n_units: Units explained at this epoch.
        n_compared: Units that had a previous explanation.
        n_changed: Units whose meaning changed (:attr:`UnitDrift.changed`: a concept in both rounds, the
            description's similarity below the threshold).
        fraction_changed: ``n_changed / n_compared`` (0.0 when nothing was compared).
        mean_score: Mean score of the layer's units that have one (NaN when none has).
        mean_similarity: Mean description similarity over compared units (``None`` when none).
        mean_jaccard: Mean top-k Jaccard over compared units (``None`` when none).
        stable_rounds: The ``N`` of ``n_stable``.
        n_stable: Units with at least ``N`` comparisons up to this epoch, none of the last ``N`` a change.
        first_stable_epoch: Per unit, the first epoch after which its meaning never changed again (up to this
            epoch): the epoch of its last change, or its first explained epoch if it never changed.
        n_concepts_changed: Units whose concept set changed (:attr:`UnitDrift.concepts_changed`: the meaning, or
            a multi-concept combination's concepts); at least ``n_changed`` (raised to it when given less, e.g. by
            summaries written before the field existed).
        fraction_concepts_changed: ``n_concepts_changed / n_compared`` (0.0 when nothing was compared).
        n_gained: Compared units that have a concept now and had none (:attr:`UnitDrift.gained`).
        fraction_gained: ``n_gained / n_compared`` (0.0 when nothing was compared).
        n_lost: Compared units that had a concept and have none now (:attr:`UnitDrift.lost`).
        fraction_lost: ``n_lost / n_compared`` (0.0 when nothing was compared).
        n_dead: Units of kind ``"dead"`` at this epoch.
        n_baseline: Units not compared because the settings changed since their previous explanation.

    Example:
        >>> s = LayerDriftSummary("fc", 1, 4, 4, 1, 0.25, 0.8, 0.9, 0.5, 3, 0)  # no concept counts given
        >>> (s.n_concepts_changed, s.fraction_concepts_changed)
        (1, 0.25)
    """

    layer: str
    epoch: int
    n_units: int
    n_compared: int
    n_changed: int
    fraction_changed: float
    mean_score: float
    mean_similarity: float | None
    mean_jaccard: float | None
    stable_rounds: int
    n_stable: int
    first_stable_epoch: dict[int, int] = field(default_factory=dict)
    n_concepts_changed: int = 0
    fraction_concepts_changed: float = 0.0
    n_gained: int = 0
    fraction_gained: float = 0.0
    n_lost: int = 0
    fraction_lost: float = 0.0
    n_dead: int = 0
    n_baseline: int = 0

    def __post_init__(self) -> None:
        # Every change of meaning is a change of the concept set.
        if self.n_concepts_changed < self.n_changed:
            self.n_concepts_changed = self.n_changed
            self.fraction_concepts_changed = self.fraction_changed

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dictionary (unit keys of ``first_stable_epoch`` become strings, as JSON requires)."""
        data = asdict(self)
        data["first_stable_epoch"] = {str(k): v for k, v in self.first_stable_epoch.items()}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerDriftSummary:
        """Inverse of :meth:`to_dict`."""
        data = dict(data)
        data["first_stable_epoch"] = {int(k): v for k, v in data.get("first_stable_epoch", {}).items()}
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def _same_text(a: str, b: str) -> bool:
    return a.strip().casefold() == b.strip().casefold()


def description_similarity(previous: Sequence[str], current: Sequence[str], embed: EmbedFn) -> list[float]:
    """Pairwise cosine similarity of two equally long lists of descriptions.

    Identical texts (ignoring case and surrounding spaces) get exactly 1.0 without being embedded; all other
    distinct texts are embedded in one batched ``embed`` call (none when every pair is identical).

    Args:
        previous: Earlier descriptions.
        current: Later descriptions, paired with ``previous`` by position.
        embed: Text embedder, e.g. ``backend.encode_descriptions``.

    Returns:
        One similarity per pair, clamped to ``[-1, 1]``.

    Raises:
        ValueError: If the lists differ in length or ``embed`` returns the wrong number of rows.

    Example:
        >>> description_similarity(["stripes"], ["Stripes "], embed=lambda t: 1 / 0)
        [1.0]
    """
    if len(previous) != len(current):
        raise ValueError(f"got {len(previous)} previous and {len(current)} current descriptions")
    out = [1.0] * len(current)
    todo = [i for i, (a, b) in enumerate(zip(previous, current)) if not _same_text(a, b)]
    if not todo:
        return out
    texts = list(dict.fromkeys([previous[i] for i in todo] + [current[i] for i in todo]))
    emb = torch.as_tensor(embed(texts)).detach().float().cpu()
    if emb.ndim != 2 or emb.shape[0] != len(texts):
        raise ValueError(f"embed returned shape {tuple(emb.shape)} for {len(texts)} texts; expected [N, D]")
    emb = torch.nn.functional.normalize(emb, dim=1)
    row = {t: i for i, t in enumerate(texts)}
    a = emb[[row[previous[i]] for i in todo]]
    b = emb[[row[current[i]] for i in todo]]
    sims = (a * b).sum(dim=1).clamp(-1.0, 1.0).tolist()
    for i, s in zip(todo, sims):
        out[i] = float(s)
    return out


def jaccard(a: Iterable[Hashable], b: Iterable[Hashable]) -> float:
    """Jaccard index of two sets (sample ids, concept texts; 1.0 when both are empty).

    Example:
        >>> jaccard([1, 2, 3], [2, 3, 4])
        0.5
    """
    sa, sb = set(a), set(b)
    union = sa | sb
    return 1.0 if not union else len(sa & sb) / len(union)


def concept_set(u: UnitExplanation) -> frozenset[str]:
    """The concepts a unit's explanation names: its combination's concepts, else its description alone.

    Example:
        >>> from lightning_neurons.results import Alternative
        >>> sorted(concept_set(UnitExplanation("fc", 0, 0, "stripes", 0.8, combination=[Alternative("zebra", 1.0),
        ...     Alternative("stripes", 0.5)])))
        ['stripes', 'zebra']
    """
    if u.combination:
        return frozenset(a.text.strip().casefold() for a in u.combination)
    return frozenset([u.description.strip().casefold()]) if u.description else frozenset()


def compare_units(
    previous: Mapping[tuple[str, int], UnitExplanation],
    current: Iterable[UnitExplanation],
    embed: EmbedFn,
    threshold: float = DEFAULT_CHANGE_THRESHOLD,
    epoch: int | None = None,
    baseline: Container[tuple[str, int]] = (),
) -> list[UnitDrift]:
    """Drift of every current unit explanation against that unit's previous explanation.

    Changes are judged by :func:`meaning_change`: ``changed`` only with a concept in both rounds, ``gained`` /
    ``lost`` apart, nothing for dead units or units without a concept in either round.

    Args:
        previous: Per ``(layer, unit)``, the unit's previous explanation (a unit missing here is a first round).
        current: The explanations of the new round.
        embed: Batched text embedder (called at most once).
        threshold: Similarity below which the meaning counts as changed (``changed``); a combination's concept set
            counts as changed (``concepts_changed``) below :data:`COMBINATION_CHANGE_JACCARD`.
        epoch: Epoch to record (default: each explanation's own ``epoch``).
        baseline: Units whose previous explanation was made under other settings (see
            :func:`~lightning_neurons.drift.baseline.baseline_units`): they start a new baseline, ``baseline=True``,
            and are not compared.

    Returns:
        One :class:`UnitDrift` per current explanation, in input order.

    Raises:
        ValueError: If an explanation has no epoch and ``epoch`` is not given.
    """
    current = list(current)
    pairs = [(i, previous[u.key]) for i, u in enumerate(current) if u.key in previous and u.key not in baseline]
    sims = description_similarity([p.description for _, p in pairs], [current[i].description for i, _ in pairs], embed)
    by_index = {i: (p, s) for (i, p), s in zip(pairs, sims)}
    out = []
    for i, u in enumerate(current):
        ep = epoch if epoch is not None else u.epoch
        if ep is None:
            raise ValueError(f"unit {u.unit} of layer {u.layer!r} has no epoch; pass epoch=")
        d = UnitDrift(
            layer=u.layer,
            unit=u.unit,
            epoch=int(ep),
            description=u.description,
            score=float(u.score),
            threshold=threshold,
            kind=u.kind,
            baseline=u.key in baseline and u.key in previous,
        )
        if i in by_index:
            p, s = by_index[i]
            d.previous_epoch = p.epoch
            d.previous_description = p.description
            d.previous_kind = p.kind
            d.previous_shown = shown_text(p.description, p.kind, p.low_level)
            d.similarity = s
            move = meaning_change(p.kind, u.kind, s, threshold)
            d.changed, d.gained, d.lost = move == "changed", move == "gained", move == "lost"
            meaningful = p.kind != "dead" and u.kind != "dead" and has_concept(p.kind) and has_concept(u.kind)
            if meaningful and (p.combination or u.combination):  # multi-concept explanations: as concept sets too
                d.concept_jaccard = jaccard(concept_set(p), concept_set(u))
                d.previous_combination = p.combination
            d.jaccard = jaccard(p.top_sample_ids, u.top_sample_ids)
            d.score_delta = float(u.score) - float(p.score)
        out.append(d)
    return out


def first_stable_epoch(timeline: Sequence[UnitDrift]) -> int | None:
    """The first epoch after which a unit's meaning never changed again.

    Args:
        timeline: The unit's drift records in epoch order.

    Returns:
        The epoch of the last change, or the first epoch when the meaning never changed; ``None`` when empty.

    Example:
        >>> t = [UnitDrift("fc", 0, e, "x", 0.5, changed=c) for e, c in [(0, False), (1, True), (2, False)]]
        >>> first_stable_epoch(t)
        1
    """
    if not timeline:
        return None
    changes = [d.epoch for d in timeline if d.changed]
    return changes[-1] if changes else timeline[0].epoch


def is_stable(timeline: Sequence[UnitDrift], rounds: int = DEFAULT_STABLE_ROUNDS) -> bool:
    """Whether the unit's last ``rounds`` comparisons (it needs that many) are all unchanged."""
    compared = [d for d in timeline if d.compared]
    return len(compared) >= rounds and not any(d.changed for d in compared[-rounds:])


@dataclass(frozen=True)
class UnitStability:
    """A unit's running stability up to one of its explained epochs: all a summary needs of its past.

    Advancing it record by record along a timeline gives, at every epoch, what :func:`first_stable_epoch` and
    :func:`is_stable` compute from the whole past, in O(1) per record (the history keeps one per record, so a
    round's summary costs the round's units, not the run's length).

    Args:
        first_epoch: The unit's first explained epoch.
        last_change: The epoch of its last change of meaning (``None`` when it never changed).
        run: Compared records since the last compared change (the unit is stable for ``N`` rounds when ``run >= N``).

    Example:
        >>> t = [UnitDrift("fc", 0, e, "x", 0.5, previous_epoch=e - 1 if e else None, changed=e == 1) for e in range(4)]
        >>> state = None
        >>> for d in t:
        ...     state = UnitStability.advance(state, d)
        >>> (state.first_stable_epoch, state.run, state.is_stable(2))
        (1, 2, True)
    """

    first_epoch: int
    last_change: int | None = None
    run: int = 0

    @classmethod
    def advance(cls, state: UnitStability | None, d: UnitDrift) -> UnitStability:
        """The state after ``d``, the unit's next record in epoch order (``state`` ``None`` before its first)."""
        first = d.epoch if state is None else state.first_epoch
        last_change = d.epoch if d.changed else (None if state is None else state.last_change)
        run = 0 if state is None else state.run
        if d.compared:
            run = 0 if d.changed else run + 1
        return cls(first, last_change, run)

    @property
    def first_stable_epoch(self) -> int:
        """:func:`first_stable_epoch` of the timeline up to here."""
        return self.last_change if self.last_change is not None else self.first_epoch

    def is_stable(self, rounds: int = DEFAULT_STABLE_ROUNDS) -> bool:
        """:func:`is_stable` of the timeline up to here."""
        return self.run >= rounds

    def to_list(self) -> list[int | None]:
        """``[first_epoch, last_change, run]`` (plain JSON, for checkpoints)."""
        return [self.first_epoch, self.last_change, self.run]

    @classmethod
    def from_list(cls, data: Sequence[Any]) -> UnitStability:
        """Inverse of :meth:`to_list`."""
        first, last, run = data
        return cls(int(first), None if last is None else int(last), int(run))


def summarize_units(
    layer: str,
    epoch: int,
    units: Iterable[tuple[int, UnitDrift, UnitStability]],
    stable_rounds: int = DEFAULT_STABLE_ROUNDS,
) -> LayerDriftSummary:
    """Summarise one layer at one epoch from its units' records there and their running stability.

    Args:
        layer: Layer name.
        epoch: The epoch summarised.
        units: ``(unit, drift at epoch, stability after it)`` of every unit explained at ``epoch``, in unit order.
        stable_rounds: ``N`` for the "stable for the last N comparisons" count.

    Example:
        >>> d = UnitDrift("fc", 0, 0, "x", 0.6)
        >>> summarize_units("fc", 0, [(0, d, UnitStability.advance(None, d))]).first_stable_epoch
        {0: 0}
    """
    now: list[UnitDrift] = []
    first_stable: dict[int, int] = {}
    n_stable = 0
    for unit, d, state in units:
        now.append(d)
        first_stable[unit] = state.first_stable_epoch
        n_stable += state.is_stable(stable_rounds)
    return _summary(layer, epoch, now, first_stable, n_stable, stable_rounds)


def summarize_layer_epochs(
    layer: str,
    epochs: Sequence[int],
    timelines: Mapping[int, Sequence[UnitDrift]],
    stable_rounds: int = DEFAULT_STABLE_ROUNDS,
) -> list[LayerDriftSummary]:
    """:func:`summarize_layer` at several epochs in one pass over each unit's timeline.

    ``[summarize_layer(layer, e, timelines, stable_rounds) for e in epochs]``, equal field by field, but in
    ``O(units * (timeline + epochs))`` instead of ``O(units * timeline * epochs)``: a history of 100 rounds of
    100k units is summarised in seconds, not hours. The timelines must be in epoch order (as
    :meth:`~lightning_neurons.drift.history.RunHistory.timeline` gives them).

    Args:
        layer: Layer name.
        epochs: The epochs to summarise (any order; one summary per entry, in that order).
        timelines: Per unit, its drift records in epoch order.
        stable_rounds: ``N`` for the "stable for the last N comparisons" count.

    Returns:
        One summary per entry of ``epochs``.

    Example:
        >>> t = {0: [UnitDrift("fc", 0, 0, "x", 0.6), UnitDrift("fc", 0, 1, "y", 0.8, 0, "x", 0.2, True)]}
        >>> [(s.epoch, s.n_units, s.n_changed) for s in summarize_layer_epochs("fc", [0, 1], t)]
        [(0, 1, 0), (1, 1, 1)]
    """
    wanted = sorted(set(int(e) for e in epochs))
    at: dict[int, list[tuple[int, UnitDrift, UnitStability]]] = {e: [] for e in wanted}
    for unit in sorted(timelines):
        timeline = timelines[unit]
        # Running state over the timeline (UnitStability), read off at each wanted epoch the unit was explained at.
        state: UnitStability | None = None
        pos = 0
        for e in wanted:
            while pos < len(timeline) and timeline[pos].epoch <= e:
                state = UnitStability.advance(state, timeline[pos])
                pos += 1
            if state is not None and timeline[pos - 1].epoch == e:
                at[e].append((unit, timeline[pos - 1], state))
    out = {e: summarize_units(layer, e, at[e], stable_rounds) for e in wanted}
    return [out[int(e)] for e in epochs]


def _summary(
    layer: str, epoch: int, now: list[UnitDrift], first_stable: dict[int, int], n_stable: int, stable_rounds: int
) -> LayerDriftSummary:
    compared = [d for d in now if d.compared]
    n_changed = sum(d.changed for d in compared)
    n_concepts = sum(d.concepts_changed for d in compared)
    n_gained = sum(d.gained for d in compared)
    n_lost = sum(d.lost for d in compared)
    scores = [d.score for d in now if math.isfinite(d.score)]
    return LayerDriftSummary(
        layer=layer,
        epoch=epoch,
        n_units=len(now),
        n_compared=len(compared),
        n_changed=n_changed,
        fraction_changed=n_changed / len(compared) if compared else 0.0,
        # Over the units with a score: a dead unit has none (NaN), and one NaN must not hide the layer's mean.
        mean_score=sum(scores) / len(scores) if scores else float("nan"),
        mean_similarity=sum(d.similarity or 0.0 for d in compared) / len(compared) if compared else None,
        mean_jaccard=sum(d.jaccard or 0.0 for d in compared) / len(compared) if compared else None,
        stable_rounds=stable_rounds,
        n_stable=n_stable,
        first_stable_epoch=first_stable,
        n_concepts_changed=n_concepts,
        fraction_concepts_changed=n_concepts / len(compared) if compared else 0.0,
        n_gained=n_gained,
        fraction_gained=n_gained / len(compared) if compared else 0.0,
        n_lost=n_lost,
        fraction_lost=n_lost / len(compared) if compared else 0.0,
        n_dead=sum(d.dead for d in now),
        n_baseline=sum(d.baseline for d in now),
    )


def summarize_layer(
    layer: str,
    epoch: int,
    timelines: Mapping[int, Sequence[UnitDrift]],
    stable_rounds: int = DEFAULT_STABLE_ROUNDS,
) -> LayerDriftSummary:
    """Summarise one layer at one epoch.

    Args:
        layer: Layer name.
        epoch: The epoch to summarise; records after it are ignored.
        timelines: Per unit, its drift records in epoch order (any epochs; only those ``<= epoch`` count).
        stable_rounds: ``N`` for the "stable for the last N comparisons" count.

    Returns:
        The summary; units not explained at ``epoch`` are left out.

    Example:
        >>> t = {0: [UnitDrift("fc", 0, 0, "x", 0.6), UnitDrift("fc", 0, 1, "y", 0.8, 0, "x", 0.2, True)]}
        >>> s = summarize_layer("fc", 1, t)
        >>> (s.fraction_changed, s.mean_score, s.first_stable_epoch)
        (1.0, 0.8, {0: 1})
    """
    now: list[UnitDrift] = []
    first_stable: dict[int, int] = {}
    n_stable = 0
    for unit in sorted(timelines):
        past = [d for d in timelines[unit] if d.epoch <= epoch]
        if not past or past[-1].epoch != epoch:
            continue
        now.append(past[-1])
        first = first_stable_epoch(past)
        if first is not None:
            first_stable[unit] = first
        n_stable += is_stable(past, stable_rounds)
    return _summary(layer, epoch, now, first_stable, n_stable, stable_rounds)
