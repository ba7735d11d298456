"""Resolve a layer specification against a model's ``named_modules()``.

A specification is a module name (``"layer4"``), a glob pattern (``"layer*.1.conv2"``, matched with
:mod:`fnmatch`), a list of those, or a predicate ``(name, module) -> bool`` (the style of TransformerLens'
names filter). Unknown names fail early with the closest real names, so that a typo is caught in ``setup``
and not after an epoch of training.

Example:
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    >>> list(resolve_layers(model, ["0", "2"]))
    ['0', '2']
    >>> list(resolve_layers(model, lambda name, m: isinstance(m, nn.Conv2d)))
    ['0', '2']
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Sequence

from torch import nn

LayerPredicate = Callable[[str, nn.Module], bool]
LayerSpec = str | Sequence[str] | LayerPredicate

_GLOB_CHARS = frozenset("*?[")


def resolve_layers(model: nn.Module, spec: LayerSpec) -> dict[str, nn.Module]:
    """Return ``{name: module}`` for the layers that ``spec`` selects, in ``named_modules()`` order.

    Args:
        model: The network (a LightningModule is fine: its submodule names then start with its attribute
            names, e.g. ``"backbone.layer4"``).
        spec: A name, a glob pattern, a list of names/patterns, or a predicate ``(name, module) -> bool``.

    Raises:
        ValueError: If a name or pattern matches nothing (the message lists the closest real names), or if
            the specification selects no layer at all.
        TypeError: If ``spec`` has an unsupported type.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
        >>> list(resolve_layers(model, "0.*"))
        ['0.0', '0.1']
    """
    modules = dict(model.named_modules())
    modules.pop("", None)  # the root itself is never a layer to record

    if callable(spec) and not isinstance(spec, str):
        selected = {name: m for name, m in modules.items() if spec(name, m)}
        if not selected:
            raise ValueError("the layer predicate selected no module of the model")
        return selected

    patterns = [spec] if isinstance(spec, str) else list(spec) if isinstance(spec, Sequence) else None
    if patterns is None or not all(isinstance(p, str) for p in patterns):
        raise TypeError(
            f"layers must be a name, a glob pattern, a list of those, or a predicate; got {type(spec).__name__}"
        )
    if not patterns:
        raise ValueError("layers is empty: name at least one layer")

    wanted: set[str] = set()
    for pattern in patterns:
        if pattern in modules:
            wanted.add(pattern)
            continue
        matches = fnmatch.filter(modules, pattern) if _GLOB_CHARS & set(pattern) else []
        if not matches:
            raise ValueError(_unknown_message(pattern, list(modules)))
        wanted.update(matches)
    return {name: m for name, m in modules.items() if name in wanted}


def _unknown_message(pattern: str, names: list[str]) -> str:
    close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.5)
    if not close:
        # Last path component is often what was mistyped ("layer4.conv" vs "backbone.layer4.conv").
        tail = pattern.rsplit(".", 1)[-1]
        close = [n for n in names if n.endswith("." + tail) or n == tail][:5]
    hint = f"; did you mean one of {close}?" if close else f"; the model has e.g. {names[:8]}"
    return f"layer {pattern!r} matches no module of the model{hint}"


__all__ = ["LayerPredicate", "LayerSpec", "resolve_layers"]
