"""``backend="auto"``: the strongest image-text encoder the user has, else the offline pack with one warning.

The choice, in order:

1. the open_clip model asked for (``model_name`` / ``pretrained`` in ``backend_kwargs``; default ViT-B-16
   ``laion2b_s34b_b88k``) when its weights are in the local cache;
2. any other open_clip model whose weights are in the local cache: a pretrained tag of open_clip's registry, or a
   Hugging Face repository with an ``open_clip_config.json`` (loaded as ``hf-hub:org/name``);
3. the asked-for model, fetched, unless the hub is offline (``HF_HUB_OFFLINE``: offline means the cache only);
4. the embedded offline pack, with one :class:`AutoBackendWarning` that says how much weaker it is and how to get
   CLIP.

The cache is the Hugging Face hub cache: ``cache_dir`` in ``backend_kwargs``, else ``HF_HUB_CACHE``, else
``HF_HOME/hub``, else huggingface_hub's default (read when the backend is loaded, not when the package is
imported), plus open_clip's own download folder for the weights it fetches by URL.

Example:
    >>> choice = choose_auto(cache_dir="/nonexistent", offline=True)
    >>> choice.backend, choice.reason.startswith("no open_clip weights")
    ('embedded', True)
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lightning_neurons.backends.clip import DEFAULT_MODEL, DEFAULT_PRETRAINED

#: open_clip's own download folder for the weights it fetches by URL (its default ``cache_dir``).
OPEN_CLIP_URL_CACHE = Path("~/.cache/clip")

#: Weight files of an open_clip checkpoint on the Hugging Face hub, preferred first (open_clip's own names).
HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")

#: The command that puts the default CLIP in the cache, where downloads work (then ``backend="auto"`` finds it).
PREFETCH_COMMAND = (
    f"python -c \"import open_clip; open_clip.create_model('{DEFAULT_MODEL}', pretrained='{DEFAULT_PRETRAINED}')\""
)

#: The fallback warning. Figures: README, section Models (per-crop zero-shot accuracy of the embedded encoder on
#: the broad benchmark's held-out split) and section Evaluation (its typical failure on small crops).
FALLBACK_MESSAGE = (
    'backend="auto" uses the embedded offline pack (MobileNetV2 ConSE + MiniLM) because {reason}. It is much '
    "weaker than CLIP: its per-crop zero-shot accuracy on the benchmark's held-out photos is 0.345 with class names "
    "(0.509 on the development split; README, Models), and on small crops it names the nearest ImageNet object "
    '("nematode" for the moon, "golf ball" for grass). To use CLIP, download its weights once where the network '
    'works: {command} (then backend="auto" finds them in the cache, also offline), or pass '
    'backend="clip" with backend_kwargs={{"pretrained": "/path/to/open_clip_model.safetensors"}}. '
    'backend="embedded" chooses the offline pack without this warning.'
)


class AutoBackendWarning(UserWarning):
    """``backend="auto"`` fell back to the embedded offline pack."""


@dataclass(frozen=True)
class AutoChoice:
    """What ``backend="auto"`` loads and why.

    Args:
        backend: ``"clip"`` or ``"embedded"``.
        model_name: The open_clip model (``None`` for the embedded pack).
        pretrained: Its pretrained tag (``None`` for an ``hf-hub:`` model or the embedded pack).
        cache_dir: The hub cache that was searched.
        reason: A readable reason, e.g. ``"cached"``, ``"fetch"`` or why no CLIP could be used.
    """

    backend: Literal["clip", "embedded"]
    model_name: str | None
    pretrained: str | None
    cache_dir: str
    reason: str


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """Whether the Hugging Face hub is offline (``HF_HUB_OFFLINE``, read now, or huggingface_hub's own setting).

    Example:
        >>> isinstance(hub_offline(), bool)
        True
    """
    if _truthy(os.environ.get("HF_HUB_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - a dependency of open_clip
        return True
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def hub_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The Hugging Face hub cache to search: ``cache_dir``, ``HF_HUB_CACHE``, ``HF_HOME/hub``, or the default.

    Example:
        >>> str(hub_cache_dir("/tmp/hub"))
        '/tmp/hub'
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _cached_hub_file(cache: Path, repo_id: str, filenames: tuple[str, ...]) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        found = try_to_load_from_cache(repo_id, name, cache_dir=str(cache))
        if isinstance(found, str) and Path(found).is_file():
            return found
    return None


def weights_cached(model_name: str, pretrained: str | None, cache_dir: Path) -> bool:
    """Whether an open_clip model's weights are in the local cache (no network).

    ``model_name`` is an open_clip architecture with a pretrained tag, or ``"hf-hub:org/name"``.

    Example:
        >>> from pathlib import Path
        >>> weights_cached("ViT-B-16", "laion2b_s34b_b88k", Path("/nonexistent"))
        False
    """
    import open_clip

    if model_name.startswith("hf-hub:"):
        repo = model_name[len("hf-hub:") :]
        return (
            _cached_hub_file(cache_dir, repo, ("open_clip_config.json",)) is not None
            and _cached_hub_file(cache_dir, repo, HF_WEIGHT_FILES) is not None
        )
    if pretrained is None:
        return False
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained) or {}
    hub = str(cfg.get("hf_hub") or "")
    if hub:
        repo, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
        names = (filename,) if filename else HF_WEIGHT_FILES
        if _cached_hub_file(cache_dir, repo, names) is not None:
            return True
    url = str(cfg.get("url") or "")
    if url:
        return (OPEN_CLIP_URL_CACHE.expanduser() / os.path.basename(url)).is_file()
    return False


def _cached_candidates(cache_dir: Path) -> Iterator[tuple[str, str | None]]:
    """Every open_clip model with weights in the cache: registry tags first, then ``hf-hub:`` repositories."""
    import open_clip

    for model_name, tag in open_clip.list_pretrained():
        if weights_cached(model_name, tag, cache_dir):
            yield model_name, tag
    if cache_dir.is_dir():
        for config in sorted(cache_dir.glob("models--*--*/snapshots/*/open_clip_config.json")):
            repo_dir = config.parents[2].name  # models--org--name
            org, _, name = repo_dir[len("models--") :].partition("--")
            model_name = f"hf-hub:{org}/{name}"
            if weights_cached(model_name, None, cache_dir):
                yield model_name, None


def choose_auto(
    model_name: str | None = None,
    pretrained: str | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    offline: bool | None = None,
) -> AutoChoice:
    """Decide what ``backend="auto"`` loads, without loading anything (see the module docstring for the order).

    Args:
        model_name: The open_clip model wanted (default ViT-B-16).
        pretrained: Its pretrained tag (default ``laion2b_s34b_b88k`` for the default model).
        cache_dir: The hub cache (default: ``HF_HUB_CACHE`` / ``HF_HOME`` / huggingface_hub's default).
        offline: Whether fetching is ruled out (default: :func:`hub_offline`).

    Returns:
        The :class:`AutoChoice`.
    """
    cache = hub_cache_dir(cache_dir)
    wanted = model_name or DEFAULT_MODEL
    tag = pretrained if pretrained is not None else (DEFAULT_PRETRAINED if model_name is None else None)
    is_offline = offline if offline is not None else hub_offline()
    no_weights = AutoChoice(
        "embedded",
        None,
        None,
        str(cache),
        f"no open_clip weights are in the local cache ({cache}) and HF_HUB_OFFLINE rules out a download",
    )
    not_installed = AutoChoice(
        "embedded", None, None, str(cache), "open_clip is not installed (pip install open_clip_torch)"
    )
    if importlib.util.find_spec("open_clip") is None:
        return not_installed
    if is_offline and not _may_hold_weights(cache):
        # Importing open_clip (and timm) takes 1.5 s on 2 CPU cores, a seventh of a short fine-tune: skip it when no
        # file it could load exists.
        return no_weights
    try:
        import open_clip  # noqa: F401
    except ImportError:  # found but broken (a missing dependency): as if it were not installed
        return not_installed
    if weights_cached(wanted, tag, cache):
        return AutoChoice("clip", wanted, tag, str(cache), "cached")
    for found, found_tag in _cached_candidates(cache):
        return AutoChoice("clip", found, found_tag, str(cache), "cached")
    if is_offline:
        return no_weights
    return AutoChoice("clip", wanted, tag, str(cache), "fetch")


def _may_hold_weights(cache: Path) -> bool:
    """Whether ``cache`` holds any hub repository snapshot, or open_clip's download folder any file.

    Without either no open_clip weights can be found, so there is no need to import open_clip and look.
    """
    url_cache = OPEN_CLIP_URL_CACHE.expanduser()
    in_hub = cache.is_dir() and any(True for _ in cache.glob("models--*/snapshots/*/*"))
    return in_hub or (url_cache.is_dir() and any(path.is_file() for path in url_cache.iterdir()))


#: Reasons already warned about in this process: the fallback says so once, not at every fit, validate or explain.
_WARNED: set[str] = set()


def fallback_warning(reason: str) -> None:
    """Emit the one warning of the fallback to the embedded pack (once per process and reason)."""
    if reason in _WARNED:
        return
    _WARNED.add(reason)
    warnings.warn(FALLBACK_MESSAGE.format(reason=reason, command=PREFETCH_COMMAND), AutoBackendWarning, stacklevel=3)


__all__ = [
    "FALLBACK_MESSAGE",
    "HF_WEIGHT_FILES",
    "OPEN_CLIP_URL_CACHE",
    "PREFETCH_COMMAND",
    "AutoBackendWarning",
    "AutoChoice",
    "choose_auto",
    "fallback_warning",
    "hub_cache_dir",
    "hub_offline",
    "weights_cached",
]
