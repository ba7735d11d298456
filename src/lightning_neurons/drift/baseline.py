"""Drift baselines: where a change of the settings that decide what a round means starts a new baseline.

Two rounds explained under different vocabularies, class names, backends (or backend models), ``top_k``,
reductions or explanation settings (how a description is chosen and judged, the control set, the normalisation,
captioning, how regions are cut) describe the same weights in different terms: their descriptions differ because the
question changed, not the network. Such rounds are never compared for drift. Each round carries a fingerprint of
those settings, ``ExplanationRound.identity.settings``, made by
:func:`lightning_neurons.identity.settings_fingerprint` (the one place that says which settings count, with the keys
:data:`SETTING_NAMES`). A unit whose previous explanation has another fingerprint starts a new baseline
(:func:`baseline_units`), and :func:`changed_settings` names what changed for the resume warning.

Example:
    >>> from lightning_neurons.config import RunConfig
    >>> from lightning_neurons.identity import settings_fingerprint
    >>> a = settings_fingerprint(RunConfig.from_arguments(layers=["fc"], top_k=16))
    >>> b = settings_fingerprint(RunConfig.from_arguments(layers=["fc"], top_k=32))
    >>> comparable(a[0], b[0]), changed_settings(a[1], b[1])
    (False, ['top_k'])
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from typing import Any

from lightning_neurons.results import ExplanationRound

#: The settings that change what a round means, in display order (keys of a settings summary).
SETTING_NAMES: tuple[str, ...] = (
    "vocabulary",
    "concepts",
    "class_names",
    "backend",
    "model",
    "top_k",
    "reduction",
    "selection",
    "correction",
    "frequency_penalty",
    "permutations",
    "q_threshold",
    "gain_margin",
    "reservoir_size",
    "normalisation",
    "describe",
    "regions",
)


def round_settings(round: ExplanationRound) -> str | None:
    """A round's settings fingerprint (``round.identity.settings``), ``None`` for rounds without one.

    Example:
        >>> from lightning_neurons.results import RoundIdentity
        >>> round_settings(ExplanationRound(0)) is None
        True
        >>> round_settings(ExplanationRound(0, identity=RoundIdentity("run", settings="ab12")))
        'ab12'
    """
    if round.identity is not None and round.identity.settings:
        return round.identity.settings
    return None


def comparable(previous: str | None, current: str | None) -> bool:
    """Whether two rounds' settings allow a drift comparison: same fingerprint, or either unknown (older records).

    Example:
        >>> comparable("a", "a"), comparable("a", "b"), comparable(None, "b")
        (True, False, True)
    """
    return not previous or not current or previous == current


def baseline_units(
    previous_settings: Mapping[tuple[str, int], str | None], current: str | None
) -> Container[tuple[str, int]]:
    """The units whose previous explanation was made under other settings: they start a new baseline.

    Args:
        previous_settings: Per ``(layer, unit)``, the settings fingerprint of the unit's previous explanation.
        current: The new round's fingerprint (:func:`round_settings`).

    Example:
        >>> sorted(baseline_units({("fc", 0): "a", ("fc", 1): "b", ("fc", 2): None}, "a"))
        [('fc', 1)]
    """
    return frozenset(k for k, fp in previous_settings.items() if not comparable(fp, current))


def changed_settings(previous: Mapping[str, Any] | None, current: Mapping[str, Any] | None) -> list[str]:
    """The names of the settings that differ between two summaries (``RoundIdentity.settings_summary``), in order.

    A setting only one summary holds counts as changed: the other was written by a version that did not record it,
    so its fingerprint covers other settings and the rounds are not compared (the warning must say why).

    Example:
        >>> changed_settings({"vocabulary": ["general"], "top_k": 16}, {"vocabulary": ["colours"], "top_k": 16})
        ['vocabulary']
        >>> changed_settings({"top_k": 16}, {"top_k": 16, "q_threshold": 0.05})
        ['q_threshold']
    """
    if not previous or not current:
        return []
    names = list(dict.fromkeys([*previous, *current]))
    return [k for k in names if k not in previous or k not in current or previous[k] != current[k]]


def describe_change(previous: Mapping[str, Any], current: Mapping[str, Any], width: int = 80) -> str:
    """One line naming each changed setting with its old and new value (for warnings; long values shortened).

    Example:
        >>> describe_change({"top_k": 16, "reduction": "max"}, {"top_k": 8, "reduction": "max"})
        'top_k 16 -> 8'
        >>> describe_change({"top_k": 16}, {"top_k": 16, "q_threshold": 0.05, "regions": "crops 224"})
        'not recorded by the earlier version: q_threshold, regions'
    """

    def short(value: Any) -> str:
        text = str(value)
        return text if len(text) <= width else text[: width - 3] + "..."

    changed = changed_settings(previous, current)
    # Settings one version recorded and the other did not: named once, together, not one line each.
    new = [k for k in changed if k not in previous]
    gone = [k for k in changed if k not in current]
    parts = [f"{k} {short(previous[k])} -> {short(current[k])}" for k in changed if k in previous and k in current]
    if new:
        parts.append(f"not recorded by the earlier version: {', '.join(new)}")
    if gone:
        parts.append(f"not recorded by this version: {', '.join(gone)}")
    return ", ".join(parts)


def settings_warning(checkpoint: Mapping[str, Any] | None, current: Mapping[str, Any] | None) -> str | None:
    """The resume warning when the settings changed since a checkpoint (``None`` when none changed), naming them.

    Example:
        >>> settings_warning({"top_k": 16}, {"top_k": 8})[:69]
        'the explanation settings changed since the checkpoint (top_k 16 -> 8)'
    """
    if not changed_settings(checkpoint, current):
        return None
    assert checkpoint is not None and current is not None
    return (
        f"the explanation settings changed since the checkpoint ({describe_change(checkpoint, current)}): the next "
        "round starts a new drift baseline, no unit is compared across the change"
    )


__all__ = [
    "SETTING_NAMES",
    "baseline_units",
    "changed_settings",
    "comparable",
    "describe_change",
    "round_settings",
    "settings_warning",
]
