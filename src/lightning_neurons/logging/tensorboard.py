"""TensorBoard logging of explanation rounds: tables, texts, image grids, scalars and one custom-scalars layout.

Tags (``global_step`` = epoch everywhere; ``<prefix>`` defaults to ``neurons``):

- ``<prefix>/<layer>/table`` (text): Markdown table of the layer's units: unit, description, score,
  previous description, similarity to it (changed descriptions in bold; units whose description kept its meaning
  while their combination's concept set changed in italics, the previous combination after the previous
  description). Layers with more than ``table_rows``
  units (512 by default) list that many, the changed units first, then the best scored, and say how many more are
  in the history and the HTML report.
- ``<prefix>/<layer>/<unit>/description`` (text): description, score, alternatives, the classes its ablation hurts
  (with ``ablation=True``), and the change if any: of the description's meaning, or of the combination's concept
  set alone (then both combinations and the concept overlap; never a description "changed" into itself).
- Units with a multi-concept explanation show it after the description in the table and in the description
  text (``combination: stripes (0.62) + zebra (0.38)``; weights normalised to sum to 1).
- ``<prefix>/<layer>/<unit>/top_k`` (image): grid of the unit's preview crops (region outlined).
- ``<prefix>/<layer>/<unit>/score`` (scalar): the description's AUC.
- ``<prefix>/<layer>/<unit>/confidence`` (scalar): the description's confidence (0.5 = chance); units at or below
  the round's ``confidence_threshold`` are shown as "no clear concept" in the table and the description text.
- ``<prefix>/confidence_threshold`` (scalar) and ``<prefix>/<layer>/confident_fraction`` (scalar): the threshold
  and the share of the layer's units above it.
- ``<prefix>/<layer>/<unit>/drift`` (scalar): ``1 - similarity`` to the previous description (from the unit's
  second explained epoch on).
- ``<prefix>/<layer>/mean_score``, ``<prefix>/<layer>/fraction_changed``, ``<prefix>/<layer>/mean_similarity``,
  ``<prefix>/<layer>/fraction_concepts_changed`` (scalars; all but the first from the second explained epoch on;
  the last counts changes of meaning and of a combination's concept set, see :mod:`lightning_neurons.drift.metrics`).
- ``<prefix>/<layer>/stable_units``, ``<prefix>/<layer>/dead_units`` and, with ``evaluate=True``,
  ``evaluation/<method>/<metric>`` (scalars written by :meth:`NeuronTensorBoardLogger.write_round`, the
  :class:`~lightning_neurons.logging.base.RoundWriter` call; names in :mod:`lightning_neurons.logging.metrics`).

Per-unit tags are written for the ``log_units`` selection only, so that big layers do not flood the dashboard; the
table lists every unit up to ``table_rows``. TensorBoard's text plugin stores text tags with a ``/text_summary`` suffix.

Start TensorBoard with :data:`TENSORBOARD_SAMPLES_FLAG`, else it shows only 10 epochs of text and images. Do not use
``text=0,images=0``: TensorBoard 2.21's text and image plugins then return no samples at all (checked by
tests/test_browser.py).

Example:
    >>> from torch.utils.tensorboard import SummaryWriter  # doctest: +SKIP
    >>> tb = NeuronTensorBoardLogger(SummaryWriter("runs/x"), log_units=8)  # doctest: +SKIP
    >>> drift = history.add_round(rnd, backend.encode_descriptions)  # doctest: +SKIP
    >>> tb.log_round(rnd, drift, history.summary(rnd.epoch), epoch=rnd.epoch)  # doctest: +SKIP
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_neurons.drift.metrics import LayerDriftSummary, UnitDrift
from lightning_neurons.explanation.multi_concept import format_combination
from lightning_neurons.explanation.scoring import confident
from lightning_neurons.logging.base import RoundOutput
from lightning_neurons.logging.previews import encode_png, preview_grid
from lightning_neurons.logging.previews import save_previews as _save_previews
from lightning_neurons.logging.rows import concept_distribution, unit_row
from lightning_neurons.results import NO_CLEAR_CONCEPT, ExplanationRound, UnitExplanation

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from torch import Tensor
    from torch.utils.tensorboard import SummaryWriter

#: Which units get per-unit tags: ``None`` all, an int the first N units of each layer, a list of unit ids for
#: every layer, or a mapping layer -> unit ids (layers missing from it get none).
LogUnits = int | Sequence[int] | Mapping[str, Sequence[int]] | None

#: ``tensorboard --logdir ... --samples_per_plugin=...`` value that keeps every epoch's text and images.
TENSORBOARD_SAMPLES_FLAG = "--samples_per_plugin=text=100000,images=100000"

#: Default ``table_rows``: the most units listed in a layer's table per round (about 50 KB of text).
DEFAULT_TABLE_ROWS = 512

#: Shown texts listed in a layer's ``concepts`` text (its concept distribution), most frequent first.
DISTRIBUTION_ROWS = 10

_WRITER_METHODS = ("add_text", "add_image", "add_scalar", "add_custom_scalars", "flush")


def select_units(log_units: LogUnits, layer: str, units: Sequence[int]) -> list[int]:
    """The units of ``layer`` (among ``units``) that ``log_units`` selects for per-unit logging and previews.

    Args:
        log_units: ``None`` (all), a count (the first units), unit indices, or ``{layer: unit indices}``.
        layer: The layer's name.
        units: The layer's units.

    Example:
        >>> select_units(2, "fc", [5, 1, 3])
        [1, 3]
    """
    ordered = sorted(units)
    if log_units is None:
        return ordered
    if isinstance(log_units, int):
        return ordered[:log_units]
    wanted = set(log_units.get(layer, [])) if isinstance(log_units, Mapping) else set(log_units)
    return [u for u in ordered if u in wanted]


def _torch_file_writer(writer: Any) -> Any:
    """The event file writer of a ``torch.utils.tensorboard.SummaryWriter`` (``None`` for any other writer)."""
    try:
        from torch.utils.tensorboard import SummaryWriter as TorchSummaryWriter
    except ImportError:  # tensorboard not installed: the writer is tensorboardX's
        return None
    get = getattr(writer, "_get_file_writer", None)
    return get() if isinstance(writer, TorchSummaryWriter) and callable(get) else None


def find_tensorboard_writer(trainer: pl.Trainer) -> SummaryWriter | None:
    """The ``SummaryWriter`` of the trainer's first TensorBoard logger, or ``None`` when it has none.

    Call it on global rank 0 (other ranks get Lightning's dummy experiment).

    Example:
        >>> writer = find_tensorboard_writer(trainer)  # doctest: +SKIP
        >>> tb = NeuronTensorBoardLogger(writer) if writer is not None else None  # doctest: +SKIP
    """
    from lightning.fabric.loggers.tensorboard import TensorBoardLogger

    for logger in getattr(trainer, "loggers", []) or []:
        if isinstance(logger, TensorBoardLogger):
            writer = logger.experiment
            # Lightning falls back to tensorboardX's writer, which has the same methods.
            if all(callable(getattr(writer, m, None)) for m in _WRITER_METHODS):
                return writer
    return None


# Characters that Markdown gives a meaning to (links, images, emphasis, code, tables, headings).
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()!|])")


def escape_markdown(text: Any) -> str:
    r"""``text`` as literal Markdown: HTML escaped and Markdown syntax backslash-escaped, on one line.

    Descriptions come from vocabulary files and language models; unescaped, ``![x](http://...)`` or ``<img>``
    in one makes TensorBoard load a remote image when the text card is opened.

    Example:
        >>> print(escape_markdown("![x](http://e.example/t.png) <b>"))
        \!\[x\]\(http://e.example/t.png\) &lt;b&gt;
    """
    one_line = " ".join(str(text).split())
    return _MARKDOWN_SPECIAL.sub(r"\\\1", html.escape(one_line, quote=False))


def _cell(text: Any) -> str:
    # Markdown table cells: literal text, no pipes or line breaks.
    return escape_markdown(text)


def _fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None or x != x else f"{x:.{digits}f}"


def _conf(confidence: float | None) -> str:
    # Records without kinds: their confidence stands where the q-value would.
    return "–" if confidence is None else f"conf {confidence:.2f}"


def _move(row: Mapping[str, Any]) -> str:
    # The drift column: what the unit's move since its previous round counts as.
    for flag in ("changed", "gained", "lost", "baseline"):
        if row[flag]:
            return flag
    return "–"


def _table_units(
    units: Sequence[UnitExplanation], drift: Mapping[tuple[str, int], UnitDrift], rows: int
) -> list[UnitExplanation]:
    # The rows a capped table keeps: changed, gained and lost units first, then the best scored (NaN last).
    def rank(u: UnitExplanation) -> tuple[bool, float, int]:
        d = drift.get(u.key)
        moved = d is not None and (d.changed or d.gained or d.lost)
        score = u.score if u.score == u.score else float("-inf")
        return (not moved, -score, u.unit)

    return sorted(units, key=rank)[:rows]


class NeuronTensorBoardLogger:
    """Writes explanation rounds and their drift to a TensorBoard ``SummaryWriter``.

    Args:
        writer: A ``torch.utils.tensorboard.SummaryWriter`` (or tensorboardX's); e.g.
            ``trainer.logger.experiment`` of a ``TensorBoardLogger`` (see :func:`find_tensorboard_writer`).
        log_units: Units that get per-unit tags (description, top_k, score, drift): ``None`` for all, an int
            for the first N units of each layer, a list of unit ids, or a mapping layer -> unit ids.
        prefix: First component of every tag.
        preview_nrow: Crops per row of the ``top_k`` grid.
        evaluation_metrics: Quality metrics logged as ``evaluation/<method>/<metric>`` (``evaluate=True``); each
            gets a custom-scalars chart with the method and its baselines as lines of one plot.
        table_rows: Most units listed in a layer's table (``None``: all). A 4,096-unit table is about 400 KB a
            round; the history and the HTML report hold every unit.

    Example:
        >>> from torch.utils.tensorboard import SummaryWriter  # doctest: +SKIP
        >>> tb = NeuronTensorBoardLogger(SummaryWriter("runs/x"), log_units=[0, 3])  # doctest: +SKIP
        >>> tb.log_round(rnd, drift, summaries, epoch=2)  # doctest: +SKIP
    """

    def __init__(
        self,
        writer: SummaryWriter,
        log_units: LogUnits = None,
        prefix: str = "neurons",
        preview_nrow: int = 8,
        evaluation_metrics: Sequence[str] = (),
        table_rows: int | None = DEFAULT_TABLE_ROWS,
    ) -> None:
        if table_rows is not None and (isinstance(table_rows, bool) or table_rows < 1):
            raise ValueError(f"table_rows must be None or an int >= 1, got {table_rows!r}")
        if isinstance(log_units, bool) or (isinstance(log_units, int) and log_units < 0):
            raise ValueError(f"log_units must be None, an int >= 0, unit ids or a layer mapping; got {log_units!r}")
        if not prefix or "/" in prefix.strip("/"):
            raise ValueError(f"prefix must be one non-empty tag component, got {prefix!r}")
        self.writer = writer
        self.log_units = log_units
        self.prefix = prefix.strip("/")
        self.preview_nrow = preview_nrow
        self.evaluation_metrics = list(evaluation_metrics)
        self.table_rows = table_rows
        self._layout_written = False

    # ------------------------------------------------------------------ selection
    def selected_units(self, layer: str, units: Sequence[int]) -> list[int]:
        """The units of ``layer`` (among ``units``) that get per-unit tags.

        Example:
            >>> NeuronTensorBoardLogger(writer=None, log_units=2).selected_units("fc", [5, 1, 3])
            [1, 3]
        """
        return select_units(self.log_units, layer, units)

    # ------------------------------------------------------------------ logging
    def write_round(self, output: RoundOutput) -> None:
        """Log one round at ``global_step = output.step`` under ``output.prefix`` (the :class:`RoundWriter` call).

        Writes what :meth:`log_round` writes, plus the ``stable_units`` and ``dead_units`` scalars of each layer
        and, with ``evaluate=True``, the ``evaluation/<method>/<metric>`` scalars.

        Example:
            >>> tb.write_round(RoundOutput(rnd, drift, summaries, step=2, epoch=2))  # doctest: +SKIP
        """
        from lightning_neurons.evaluation.harness import log_evaluation
        from lightning_neurons.logging.metrics import metric_name, round_metrics

        if output.prefix.strip("/") != self.prefix:
            if not output.prefix or "/" in output.prefix.strip("/"):
                raise ValueError(f"prefix must be one non-empty tag component, got {output.prefix!r}")
            self.prefix = output.prefix.strip("/")
        self.log_round(output.round, output.drift, output.summaries, epoch=output.step)
        metrics = round_metrics(output, first_round_changed=None)
        for layer in output.round.layers:
            for name in ("stable_units", "dead_units"):
                tag = metric_name(self.prefix, layer, name)
                self._scalar(tag, metrics.get(tag), output.step)
        if output.evaluation:
            log_evaluation(self.writer, dict(output.evaluation), output.step)
        self.writer.flush()

    def close(self) -> None:
        """Flush the writer (the ``SummaryWriter`` belongs to the Lightning logger, which closes it)."""
        self.writer.flush()

    def log_round(
        self,
        round: ExplanationRound,
        drift: Sequence[UnitDrift],
        summaries: Sequence[LayerDriftSummary],
        epoch: int | None = None,
    ) -> None:
        """Log one explanation round at ``global_step = epoch`` and flush.

        Args:
            round: The round (its ``previews`` feed the ``top_k`` grids).
            drift: The round's drift, as returned by ``RunHistory.add_round``.
            summaries: The round's per-layer summaries, ``RunHistory.summary(epoch)``.
            epoch: The step (default ``round.epoch``).

        Raises:
            ValueError: If no epoch is known.
        """
        step = round.epoch if epoch is None else epoch
        if step is None:
            raise ValueError("the round has no epoch; pass epoch= to log_round")
        step = int(step)
        if not self._layout_written:
            self.write_layout(round.layers)
        by_key = {(d.layer, d.unit): d for d in drift}
        by_layer = {s.layer: s for s in summaries}
        threshold = round.meta.get("confidence_threshold")
        if threshold is not None:
            self._scalar(f"{self.prefix}/confidence_threshold", threshold, step)
        for layer in round.layers:
            units = round.layer(layer)
            summary = by_layer.get(layer)
            table = self.table(units, by_key, summary, rows=self.table_rows, threshold=threshold)
            self.writer.add_text(self._tag(layer, "table"), table, step)
            rated = [u for u in units if u.confidence is not None and u.description]
            if threshold is not None and rated:
                share = sum(confident(u.confidence, threshold) for u in rated) / len(rated)
                self._scalar(self._tag(layer, "confident_fraction"), share, step)
            if summary is not None:
                self._scalar(self._tag(layer, "mean_score"), summary.mean_score, step)
                if summary.n_compared:
                    self._scalar(self._tag(layer, "fraction_changed"), summary.fraction_changed, step)
                    self._scalar(self._tag(layer, "mean_similarity"), summary.mean_similarity, step)
                    self._scalar(self._tag(layer, "fraction_concepts_changed"), summary.fraction_concepts_changed, step)
                    self._scalar(self._tag(layer, "fraction_gained"), summary.fraction_gained, step)
                    self._scalar(self._tag(layer, "fraction_lost"), summary.fraction_lost, step)
            self.write_distribution(layer, units, step, threshold)
            selected = set(self.selected_units(layer, [u.unit for u in units]))
            for u in units:
                if u.unit in selected:
                    self._log_unit(round, u, by_key.get(u.key), step, threshold)
        self.writer.flush()

    def _log_unit(
        self, round: ExplanationRound, u: UnitExplanation, d: UnitDrift | None, step: int, threshold: float | None
    ) -> None:
        self.writer.add_text(self._tag(u.layer, u.unit, "description"), self.unit_text(u, d, threshold), step)
        self._scalar(self._tag(u.layer, u.unit, "score"), u.score, step)
        self._scalar(self._tag(u.layer, u.unit, "confidence"), u.confidence, step)
        self._scalar(self._tag(u.layer, u.unit, "q_value"), u.q_value, step)
        if d is not None and d.drift is not None:
            self._scalar(self._tag(u.layer, u.unit, "drift"), d.drift, step)
        previews = round.previews.get(u.key)
        if previews is not None and previews.numel() > 0:
            self._image(self._tag(u.layer, u.unit, "top_k"), preview_grid(previews, nrow=self.preview_nrow), step)

    def _image(self, tag: str, grid: Tensor, step: int) -> None:
        """Log a ``uint8`` ``[3, H, W]`` grid, PNG-encoded as the preview files are.

        ``SummaryWriter.add_image`` converts the grid to float and back and encodes it at zlib's default level: 17 ms
        a grid, four times what the same pixels cost with :func:`encode_png`. PyTorch's writer takes the encoded
        image as a summary; other writers (tensorboardX, whose protobuf classes are its own) get ``add_image``.
        """
        file_writer = _torch_file_writer(self.writer)
        if file_writer is None:
            self.writer.add_image(tag, grid, step, dataformats="CHW")
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        height, width = int(grid.shape[1]), int(grid.shape[2])
        image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=encode_png(grid))
        file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def _scalar(self, tag: str, value: float | None, step: int) -> None:
        if value is not None and value == value:
            self.writer.add_scalar(tag, float(value), step)

    def _tag(self, layer: str, *parts: object) -> str:
        return "/".join([self.prefix, layer, *map(str, parts)])

    @staticmethod
    def table(
        units: Sequence[UnitExplanation],
        drift: Mapping[tuple[str, int], UnitDrift],
        summary: LayerDriftSummary | None = None,
        rows: int | None = None,
        threshold: float | None = None,
    ) -> str:
        """The Markdown table of one layer (a one-line summary above it when ``summary`` is given).

        One line per unit, from :func:`~lightning_neurons.logging.rows.unit_row` (the row every sink shows): the
        shown text (the description, "low-level: ...", "no clear concept" or "dead unit"), the kind, the score and
        the significance (q-value) in columns of their own, so a reader sees why a unit reads as it does, the move
        since the previous round (``changed`` / ``gained`` / ``lost`` / ``baseline``), the text shown then and the
        similarity. Records without kinds show "no clear concept" at or below the confidence ``threshold``.

        With more than ``rows`` units, the table lists ``rows`` of them, the changed, gained and lost ones first,
        then by score (best first), and a last line says how many more the history and the report hold.

        A changed description is in bold. A unit whose description kept its meaning while its combination's concept
        set changed (:attr:`~lightning_neurons.drift.metrics.UnitDrift.concepts_only_changed`) is in italics, and
        its previous combination follows its previous description.

        Example:
            >>> u = UnitExplanation("fc", 0, epoch=0, description="dots", score=0.8, kind="concept", q_value=0.01)
            >>> print(NeuronTensorBoardLogger.table([u], {}))
            | unit | description | kind | score | q | drift | previous description | similarity |
            |---:|---|---|---:|---:|---|---|---:|
            | 0 | dots | concept | 0.800 | 0.01 | – | – | – |
        """
        lines = []
        if summary is not None:
            head = f"epoch {summary.epoch} · {summary.n_units} units · mean score {_fmt(summary.mean_score)}"
            if summary.n_compared:
                head += f" · {summary.n_changed}/{summary.n_compared} changed"
                if summary.n_gained or summary.n_lost:
                    head += f" · {summary.n_gained} gained a concept · {summary.n_lost} lost one"
                if summary.n_concepts_changed > summary.n_changed or any(u.combination for u in units):
                    head += f" · {summary.n_concepts_changed}/{summary.n_compared} concept sets changed"
                head += (
                    f" · mean similarity {_fmt(summary.mean_similarity)}"
                    f" · stable for {summary.stable_rounds} rounds: {summary.n_stable}"
                )
            if summary.n_baseline:
                head += f" · {summary.n_baseline} units start a new baseline (settings changed; not compared)"
            if summary.n_dead:
                head += f" · {summary.n_dead} dead"
            dist = concept_distribution(units, threshold)
            if dist.top_concept is not None:
                head += (
                    f" · most frequent concept {escape_markdown(dist.top_concept)} "
                    f"({dist.top_concept_share:.0%} of {dist.n_concept} concept units)"
                )
            if threshold is not None:
                head += f" · confidence threshold {_fmt(threshold)}"
            lines += [head, ""]
        lines += [
            "| unit | description | kind | score | q | drift | previous description | similarity |",
            "|---:|---|---|---:|---:|---|---|---:|",
        ]
        shown = list(units) if rows is None or len(units) <= rows else _table_units(units, drift, rows)
        for u in shown:
            d = drift.get(u.key)
            row = unit_row(u, d, confidence_threshold=threshold)
            desc = _cell(row["description"])
            if row["combination"]:
                desc += " · " + _cell(row["combination"])
            if row["changed"]:
                desc = f"**{desc}**"
            prev = _cell(row["previous_description"]) if row["previous_description"] is not None else "–"
            if d is not None and d.concepts_only_changed:  # the combination is what changed: show both
                desc = f"*{desc}*"
                prev += " · " + _cell(format_combination(d.previous_combination))
            kind = _cell(row["kind"]) if row["kind"] else "–"
            q = _fmt(row["q_value"], 2) if row["q_value"] is not None else _conf(row["confidence"])
            sim = _fmt(row["similarity"])
            lines.append(f"| {u.unit} | {desc} | {kind} | {_fmt(row['score'])} | {q} | {_move(row)} | {prev} | {sim} |")
        if len(shown) < len(units):
            lines += [
                "",
                f"{len(units) - len(shown)} more units of this layer (of {len(units)}; changed units first, then by "
                "score) are in the history (history.jsonl) and the HTML report (report.html).",
            ]
        return "\n".join(lines)

    @staticmethod
    def unit_text(u: UnitExplanation, d: UnitDrift | None = None, threshold: float | None = None) -> str:
        """The Markdown description text of one unit (its :func:`~lightning_neurons.logging.rows.unit_row`).

        Example:
            >>> print(NeuronTensorBoardLogger.unit_text(UnitExplanation("fc", 0, 1, "dots", 0.8, kind="concept")))
            **dots** (concept, score 0.800)
            >>> unclear = UnitExplanation("fc", 0, 1, "dots", 0.8, confidence=0.6)
            >>> print(NeuronTensorBoardLogger.unit_text(unclear, None, 0.85))
            **no clear concept** (score 0.800, confidence 0.600 <= threshold 0.850)
        """
        esc = escape_markdown  # every text from a vocabulary file or a language model is shown literally
        row = unit_row(u, d, confidence_threshold=threshold)
        facts = [esc(row["kind"])] if row["kind"] else []
        facts.append(f"score {_fmt(row['score'])}")
        if row["q_value"] is not None:
            facts.append(f"q {_fmt(row['q_value'], 3)}")
        if row["concept_gain"] is not None:
            facts.append(f"gain beyond image statistics {_fmt(row['concept_gain'])}")
        if row["confidence"] is not None:
            below = u.kind is None and row["description"] == NO_CLEAR_CONCEPT and threshold is not None
            facts.append(
                f"confidence {_fmt(row['confidence'])}" + (f" <= threshold {_fmt(threshold)}" if below else "")
            )
        text = f"**{esc(row['description'])}** ({', '.join(facts)})"
        if row["combination"]:  # the multi-concept explanation, weights normalised to sum to 1
            text += "\n\ncombination: " + esc(row["combination"])
        if row["alternatives"]:
            text += "\n\nalternatives: " + ", ".join(f"{esc(a.text)} ({_fmt(a.score)})" for a in u.alternatives)
        if u.ablation:
            text += "\n\nzeroing it hurts: " + ", ".join(f"{esc(c)} (-{_fmt(drop)})" for c, drop in u.ablation)
        prev = esc(row["previous_description"])
        if d is not None and d.baseline:
            text += "\n\nnew baseline: the settings changed since its previous round, so it is not compared"
        elif d is not None and d.concepts_only_changed:  # same meaning, another concept set: the combinations differ
            text += (
                f"\n\nconcepts changed from *{prev}* · "
                f"{esc(format_combination(d.previous_combination))} at epoch {d.previous_epoch} "
                f"(concept overlap {_fmt(d.concept_jaccard, 2)}, similarity {_fmt(d.similarity)}, "
                f"top-k Jaccard {_fmt(d.jaccard)})"
            )
        elif d is not None and d.compared:
            verb = (
                "changed from"
                if row["changed"]
                else "gained a concept; was"
                if row["gained"]
                else "lost its concept; was"
                if row["lost"]
                else "previously"
            )
            text += (
                f"\n\n{verb} *{prev}* at epoch {d.previous_epoch} "
                f"(similarity {_fmt(d.similarity)}, top-k Jaccard {_fmt(d.jaccard)})"
            )
        return text

    def write_distribution(
        self, layer: str, units: Sequence[UnitExplanation], step: int, threshold: float | None
    ) -> None:
        """Log the layer's concept distribution (:func:`~lightning_neurons.logging.rows.concept_distribution`).

        ``<prefix>/<layer>/concepts`` (text): the most frequent shown texts with their unit counts;
        ``<prefix>/<layer>/top_concept_share`` (scalar): the most frequent concept's share of the concept units.
        """
        dist = concept_distribution(units, threshold)
        lines = [
            f"{dist.n_concept} of {dist.n_units} units shown with a concept; most frequent concept: "
            + (f"{escape_markdown(dist.top_concept)} ({dist.top_concept_share:.0%})" if dist.top_concept else "none"),
            "",
            "| description | units | share |",
            "|---|---:|---:|",
        ]
        lines += [
            f"| {_cell(r['description'])} | {r['units']} | {r['share']:.0%} |" for r in dist.table(DISTRIBUTION_ROWS)
        ]
        self.writer.add_text(self._tag(layer, "concepts"), "\n".join(lines), step)
        self._scalar(self._tag(layer, "top_concept_share"), dist.top_concept_share, step)

    def write_layout(self, layers: Sequence[str]) -> None:
        """Write the custom-scalars layout (once per logger; :meth:`log_round` calls it at the first round).

        Layer-agnostic regex charts cover layers that appear only later; per-layer categories are added for
        ``layers``.
        """
        p = re.escape(self.prefix)
        layout: dict[str, dict[str, list[Any]]] = {
            f"{self.prefix}: overview": {
                "mean score per layer": ["Multiline", [rf"^{p}/[^/]+/mean_score$"]],
                "fraction changed per layer": ["Multiline", [rf"^{p}/[^/]+/fraction_changed$"]],
                "fraction of concept sets changed per layer": [
                    "Multiline",
                    [rf"^{p}/[^/]+/fraction_concepts_changed$"],
                ],
                "mean similarity per layer": ["Multiline", [rf"^{p}/[^/]+/mean_similarity$"]],
            }
        }
        for layer in layers:
            lp = f"{p}/{re.escape(layer)}"
            layout[f"{self.prefix}: {layer}"] = {
                "layer": [
                    "Multiline",
                    [rf"^{lp}/(mean_score|fraction_changed|fraction_concepts_changed|mean_similarity)$"],
                ],
                "unit scores": ["Multiline", [rf"^{lp}/\d+/score$"]],
                "unit drift": ["Multiline", [rf"^{lp}/\d+/drift$"]],
            }
        if self.evaluation_metrics:
            charts = {m: ["Multiline", [rf"^evaluation/[^/]+/{re.escape(m)}$"]] for m in self.evaluation_metrics}
            layout["evaluation: explanations vs baselines"] = charts
        self.writer.add_custom_scalars(layout)
        self._layout_written = True

    @staticmethod
    def save_previews(round: ExplanationRound, directory: str | Path, epoch: int | None = None) -> list[Path]:
        """Write PNG grids per unit (``<directory>/<layer>/<unit>/epoch_<epoch>.png``) for the HTML report.

        See :func:`lightning_neurons.logging.previews.save_previews`.
        """
        return _save_previews(round, directory, epoch=epoch)


save_previews = _save_previews
