"""Per-unit rows of a round: the one table every logger family shows, in its own form.

W&B logs the rows as a ``wandb.Table``, MLflow as CSV/JSON artifacts, any other logger as CSV files in the run's
folder; TensorBoard keeps its Markdown table. One function builds them so the columns agree everywhere.

Example:
    >>> from lightning_neurons.results import ExplanationRound, UnitExplanation
    >>> rnd = ExplanationRound(0, [UnitExplanation("fc", 0, 0, "dots", 0.8, activations=[1.5])])
    >>> out = RoundOutput(rnd, drift=[], summaries=[], step=0, epoch=0)
    >>> layer_rows(out, "fc")[0]["description"], is_dead(rnd.units[0])
    ('dots', False)
"""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

import torch

from lightning_neurons.explanation.multi_concept import format_combination
from lightning_neurons.logging.base import RoundOutput
from lightning_neurons.results import UnitExplanation

#: Columns of :func:`layer_rows`, in order.
ROW_COLUMNS = (
    "epoch",
    "unit",
    "description",
    "score",
    "previous_description",
    "similarity",
    "drift",
    "changed",
    "jaccard",
    "alternatives",
    "combination",
    "concept_jaccard",
    "concepts_changed",
)


def _num(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def is_dead(u: UnitExplanation) -> bool:
    """Whether a unit is dead on the probe: no description, or no positive activation among its top samples.

    A ReLU unit whose largest probe activation is ``<= 0`` never fires; a unit without top samples got no
    description (empty text, NaN score).

    Example:
        >>> is_dead(UnitExplanation("fc", 0, 0, "", float("nan")))
        True
        >>> is_dead(UnitExplanation("fc", 1, 0, "dots", 0.5, activations=[0.0, 0.0]))
        True
    """
    if not u.description or not u.activations:
        return True
    return max(u.activations) <= 0.0


def layer_rows(output: RoundOutput, layer: str) -> list[dict[str, Any]]:
    """One row per unit of ``layer`` in ``output``: description, score and its drift against the previous round.

    ``combination`` is the unit's multi-concept explanation as text (``"stripes (0.62) + zebra (0.38)"``) and
    ``concept_jaccard`` the Jaccard index of its concept set and the previous round's (multi-concept units only).
    ``changed`` is the description's change of meaning; ``concepts_changed`` is that or a change of the concept set
    (:class:`~lightning_neurons.drift.metrics.UnitDrift`).

    Missing values are ``None`` (JSON ``null``, an empty CSV cell), never NaN.
    """
    by_key = {(d.layer, d.unit): d for d in output.drift}
    rows = []
    for u in output.round.layer(layer):
        d = by_key.get(u.key)
        rows.append(
            {
                "epoch": output.epoch,
                "unit": u.unit,
                "description": u.description,
                "score": _num(u.score),
                "previous_description": d.previous_description if d is not None else None,
                "similarity": _num(d.similarity) if d is not None else None,
                "drift": _num(d.drift) if d is not None else None,
                "changed": bool(d.changed) if d is not None else False,
                "jaccard": _num(d.jaccard) if d is not None else None,
                "alternatives": "; ".join(a.text for a in u.alternatives),
                # "stripes (0.62) + zebra (0.38)": the multi-concept explanation, weights summing to 1 (None without)
                "combination": format_combination(u.combination) if u.combination else None,
                "concept_jaccard": _num(d.concept_jaccard) if d is not None else None,
                "concepts_changed": d.concepts_changed if d is not None else False,
            }
        )
    return rows


def rows_csv(rows: list[dict[str, Any]]) -> str:
    """The rows as CSV text with a header (columns :data:`ROW_COLUMNS`)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(ROW_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def rows_json(rows: list[dict[str, Any]]) -> str:
    """The rows as strict JSON (``{"columns": [...], "data": [[...], ...]}``, the layout of a W&B table file)."""
    data = [[row[c] for c in ROW_COLUMNS] for row in rows]
    return json.dumps({"columns": list(ROW_COLUMNS), "data": data}, indent=1, allow_nan=False)


def round_label(output: RoundOutput) -> str:
    """File-name label of a round: ``epoch_<epoch>``, or ``step_<step>`` when rounds are filed by global step.

    Under step-based validation several rounds share an epoch; their files must not overwrite each other.

    Example:
        >>> from lightning_neurons.results import ExplanationRound
        >>> round_label(RoundOutput(ExplanationRound(0), [], [], step=1200, epoch=3))
        'step_1200'
    """
    return f"epoch_{output.epoch}" if output.step == output.epoch else f"step_{output.step}"


def top_crop(output: RoundOutput, layer: str, unit: int) -> torch.Tensor | None:
    """The unit's best region crop (``uint8 [3, h, w]``) from the round's previews, or ``None`` without one."""
    previews = output.round.previews.get((layer, unit))
    if previews is None or previews.numel() == 0:
        return None
    return previews[0]


def hwc(image: torch.Tensor) -> Any:
    """A ``uint8 [3, h, w]`` tensor as the ``[h, w, 3]`` numpy array that W&B and MLflow take."""
    return image.detach().cpu().permute(1, 2, 0).contiguous().numpy()


__all__ = ["ROW_COLUMNS", "hwc", "is_dead", "layer_rows", "round_label", "rows_csv", "rows_json", "top_crop"]
