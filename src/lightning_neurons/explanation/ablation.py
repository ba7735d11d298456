"""Optional ablation check (the paper's): zero a unit and see which classes lose accuracy.

The hurt of a class is measured either as the drop of its top-1 accuracy (``measure="accuracy"``, the default
here and what the explanation pipeline reports) or as the drop of the mean softmax probability of the true
class over its samples (``measure="probability"``). The accuracy drop moves in steps of ``1 / n_c`` (one flipped
image on a small probe) and is zero for every class whose predictions survive the ablation, so it is coarse and
noisy on small probes; the probability drop is continuous and says which classes the unit *supports* even where
no prediction flips.

Several units are ablated in one forward pass: the batch is repeated once per unit and a forward hook zeroes
unit ``u_i`` in the ``i``-th copy only, so the cost is one large batch instead of a Python loop of forwards.
The hook is a :class:`~lightning_neurons.recording.hooks.LayerTaps` tap: the zeroed tensor is put back into the
layer's output structure (a tuple/dict output keeps its other parts).

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(2, 2))
    >>> with torch.no_grad():
    ...     _ = model[0].weight.copy_(torch.eye(2)); _ = model[0].bias.copy_(torch.tensor([0.0, 0.5]))
    >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0]]); y = torch.tensor([0, 1])
    >>> ablate_units(model, model[0], "linear", [0], x, y, class_names=["cat", "dog"])[0]
    [('cat', 1.0)]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_neurons.recording.hooks import ForwardFn, LayerTaps, prepare_inputs, run_model
from lightning_neurons.recording.types import UnitKind
from lightning_neurons.recording.units import OutputSelector

#: How the hurt of a class is measured: top-1 accuracy drop or drop of the mean true-class probability.
HurtMeasure = Literal["accuracy", "probability"]


def _logits(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict):
        return output.get("logits", next(iter(output.values())))
    if hasattr(output, "logits"):
        return output.logits
    return output[0]


def _zero_units(kind: UnitKind, units: Tensor, copies: int) -> Any:
    """A tap that zeroes unit ``units[i]`` in the ``i``-th of ``copies`` stacked copies of the batch."""

    def zero(_name: str, out: Tensor) -> Tensor:
        rows = out.shape[0] // copies
        view = out.reshape(copies, rows, *out.shape[1:])
        mask = torch.ones(copies, view.shape[-1] if kind == "token" else view.shape[2], device=out.device)
        mask[torch.arange(copies, device=out.device), units.to(out.device)] = 0
        if kind == "token":
            scaled = view * mask[:, None, None, :].to(view.dtype)
        else:
            shape = (copies, 1, mask.shape[1]) + (1,) * (view.dim() - 3)
            scaled = view * mask.reshape(shape).to(view.dtype)
        return scaled.reshape(out.shape)

    return zero


def _class_scores(logits: Tensor, labels: Tensor, num_classes: int, measure: HurtMeasure) -> Tensor:
    """Per class, the sum over its samples of "correct" (0/1) or of the softmax probability of the true class."""
    if measure == "probability":
        score = torch.softmax(logits, dim=-1).gather(-1, labels[:, None]).squeeze(-1)
    else:
        score = (logits.argmax(dim=-1) == labels).float()
    return torch.zeros(num_classes).index_add_(0, labels, score)


@torch.no_grad()
def ablate_units(
    model: nn.Module,
    layer: nn.Module,
    kind: UnitKind,
    units: Sequence[int],
    inputs: Tensor,
    labels: Tensor,
    *,
    class_names: Sequence[str] | None = None,
    top: int = 3,
    batch_size: int = 64,
    units_per_pass: int = 8,
    output_selector: OutputSelector | None = None,
    layer_name: str = "?",
    measure: HurtMeasure = "accuracy",
    forward_fn: ForwardFn | None = None,
) -> dict[int, list[tuple[str, float]]]:
    """Per unit, the classes whose accuracy (or true-class probability) drops most when the unit is zeroed.

    Args:
        model: The network (its training mode is left as it is; call ``eval()`` first).
        layer: The module whose output holds the units.
        kind: ``"conv"``, ``"token"`` or ``"linear"`` (which axis is the unit axis).
        units: Units to ablate.
        inputs: Probe inputs ``[N, ...]`` (moved batch by batch to the model's device).
        labels: ``[N]`` class indices.
        class_names: Names of the classes (default: the indices as strings).
        top: Classes to report per unit.
        batch_size: Probe samples per pass.
        units_per_pass: Units ablated together in one pass (the batch is repeated that many times).
        output_selector: Which part of the layer output holds the units.
        layer_name: For error messages.
        measure: ``"accuracy"``: per-class drop of top-1 accuracy; ``"probability"``: per-class drop of the mean
            softmax probability of the true class (continuous, far less noisy on small probes).
        forward_fn: How to run the model on a batch, ``forward_fn(model, inputs)`` (``None``: ``model(inputs)``);
            its output (or its ``logits``) are the class scores.

    Returns:
        ``{unit: [(class, drop), ...]}``, largest drop first, only positive drops.

    Raises:
        ValueError: If ``measure`` is unknown.
    """
    if measure not in ("accuracy", "probability"):
        raise ValueError(f"measure must be 'accuracy' or 'probability', got {measure!r}")
    taps = LayerTaps(model, {layer_name: layer}, output_selector, kinds={layer_name: kind})
    labels = labels.long().cpu()
    num_classes = int(labels.max()) + 1 if labels.numel() else 0
    base_score = torch.zeros(num_classes)
    counts = torch.bincount(labels, minlength=num_classes).float()
    unit_list = [int(u) for u in units]
    drops: dict[int, Tensor] = {u: torch.zeros(num_classes) for u in unit_list}
    for start in range(0, inputs.shape[0], batch_size):
        x = prepare_inputs(model, inputs[start : start + batch_size])
        y = labels[start : start + batch_size]
        base_score += _class_scores(_logits(run_model(model, x, forward_fn)).float().cpu(), y, num_classes, measure)
        for g in range(0, len(unit_list), units_per_pass):
            group = unit_list[g : g + units_per_pass]
            reps = len(group)
            zero = _zero_units(kind, torch.tensor(group), reps)
            with taps.hooks(zero, eval_mode=False, forward_fn=forward_fn) as run:
                out = _logits(run(x.repeat(reps, *([1] * (x.dim() - 1)))))
            out = out.float().cpu().reshape(reps, -1, out.shape[-1])
            for i, u in enumerate(group):
                drops[u] += _class_scores(out[i], y, num_classes, measure)
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    result: dict[int, list[tuple[str, float]]] = {}
    for u in unit_list:
        drop = (base_score - drops[u]) / counts.clamp_min(1)
        order = torch.argsort(drop, descending=True)[:top]
        result[u] = [(names[int(c)], round(float(drop[c]), 4)) for c in order if drop[c] > 0]
    return result


__all__ = ["HurtMeasure", "ablate_units"]
