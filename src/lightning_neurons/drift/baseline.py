"""Drift baselines: where a change of the settings that decide what a round means starts a new baseline.

Two rounds explained under different vocabularies, class names, backends (or backend models), ``top_k`` or
reductions describe the same weights in different terms: their descriptions differ because the question changed,
not the network. Such rounds are never compared for drift. Each round carries a fingerprint of those settings,
``ExplanationRound.identity.settings``, made by :func:`settings_fingerprint` (the one place that says which settings
count; :func:`lightning_neurons.identity.settings_fingerprint` applies it to a run's config). A unit whose previous
explanation has another fingerprint starts a new baseline (:func:`baseline_units`), and :func:`changed_settings`
names what changed for the resume warning.

Example:
    >>> from lightning_neurons.config import RunConfig
    >>> from lightning_neurons.identity import settings_fingerprint
    >>> a = settings_fingerprint(RunConfig.from_arguments(layers=["fc"], top_k=16))
    >>> b = settings_fingerprint(RunConfig.from_arguments(layers=["fc"], top_k=32))
    >>> comparable(a[0], b[0]), changed_settings(a[1], b[1])
    (False, ['top_k'])
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Container, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lightning_neurons.results import ExplanationRound, json_safe

if TYPE_CHECKING:
    from lightning_neurons.config import RunConfig


#: The settings that change what a round means, in display order (keys of a settings summary).
SETTING_NAMES: tuple[str, ...] = ("vocabulary", "concepts", "class_names", "backend", "model", "top_k", "reduction")


def _digest(value: Any) -> str:
    text = json.dumps(json_safe(value), sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _names(names: Sequence[str] | None) -> str | None:
    # Long lists (1,000 ImageNet classes, 10,000 concepts) are summarised: count and digest.
    return None if not names else f"{len(names)} names #{_digest(list(names))[:8]}"


def _config_summary(
    config: RunConfig, class_names: Sequence[str] | None, concepts: Sequence[str] | None
) -> dict[str, Any]:
    backend = config.backend
    name = backend.backend if isinstance(backend.backend, str) else getattr(backend.backend, "name", "custom")
    encoder = None if isinstance(backend.backend, str) else getattr(backend.backend.encoder, "name", None)
    names = backend.class_names or (tuple(class_names) if class_names else None)
    vocabulary: list[Any] = [str(v) for v in backend.vocabulary]
    if backend.llm_vocabulary:
        vocabulary.append("llm")
    return {
        "vocabulary": vocabulary,
        "concepts": _names(concepts),
        "class_names": _names(names),
        "backend": str(name),
        "model": json_safe(dict(backend.backend_kwargs)) or encoder,
        "top_k": int(config.recording.top_k),
        "reduction": str(config.recording.reduction),
    }


def settings_fingerprint(
    meta_or_config: Mapping[str, Any] | RunConfig,
    *,
    class_names: Sequence[str] | None = None,
    concepts: Sequence[str] | None = None,
) -> tuple[str, dict[str, Any]]:
    """The fingerprint and readable summary of the settings that decide what a round means.

    The one place that says which settings those are (:data:`SETTING_NAMES`); the session stamps its rounds with it
    and the resume warning compares its summaries.

    Args:
        meta_or_config: A :class:`~lightning_neurons.config.RunConfig`, a round's ``meta`` (its ``"settings"`` entry
            is read), or a settings summary itself.
        class_names: With a config: the class names read from the data (the config's own win).
        concepts: With a config: the concept texts of the built vocabulary (a file that changed changes them).

    Returns:
        ``(fingerprint, summary)``: a 16-hex-digit digest of the summary, and the summary (keys of
        :data:`SETTING_NAMES` that are known).

    Example:
        >>> fp, summary = settings_fingerprint({"settings": {"top_k": 16, "reduction": "max"}, "units": 4})
        >>> len(fp), summary
        (16, {'top_k': 16, 'reduction': 'max'})
    """
    if isinstance(meta_or_config, Mapping):
        source = meta_or_config.get("settings", meta_or_config)
        summary = {k: json_safe(source[k]) for k in SETTING_NAMES if isinstance(source, Mapping) and k in source}
    else:
        summary = _config_summary(meta_or_config, class_names, concepts)
    return _digest(summary), summary


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

    A setting only one summary knows (written by another version) is not counted.

    Example:
        >>> changed_settings({"vocabulary": ["general"], "top_k": 16}, {"vocabulary": ["colours"], "top_k": 16})
        ['vocabulary']
    """
    if not previous or not current:
        return []
    return [k for k in previous if k in current and previous[k] != current[k]]


def describe_change(previous: Mapping[str, Any], current: Mapping[str, Any], width: int = 80) -> str:
    """One line naming each changed setting with its old and new value (for warnings; long values shortened).

    Example:
        >>> describe_change({"top_k": 16, "reduction": "max"}, {"top_k": 8, "reduction": "max"})
        'top_k 16 -> 8'
    """

    def short(value: Any) -> str:
        text = str(value)
        return text if len(text) <= width else text[: width - 3] + "..."

    return ", ".join(f"{k} {short(previous[k])} -> {short(current[k])}" for k in changed_settings(previous, current))


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
    "settings_fingerprint",
    "baseline_units",
    "changed_settings",
    "comparable",
    "describe_change",
    "round_settings",
    "settings_warning",
]
