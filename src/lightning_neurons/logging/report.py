"""A static, self-contained HTML report of a run's neuron explanations and their drift.

One file, no external assets and no JavaScript: inline CSS, preview crops embedded as base64 PNG, drift plots as
inline SVG. Per layer: plots of the fraction of units whose meaning changed and of the mean score per epoch, a
summary of the latest descriptions (how many units each describes, and every unit listed under its description:
the page's search, ``Ctrl+F``, finds any unit or concept), then per unit its latest crops and a timeline of its
descriptions across epochs (changes of meaning highlighted; a multi-concept combination whose concept set changed
while the description kept its meaning gets a dashed outline and the previous combination), in pages of
:data:`DEFAULT_PAGE_SIZE` units.

It is a static export of the Neurons tab's views, from the same queries (:mod:`lightning_neurons.dashboard.queries`):
the layer charts are :func:`~lightning_neurons.dashboard.queries.layer_charts`, the description index is the layer's
grid (:func:`~lightning_neurons.dashboard.queries.layer_view`) at its latest epoch, and a unit's row is its timeline
(:func:`~lightning_neurons.dashboard.queries.layer_timelines`, every shown unit of a layer from one read of each
round): the same shown text, score, significance and state as the tab's JSON. A history in a round store is read
by those queries only, never replayed into records.

Built to stay usable at 100k units: at most ``max_units`` unit rows per layer (the index lists every unit of the
layer's latest epoch), timelines of at most ``max_epochs`` cells, and pages switched by CSS ``:target`` (a link to a
unit opens its page).

Example:
    >>> write_report("lightning_logs/version_0", "report.html")  # doctest: +SKIP
    PosixPath('report.html')
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_neurons.dashboard.queries import HistoryTables, layer_charts, layer_timelines, layer_view
from lightning_neurons.drift.history import HistoryRecord, RunHistory, find_history_file, load_history
from lightning_neurons.drift.metrics import (
    COMBINATION_CHANGE_JACCARD,
    LayerDriftSummary,
    UnitDrift,
    summarize_layer_epochs,
)
from lightning_neurons.explanation.multi_concept import NO_COMBINATION, format_combination
from lightning_neurons.logging.previews import PREVIEWS_DIRNAME, latest_preview
from lightning_neurons.results import Alternative

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1f2328;background:#fff}
h1{font-size:1.5em;margin-bottom:4px}h2{margin-top:36px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
.meta{color:#57606a;font-size:.9em}
.plots{display:flex;gap:24px;flex-wrap:wrap;margin:12px 0}
.plot{border:1px solid #d0d7de;border-radius:6px;padding:6px}
table.units{border-collapse:collapse;width:100%}
table.units td,table.units th{border-top:1px solid #eaeef2;padding:6px;vertical-align:top;text-align:left}
.crops img{max-width:360px;max-height:120px;image-rendering:pixelated;border-radius:3px}
.timeline{display:flex;gap:6px;overflow-x:auto;max-width:900px}
.ep{flex:0 0 auto;min-width:90px;max-width:160px;border:1px solid #d0d7de;border-radius:6px;padding:4px 6px;
font-size:.85em;background:#f6f8fa}
.ep.changed{background:#fff1e5;border-color:#fb8f44}
.ep[data-state=changed]{border-left:4px solid #fb8f44}.ep[data-state=gained]{border-left:4px solid #2da44e}
.ep[data-state=lost]{border-left:4px solid #cf222e}.ep[data-state=dead]{border-left:4px solid #24292f}
.ep.concepts{border-style:dashed;border-color:#0969da}
.ep .e{color:#57606a;font-size:.8em}.ep .d{font-weight:600;overflow-wrap:anywhere}.ep .s{color:#57606a}
.ep .c{color:#0a3069;font-size:.85em;overflow-wrap:anywhere}
.none{color:#8c959f;font-size:.85em}
.index{max-height:320px;overflow-y:auto;border:1px solid #d0d7de;border-radius:6px;padding:6px 10px;font-size:.85em}
.index dt{font-weight:600;margin-top:4px}.index dd{margin:0 0 0 16px;color:#57606a;overflow-wrap:anywhere}
.index a,.pager a{color:#0969da;text-decoration:none}
.pager{margin:8px 0;font-size:.9em}.pager a{display:inline-block;padding:1px 6px;border:1px solid #d0d7de;
border-radius:4px;margin:2px}
.pages>.page{display:none}.pages>.page:target,.pages>.page:has(:target){display:block}
.pages:not(:has(:target))>.page:first-child{display:block}
"""


#: Units per layer in the report by default (the history file always holds them all).
DEFAULT_MAX_UNITS = 256

#: Unit rows per page of a layer's table.
DEFAULT_PAGE_SIZE = 50

#: Timeline cells (latest epochs) per unit row.
DEFAULT_MAX_EPOCHS = 40

#: Descriptions listed by unit count in a layer's summary.
TOP_DESCRIPTIONS = 12


def _esc(x: object) -> str:
    return html.escape(str(x), quote=True)


def _num(x: float | None, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def line_plot_svg(
    points: Sequence[tuple[float, float]],
    title: str,
    y_range: tuple[float, float] = (0.0, 1.0),
    colour: str = "#0969da",
    width: int = 360,
    height: int = 180,
) -> str:
    """An inline SVG line plot of ``(x, y)`` points (NaN ``y`` values are skipped).

    Example:
        >>> line_plot_svg([(0, 0.5), (1, 0.7)], "mean score").startswith("<svg")
        True
    """
    pad_l, pad_r, pad_t, pad_b = 40, 12, 24, 28
    pts = [(float(x), float(y)) for x, y in points if y is not None and not math.isnan(y)]
    xs = [x for x, _ in pts] or [0.0]
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    y0, y1 = y_range

    def sx(x: float) -> float:
        return pad_l + (x - x0) / (x1 - x0) * (width - pad_l - pad_r)

    def sy(y: float) -> float:
        y = min(max(y, y0), y1)
        return height - pad_b - (y - y0) / (y1 - y0) * (height - pad_t - pad_b)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="{_esc(title)}">',
        f'<text x="{pad_l}" y="15" font-size="12" font-weight="600">{_esc(title)}</text>',
    ]
    for frac in (0.0, 0.5, 1.0):
        y = y0 + frac * (y1 - y0)
        parts.append(f'<line x1="{pad_l}" x2="{width - pad_r}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#eaeef2"/>')
        parts.append(f'<text x="{pad_l - 4}" y="{sy(y) + 4:.1f}" font-size="10" text-anchor="end">{y:g}</text>')
    ticks = sorted({x for x, _ in pts})
    step = max(1, math.ceil(len(ticks) / 10))
    for x in ticks[::step]:
        parts.append(
            f'<text x="{sx(x):.1f}" y="{height - pad_b + 14}" font-size="10" text-anchor="middle">{x:g}</text>'
        )
    parts.append(
        f'<text x="{(width + pad_l) / 2:.0f}" y="{height - 2}" font-size="10" text-anchor="middle">epoch</text>'
    )
    if len(pts) > 1:
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{coords}"/>')
    for x, y in pts:
        parts.append(
            f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}">'
            f"<title>epoch {x:g}: {y:.3f}</title></circle>"
        )
    parts.append("</svg>")
    return "".join(parts)


def lines_plot_svg(
    epochs: Sequence[float],
    series: dict[str, tuple[Sequence[float | None], str]],
    title: str,
    width: int = 360,
    height: int = 180,
) -> str:
    """An inline SVG of several lines over epochs in ``[0, 1]``, with a legend (``series``: name -> values, colour).

    Example:
        >>> lines_plot_svg([0, 1], {"changed": ([0.0, 0.5], "#fb8f44")}, "states").count("<polyline")
        1
    """
    first = next(iter(series.values()), ([], "#0969da"))
    svg = line_plot_svg(
        list(zip(epochs, [math.nan if v is None else v for v in first[0]])),
        title,
        colour=first[1],
        width=width,
        height=height,
    )
    pad_l, pad_r, pad_t, pad_b = 40, 12, 24, 28
    xs = [float(x) for x in epochs] or [0.0]
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    extra, legend = [], []
    for i, (name, (values, colour)) in enumerate(series.items()):
        legend.append(
            f'<rect x="{pad_l + 80 * i}" y="{height - 12}" width="8" height="8" fill="{colour}"/>'
            f'<text x="{pad_l + 80 * i + 11}" y="{height - 4}" font-size="10">{_esc(name)}</text>'
        )
        if i == 0:
            continue
        pts = [
            (
                pad_l + (float(x) - x0) / (x1 - x0) * (width - pad_l - pad_r),
                height - pad_b - min(max(float(v), 0.0), 1.0) * (height - pad_t - pad_b),
            )
            for x, v in zip(epochs, values)
            if v is not None and not math.isnan(v)
        ]
        if len(pts) > 1:
            coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
            extra.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{coords}"/>')
    # The legend replaces the axis caption ("epoch") at the bottom; the x ticks are the epochs.
    svg = svg.replace('text-anchor="middle">epoch</text>', 'text-anchor="middle"></text>')
    return svg.replace("</svg>", "".join(extra + legend) + "</svg>")


def concept_bars_svg(
    epochs: Sequence[float], concepts: dict[str, list[int]], width: int = 360, height: int = 180
) -> str:
    """Stacked bars: per epoch, how many units each concept holds (:func:`~.queries.layer_charts`'s ``concepts``).

    Example:
        >>> concept_bars_svg([0, 1], {"dots": [2, 1], "stripes": [0, 1]}).count("<rect") >= 4
        True
    """
    palette = ["#0969da", "#2da44e", "#fb8f44", "#8250df", "#cf222e", "#1b7c83", "#bf8700", "#6e7781", "#d0d7de"]
    names = list(concepts)
    totals = [sum(concepts[c][i] for c in names) for i in range(len(epochs))]
    top_h, bottom = 24, height - 44
    scale = (bottom - top_h) / max(1, max(totals, default=1))
    bar = max(3.0, (width - 50) / max(1, len(epochs)) - 3)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        'aria-label="concept distribution">',
        '<text x="10" y="15" font-size="12" font-weight="600">concept distribution (units per concept)</text>',
    ]
    for i, ep in enumerate(epochs):
        x, y = 40 + i * (bar + 3), float(bottom)
        for j, c in enumerate(names):
            h = concepts[c][i] * scale
            colour = palette[j % len(palette)]
            parts.append(
                f'<rect x="{x:.1f}" y="{y - h:.1f}" width="{bar:.1f}" height="{h:.1f}" fill="{colour}">'
                f"<title>epoch {ep:g}: {_esc(c)} {concepts[c][i]}</title></rect>"
            )
            y -= h
    for j, c in enumerate(names[:6]):
        parts.append(
            f'<rect x="{10 + 58 * j}" y="{height - 28}" width="8" height="8" fill="{palette[j % len(palette)]}"/>'
            f'<text x="{21 + 58 * j}" y="{height - 20}" font-size="9">{_esc(c[:9])}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _img(path: Path | None) -> str:
    if path is None:
        return '<span class="none">no crops saved</span>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="top crops ({_esc(path.stem)})" src="data:image/png;base64,{data}">'


def _anchor(*parts: object) -> str:
    # id attribute values: layer names may hold dots and brackets, which are fine in ids but not in CSS selectors;
    # the report only ever targets them through links, never through selectors.
    return _esc("-".join(str(p) for p in parts))


def _combination(items: list[dict[str, Any]]) -> list[Alternative]:
    # A timeline entry's combination as format_combination reads it.
    return [Alternative(str(a["text"]), float(a["score"] or 0.0)) for a in items]


def _timeline_cells(entries: list[dict[str, Any]], max_epochs: int | None) -> str:
    """A unit's timeline cells from its :func:`~lightning_neurons.dashboard.queries.layer_timelines` entries."""
    shown = entries if max_epochs is None or len(entries) <= max_epochs else entries[-max_epochs:]
    cells = []
    if len(shown) < len(entries):
        cells.append(f'<div class="ep"><div class="e">{len(entries) - len(shown)} earlier epochs</div></div>')
    start = len(entries) - len(shown)
    for i, e in enumerate(shown, start):
        state = e["state"]
        moved = state in ("changed", "gained", "lost")
        concepts_only = e["concepts_changed"] and state != "changed"  # same meaning, another concept set
        cls = "ep changed" if moved else "ep concepts" if concepts_only else "ep"
        sim = f" · sim {_num(e['similarity'], 2)}" if e["similarity"] is not None else ""
        previous_text = e["previous_description"]
        tip = f"previously: {previous_text}" if previous_text is not None else "first round"
        tip = "new baseline: the settings changed, not compared" if e["baseline"] else tip
        if state in ("gained", "lost"):
            tip = f"{'gained a concept' if state == 'gained' else 'lost its concept'}; {tip}"
        hurt = e["ablation"]
        hurts = f'<div class="s">zeroing hurts {_esc(", ".join(a["class"] for a in hurt))}</div>' if hurt else ""
        overlap = f" · concept overlap {_num(e['concept_jaccard'], 2)}" if e["concept_jaccard"] is not None else ""
        if concepts_only:  # what the combination was, from the entry of the epoch it was compared with
            previous = entries[i - 1] if i > 0 and entries[i - 1]["epoch"] == e["previous_epoch"] else None
            was = format_combination(_combination(previous["combination"])) if previous is not None else ""
            hurts = f'<div class="c">concept set changed{" from " + _esc(was) if was else ""}</div>' + hurts
            tip = f"concept set changed, description kept its meaning; previously: {previous_text}"
        combo = e["combination"]  # the multi-concept explanation (units shown with a concept only)
        if combo or overlap:
            shown_combo = f"= {_esc(format_combination(_combination(combo)))}" if combo else NO_COMBINATION
            hurts = f'<div class="c">{shown_combo}{overlap}</div>' + hurts
        kind = f'<div class="s">{_esc(e["kind"])}</div>' if e["kind"] else ""
        significance = f" · q {_num(e['q_value'], 3)}" if e["q_value"] is not None else ""
        confidence = f" · conf {_num(e['confidence'], 2)}" if e["confidence"] is not None else ""
        cells.append(
            f'<div class="{cls}" data-state="{_esc(state)}" title="{_esc(tip)}"><div class="e">epoch {e["epoch"]}</div>'
            f'<div class="d">{_esc(e["shown"])}</div>{kind}'
            f'<div class="s">score {_num(e["score"], 2)}{significance}{confidence}{sim}</div>{hurts}</div>'
        )
    return "".join(cells)


def _description_index(layer: str, latest: dict[int, str], rows: set[int]) -> str:
    """Per latest shown description, its unit count and every unit (linked where the unit has a row)."""
    by_text: dict[str, list[int]] = {}
    for unit in sorted(latest):
        by_text.setdefault(latest[unit], []).append(unit)
    ranked = sorted(by_text.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    top = ", ".join(f"{_esc(text or '(none)')} ({len(units)})" for text, units in ranked[:TOP_DESCRIPTIONS])
    out = [f'<p class="meta">{len(by_text)} distinct descriptions; most units: {top}</p>']
    out.append(f"<details><summary>all {len(latest)} units by latest description (search with Ctrl+F)</summary>")
    out.append('<dl class="index">')
    for text, units in ranked:
        refs = ", ".join(f'<a href="#{_anchor("unit", layer, u)}">{u}</a>' if u in rows else str(u) for u in units)
        out.append(f"<dt>{_esc(text or '(none)')} · {len(units)}</dt><dd>{refs}</dd>")
    out.append("</dl></details>")
    return "\n".join(out)


_STATE_COLOURS = {"changed": "#fb8f44", "gained": "#2da44e", "lost": "#cf222e", "dead": "#24292f"}


def _layer_section(
    tables: HistoryTables,
    layer: str,
    charts: dict[str, Any],
    previews: Path | None,
    max_units: int | None,
    page_size: int = DEFAULT_PAGE_SIZE,
    max_epochs: int | None = DEFAULT_MAX_EPOCHS,
) -> str:
    # The charts are the Neurons tab's layer charts (dashboard.queries.layer_charts), drawn as inline SVG.
    epochs, fraction = charts["epochs"], charts["fraction"]
    states = {name: (fraction[name], colour) for name, colour in _STATE_COLOURS.items()}
    scores = [(e, math.nan if s is None else s) for e, s in zip(epochs, charts["mean_score"])]
    # Multi-concept layers: concept-set changes (meaning or combination) get their own plot, apart from meaning.
    concepts = [(e, math.nan if v is None else v) for e, v in zip(epochs, fraction["concepts_changed"])]
    concept_plot = (
        [f'<div class="plot">{line_plot_svg(concepts, "fraction of concept sets changed", colour="#8250df")}</div>']
        if any(charts["combinations"])
        else []
    )
    last = epochs[-1]
    out = [
        f'<section id="layer-{_esc(layer)}"><h2>{_esc(layer)}</h2>',
        f'<p class="meta">{charts["units"][-1]} units at epoch {last} · mean score {_num(charts["mean_score"][-1])} · '
        f"stable for the last {charts['stable_rounds']} comparisons: {charts['stable'][-1]}</p>",
        '<div class="plots">',
        f'<div class="plot">{lines_plot_svg(epochs, states, "fraction of units changed, gained, lost, dead")}</div>',
        *concept_plot,
        f'<div class="plot">{line_plot_svg(scores, "mean score", colour="#0969da")}</div>',
        f'<div class="plot">{concept_bars_svg(epochs, charts["concepts"])}</div>',
        "</div>",
    ]
    # The layer's grid at its latest epoch: every unit's shown text, for the index.
    latest = {row["unit"]: row["shown"] for row in layer_view(tables, layer, last, limit=None, crops=False)["units"]}
    all_units = sorted(latest)
    units = all_units
    if max_units is not None and len(units) > max_units:
        # Units with saved crops (the ones logged to TensorBoard) first: they are the ones the user chose to watch.
        with_crops = [u for u in units if previews is not None and latest_preview(previews, layer, u) is not None]
        units = sorted(dict.fromkeys([*with_crops, *units][:max_units]))
    timelines = layer_timelines(tables, layer, units, crops=False) if units else {}
    out.append(_description_index(layer, latest, set(units)))
    pages = [units[i : i + page_size] for i in range(0, len(units), page_size)] or [[]]
    if len(pages) > 1:
        links = " ".join(f'<a href="#{_anchor("page", layer, i + 1)}">{p[0]}–{p[-1]}</a>' for i, p in enumerate(pages))
        out.append(f'<p class="pager">units, {page_size} per page: {links}</p>')
    out.append('<div class="pages">')
    header = (
        '<table class="units"><tr><th>unit</th><th>latest crops</th><th>descriptions by epoch</th>'
        "<th>stable since</th></tr>"
    )
    for i, page in enumerate(pages):
        out.append(f'<div class="page" id="{_anchor("page", layer, i + 1)}">{header}')
        for unit in page:
            crop = latest_preview(previews, layer, unit) if previews is not None else None
            timeline = timelines[unit]
            stable = timeline["stable_since"]
            out.append(
                f'<tr><td>{unit}</td><td class="crops" id="{_anchor("unit", layer, unit)}">{_img(crop)}</td>'
                f'<td><div class="timeline">{_timeline_cells(timeline["epochs"], max_epochs)}</div></td>'
                f"<td>{'–' if stable is None else f'epoch {stable}'}</td></tr>"
            )
        out.append("</table></div>")
    out.append("</div>")
    hidden = len(all_units) - len(units)
    if hidden > 0:
        out.append(
            f'<p class="none">{hidden} more units are in the history file (not shown here: the report keeps at most '
            f"{max_units} units per layer; <code>lightning-neurons history RUN_DIR --csv units.csv</code> exports them "
            "all).</p>"
        )
    out.append("</section>")
    return "\n".join(out)


def layer_summaries(
    history: RunHistory, records: list[HistoryRecord] | None = None
) -> dict[str, list[LayerDriftSummary]]:
    """Per layer, its drift summary at every epoch it was explained at, in one pass over the history.

    Equal to grouping ``history.summary()`` by layer, but linear in the number of records (the report of a
    100-round, 100k-unit history would otherwise spend hours here).

    Args:
        history: The run history.
        records: ``history.records`` when the caller already has them (they are sorted on every access).

    Example:
        >>> layer_summaries(RunHistory())
        {}
    """
    timelines: dict[str, dict[int, list[UnitDrift]]] = {}
    epochs: dict[str, set[int]] = {}
    for r in history.records if records is None else records:  # epoch order
        layer, unit, epoch = r.key
        timelines.setdefault(layer, {}).setdefault(unit, []).append(r.drift)
        epochs.setdefault(layer, set()).add(epoch)
    return {
        layer: summarize_layer_epochs(layer, sorted(epochs[layer]), timelines[layer], history.stable_rounds)
        for layer in history.layers
    }


def _confidence_threshold(tables: HistoryTables, epochs: list[int]) -> float | None:
    # The latest round's confidence threshold (records made before kinds were shown by it), if any round has one.
    for ep in reversed(epochs):
        values = tables.table(ep, ["confidence_threshold"])
        if values.num_columns:
            found = [v for v in values.column(0).to_pylist() if v is not None]
            if found:
                return float(found[-1])
    return None


def render_report(
    history: RunHistory,
    previews_dir: str | Path | None = None,
    title: str = "Neuron explanations",
    max_units: int | None = DEFAULT_MAX_UNITS,
    page_size: int = DEFAULT_PAGE_SIZE,
    max_epochs: int | None = DEFAULT_MAX_EPOCHS,
) -> str:
    """The report's HTML text.

    Args:
        history: The run history.
        previews_dir: Folder written by ``save_previews`` (``None``: no crops).
        title: Page title.
        max_units: Units shown per layer (those with saved crops first; ``None``: all). Every unit's timeline is
            a row, so thousands of units would make a page of many megabytes that no browser scrolls well; the
            description index above the rows still lists every unit.
        page_size: Unit rows per page.
        max_epochs: Latest epochs shown in a unit's timeline (``None``: all).

    Example:
        >>> "<html" in render_report(RunHistory())
        True
    """
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    previews = Path(previews_dir) if previews_dir is not None and Path(previews_dir).is_dir() else None
    tables = HistoryTables.of(history)  # a round store's files, or the records of a history in memory
    epochs = tables.epochs()
    layers = tables.all_layers()
    charts = {layer: layer_charts(tables, layer, stable_rounds=history.stable_rounds) for layer in layers}
    meta = (
        f"{len(layers)} layers · {len(epochs)} explained epochs"
        + (f" ({epochs[0]}–{epochs[-1]})" if epochs else "")
        + " · meaning counts as changed when a unit has a concept in both rounds and the description similarity is"
        + f" &lt; {history.threshold:g}; gaining or losing a concept is counted apart"
    )
    if any(any(c["combinations"]) for c in charts.values()):
        meta += (
            f" · a multi-concept combination whose concept set overlaps the previous one less than "
            f"{COMBINATION_CHANGE_JACCARD:g} (Jaccard) is a concept-set change, outlined apart"
        )
    shown_at = _confidence_threshold(tables, epochs)
    if shown_at is not None:
        meta += (
            f" · units with confidence &le; {shown_at:g} (the confidence threshold; 0.5 = chance) are shown as "
            "<em>no clear concept</em>"
        )
    body = [
        _layer_section(tables, layer, charts[layer], previews, max_units, page_size, max_epochs)
        for layer in layers
        if charts[layer]["epochs"]
    ]
    if not body:
        body = ['<p class="none">The history is empty.</p>']
    nav = " · ".join(f'<a href="#layer-{_esc(x)}">{_esc(x)}</a>' for x in layers)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>\n'
        f'<body><h1>{_esc(title)}</h1><p class="meta">{meta}</p><p>{nav}</p>\n' + "\n".join(body) + "\n</body></html>\n"
    )


def write_report(
    run_dir_or_history: str | Path | RunHistory,
    output_path: str | Path,
    previews_dir: str | Path | None = None,
    title: str | None = None,
    max_units: int | None = DEFAULT_MAX_UNITS,
    page_size: int = DEFAULT_PAGE_SIZE,
    max_epochs: int | None = DEFAULT_MAX_EPOCHS,
) -> Path:
    """Write the self-contained HTML report of a run.

    Args:
        run_dir_or_history: A run's log directory (or its ``history.jsonl``), or a :class:`RunHistory`.
        output_path: The HTML file to write (parent folders are created).
        previews_dir: Folder of preview PNGs; default ``<folder of history.jsonl>/previews`` (for a
            ``RunHistory``: beside its attached file, if any).
        title: Page title (default: names the run).
        max_units: Units shown per layer (see :func:`render_report`).
        page_size: Unit rows per page.
        max_epochs: Latest epochs shown in a unit's timeline (``None``: all).

    Returns:
        ``output_path`` as a ``Path``.

    Raises:
        FileNotFoundError: If a run directory holds no history.

    Example:
        >>> write_report("lightning_logs/version_0", "report.html")  # doctest: +SKIP
    """
    if isinstance(run_dir_or_history, RunHistory):
        history = run_dir_or_history
        run_dir = history.path.parent if isinstance(history.path, Path) else None
    else:
        history_file = find_history_file(run_dir_or_history)
        history = load_history(history_file)
        run_dir = history_file.parent if isinstance(history_file, Path) else None
    if previews_dir is None and run_dir is not None:
        previews_dir = run_dir / PREVIEWS_DIRNAME
    if title is None:
        title = f"Neuron explanations: {run_dir.name}" if run_dir is not None else "Neuron explanations"
    output = Path(output_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render_report(history, previews_dir, title, max_units, page_size, max_epochs), encoding="utf-8")
    return output
