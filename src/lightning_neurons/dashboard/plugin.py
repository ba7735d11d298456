"""The TensorBoard **Neurons** tab: a dynamic plugin that serves the views of every run's history under the logdir.

Installed with the package (entry point ``tensorboard_plugins``: ``neurons = lightning_neurons.dashboard.plugin:
NeuronsPlugin``); TensorBoard loads it at start, no rebuild. The tab is an ES module (``static/index.js``) that
TensorBoard runs in an iframe; its data routes are thin JSON wrappers over :mod:`lightning_neurons.dashboard.queries`:

- ``/runs``: every run with explanations: ``[{"key", "run", "explainer", "layers", "epochs"}]``;
- ``/layer?run=&layer=&epoch=&sort=&state=&q=&offset=&limit=``: :func:`~.queries.layer_view`;
- ``/unit?run=&layer=&unit=``: :func:`~.queries.unit_timeline`;
- ``/search?run=&q=&epoch=``: :func:`~.queries.search`;
- ``/charts?run=&layer=``: :func:`~.queries.layer_charts`;
- ``/crop?run=&path=``: a crop PNG of the run (``previews/...``).

It reads the run's files directly (the round store ``history/`` of each explainer's output folder, or the
``history.jsonl`` of an earlier run), whatever logger wrote the event files, and lists them again on each request,
so rounds written while the run trains appear on reload. A run is addressed by its key in the listing, never by a
path; a crop must resolve to a PNG inside that run's ``previews`` folder (no path traversal), and the frontend sets
every text as text (never as HTML).

Example:
    >>> from tensorboard.plugins import base_plugin
    >>> plugin = NeuronsPlugin(base_plugin.TBContext(logdir="/nonexistent"))
    >>> plugin.is_active(), plugin.frontend_metadata().tab_name
    (False, 'Neurons')
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from importlib import resources
from pathlib import Path
from typing import Any

from tensorboard.backend import http_util
from tensorboard.plugins import base_plugin
from werkzeug import Request, Response

from lightning_neurons.dashboard.queries import HistoryTables, layer_charts, layer_view, search, unit_timeline
from lightning_neurons.drift.store import HISTORY_FILENAME, ROUND_FILE, STORE_DIRNAME

PLUGIN_NAME = "neurons"
_RESCAN_S = 2.0  # is_active and /runs rescan the logdir at most this often
_MAX_LIMIT = 2000


def find_runs(logdir: str | Path) -> dict[str, Path]:
    """Every explainer output folder under ``logdir`` that holds a history, by key (its path relative to the logdir).

    Example:
        >>> find_runs("/nonexistent")
        {}
    """
    root = Path(logdir)
    found: dict[str, Path] = {}
    if not root.is_dir():
        return found
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if here.name == STORE_DIRNAME and any(ROUND_FILE.match(f) for f in files):
            owner = here.parent
        elif HISTORY_FILENAME in files and not (here / STORE_DIRNAME).is_dir():
            owner = here
        else:
            continue
        key = owner.relative_to(root).as_posix()
        found[key] = owner
        if here.name == STORE_DIRNAME:
            dirs[:] = []
    return dict(sorted(found.items()))


def _split(key: str) -> tuple[str, str]:
    # "version_0/neurons" -> run "version_0", explainer "neurons" (the output folder's name).
    run, _, explainer = key.rpartition("/")
    return (run or ".", explainer or key)


class NeuronsPlugin(base_plugin.TBPlugin):
    """The Neurons tab (see the module docstring).

    Args:
        context: TensorBoard's plugin context (its ``logdir`` is scanned for histories).
    """

    plugin_name = PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext) -> None:
        self._logdir = context.logdir or ""
        self._lock = threading.Lock()
        self._runs: dict[str, Path] = {}
        self._scanned = 0.0
        self._tables: dict[str, HistoryTables] = {}

    # ------------------------------------------------------------------ TensorBoard API
    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="Neurons")

    def is_active(self) -> bool:
        return bool(self._logdir) and bool(self.runs())

    def get_plugin_apps(self) -> dict[str, Any]:
        return {
            "/index.js": _wsgi(self._serve_js),
            "/runs": _wsgi(self._serve_runs),
            "/layer": _wsgi(self._serve_layer),
            "/unit": _wsgi(self._serve_unit),
            "/search": _wsgi(self._serve_search),
            "/charts": _wsgi(self._serve_charts),
            "/crop": _wsgi(self._serve_crop),
        }

    # ------------------------------------------------------------------ runs
    def runs(self, refresh: bool = False) -> dict[str, Path]:
        """The runs with explanations under the logdir (rescanned at most every few seconds)."""
        with self._lock:
            if refresh or time.monotonic() - self._scanned > _RESCAN_S:
                self._runs = find_runs(self._logdir) if self._logdir else {}
                self._scanned = time.monotonic()
                self._tables = {k: v for k, v in self._tables.items() if k in self._runs}
            return dict(self._runs)

    def tables(self, key: str) -> HistoryTables:
        """The history tables of one run (``KeyError`` for a key that is not a run under the logdir)."""
        folder = self.runs().get(key)
        if folder is None:
            folder = self.runs(refresh=True)[key]
        with self._lock:
            tables = self._tables.get(key)
            # A JSON Lines history is read into memory: read it again when the file changed (the run goes on).
            stamp = _stamp(folder)
            if tables is None or getattr(tables, "_stamp", None) != stamp:
                tables = HistoryTables.open(folder)
                tables._stamp = stamp  # type: ignore[attr-defined]
                self._tables[key] = tables
        return tables

    # ------------------------------------------------------------------ routes
    def _serve_js(self, request: Request) -> Response:
        source = resources.files("lightning_neurons.dashboard").joinpath("static/index.js").read_bytes()
        return http_util.Respond(request, source, "application/javascript")

    def _serve_runs(self, request: Request) -> Response:
        out = []
        for key in self.runs(refresh=True):
            tables = self.tables(key)
            run, explainer = _split(key)
            out.append(
                {"key": key, "run": run, "explainer": explainer, "layers": tables.layers(), "epochs": tables.epochs()}
            )
        return _json(request, out)

    def _serve_layer(self, request: Request) -> Response:
        args = request.args
        return self._answer(
            request,
            lambda t: layer_view(
                t,
                args.get("layer", ""),
                _int(args.get("epoch")),
                sort=args.get("sort", "unit") if args.get("sort") in ("unit", "score", "drift") else "unit",  # type: ignore[arg-type]
                state=args.get("state") or None,
                query=args.get("q") or None,
                offset=max(0, _int(args.get("offset")) or 0),
                limit=min(_MAX_LIMIT, max(1, _int(args.get("limit")) or 200)),
            ),
        )

    def _serve_unit(self, request: Request) -> Response:
        unit = _int(request.args.get("unit"))
        if unit is None:
            return _json(request, {"error": "unit must be an integer"}, 400)
        return self._answer(request, lambda t: unit_timeline(t, request.args.get("layer", ""), unit))

    def _serve_search(self, request: Request) -> Response:
        q = request.args.get("q", "")[:200]
        return self._answer(request, lambda t: search(t, q, _int(request.args.get("epoch"))))

    def _serve_charts(self, request: Request) -> Response:
        return self._answer(request, lambda t: layer_charts(t, request.args.get("layer", "")))

    def _serve_crop(self, request: Request) -> Response:
        folder = self.runs().get(request.args.get("run", ""))
        rel = request.args.get("path", "")
        if folder is None or not rel:
            return _json(request, {"error": "unknown run or crop"}, 404)
        previews = (folder / "previews").resolve()
        target = (folder / rel).resolve()
        # Only PNG files inside this run's previews folder: no "..", no absolute paths, no symlinks out of it.
        if not target.is_relative_to(previews) or target.suffix != ".png" or not target.is_file():
            return _json(request, {"error": "not a crop of this run"}, 404)
        return http_util.Respond(request, target.read_bytes(), "image/png")

    def _answer(self, request: Request, query: Any) -> Response:
        key = request.args.get("run", "")
        try:
            tables = self.tables(key)
        except KeyError:
            return _json(request, {"error": "unknown run"}, 404)
        except FileNotFoundError:
            return _json(request, {"error": "the run holds no history yet"}, 404)
        return _json(request, query(tables))


def _wsgi(handler: Callable[[Request], Response]) -> Callable[[dict[str, Any], Any], Iterable[bytes]]:
    # A route: the WSGI application answering each request with the handler's response.
    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        return handler(Request(environ))(environ, start_response)

    return app


def _stamp(folder: Path) -> tuple[int, int] | None:
    legacy = folder / HISTORY_FILENAME
    if (folder / STORE_DIRNAME).is_dir() or not legacy.is_file():
        return None  # a round store is listed on every query
    st = legacy.stat()
    return (st.st_mtime_ns, st.st_size)


def _int(x: str | None) -> int | None:
    try:
        return None if x in (None, "") else int(x)  # type: ignore[arg-type]
    except ValueError:
        return None


def _json(request: Request, obj: Any, code: int = 200) -> Response:
    return http_util.Respond(request, obj, "application/json", code=code)


__all__ = ["PLUGIN_NAME", "NeuronsPlugin", "find_runs"]
