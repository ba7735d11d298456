"""Optional ablation check (the paper's): zero a unit and see which classes lose accuracy.

Several units are ablated in one forward pass: the batch is repeated once per unit and a forward hook zeroes
unit ``u_i`` in the ``i``-th copy only, so the cost is one large batch instead of a Python loop of forwards.

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
from typing import Any

import torch
from torch import Tensor, nn

from lightning_neurons.recording.types import UnitKind
from lightning_neurons.recording.units import OutputSelector, select_output


def _logits(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict):
        return output.get("logits", next(iter(output.values())))
    if hasattr(output, "logits"):
        return output.logits
    return output[0]


def _zero_hook(kind: UnitKind, units: Tensor, copies: int, selector: OutputSelector | None, layer: str) -> Any:
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        out = select_output(output, selector, layer)
        rows = out.shape[0] // copies
        view = out.reshape(copies, rows, *out.shape[1:])
        mask = torch.ones(copies, view.shape[-1] if kind == "token" else view.shape[2], device=out.device)
        mask[torch.arange(copies, device=out.device), units.to(out.device)] = 0
        if kind == "token":
            scaled = view * mask[:, None, None, :].to(view.dtype)
        else:
            shape = (copies, 1, mask.shape[1]) + (1,) * (view.dim() - 3)
            scaled = view * mask.reshape(shape).to(view.dtype)
        out.copy_(scaled.reshape(out.shape))
        return output

    return hook


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
) -> dict[int, list[tuple[str, float]]]:
    """Per unit, the classes whose accuracy on the probe samples drops most when the unit is zeroed.

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

    Returns:
        ``{unit: [(class, accuracy drop), ...]}``, largest drop first, only positive drops.
    """
    device = next((p.device for p in model.parameters()), inputs.device)
    labels = labels.long().cpu()
    num_classes = int(labels.max()) + 1 if labels.numel() else 0
    base_correct = torch.zeros(num_classes)
    counts = torch.bincount(labels, minlength=num_classes).float()
    unit_list = [int(u) for u in units]
    drops: dict[int, Tensor] = {u: torch.zeros(num_classes) for u in unit_list}
    for start in range(0, inputs.shape[0], batch_size):
        x = inputs[start : start + batch_size].to(device)
        y = labels[start : start + batch_size]
        pred = _logits(model(x)).argmax(dim=-1).cpu()
        base_correct += torch.bincount(y[pred == y], minlength=num_classes).float()
        for g in range(0, len(unit_list), units_per_pass):
            group = unit_list[g : g + units_per_pass]
            reps = len(group)
            handle = layer.register_forward_hook(
                _zero_hook(kind, torch.tensor(group), reps, output_selector, layer_name)
            )
            try:
                out = _logits(model(x.repeat(reps, *([1] * (x.dim() - 1)))))
            finally:
                handle.remove()
            pred_ab = out.argmax(dim=-1).cpu().reshape(reps, -1)
            for i, u in enumerate(group):
                drops[u] += torch.bincount(y[pred_ab[i] == y], minlength=num_classes).float()
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    result: dict[int, list[tuple[str, float]]] = {}
    for u in unit_list:
        drop = (base_correct - drops[u]) / counts.clamp_min(1)
        order = torch.argsort(drop, descending=True)[:top]
        result[u] = [(names[int(c)], round(float(drop[c]), 4)) for c in order if drop[c] > 0]
    return result


__all__ = ["ablate_units"]
