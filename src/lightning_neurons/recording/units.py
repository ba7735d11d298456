"""Turn a layer's output into per-unit activation maps.

Every supported output becomes ``[B, U, h, w]``: conv ``[B, C, H, W]`` as is, tokens ``[B, T, D]`` as the
hidden dims over the patch grid, linear ``[B, D]`` as ``1 x 1`` maps. The same conversion serves recording
(one reduced value per unit and sample) and the explanation stage (the full maps of the top samples).

Example:
    >>> import torch
    >>> unit_maps(torch.zeros(2, 197, 8), "token").shape
    torch.Size([2, 8, 14, 14])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

from torch import Tensor

from lightning_neurons.recording.types import UnitKind

TokenMode = Literal["auto", "drop_first", "keep_all"]
OutputSelector = int | str | Callable[[Any], Tensor]


def select_output(output: Any, selector: OutputSelector | None, layer: str) -> Tensor:
    """Pick the tensor to record from a module output.

    A tensor output is returned as it is whatever the selector: an index or key selects a part of a structured
    output, never a sample of a tensor (so a glob key such as ``"blocks.*"`` may also match plain submodules).

    Args:
        output: What the module's ``forward`` returned.
        selector: ``None`` for a plain tensor output, an index for a tuple/list, a key for a dict, or a callable.
        layer: Layer name, for the error message.

    Raises:
        TypeError: If the output is not a tensor and no selector says which part to record.

    Example:
        >>> import torch
        >>> select_output((torch.zeros(2, 3), "aux"), 0, "block").shape, select_output(torch.zeros(2, 3), 0, "x").shape
        (torch.Size([2, 3]), torch.Size([2, 3]))
    """
    if selector is not None and (callable(selector) or not isinstance(output, Tensor)):
        if callable(selector):
            picked = selector(output)
        else:
            try:
                picked = output[selector]
            except (KeyError, IndexError, TypeError) as err:
                raise TypeError(
                    f"output_selector {selector!r} does not apply to the output of layer {layer!r} "
                    f"({_describe(output)})"
                ) from err
        output = picked
    if isinstance(output, Tensor):
        return output
    hint = " (a tuple/list: give an index)" if isinstance(output, (tuple, list)) else ""
    hint = " (a dict: give a key)" if isinstance(output, dict) else hint
    raise TypeError(
        f"layer {layer!r} returns {_describe(output)}, not a tensor; set output_selector={{{layer!r}: ...}}{hint}"
    )


def infer_kind(output: Tensor, layer: str) -> UnitKind:
    """``"conv"`` for 4-D, ``"token"`` for 3-D, ``"linear"`` for 2-D outputs.

    Raises:
        ValueError: For any other rank, naming the layer and the shape.
    """
    kinds: dict[int, UnitKind] = {4: "conv", 3: "token", 2: "linear"}
    if output.dim() not in kinds:
        raise ValueError(
            f"layer {layer!r} outputs shape {tuple(output.shape)}; supported are [B, C, H, W] (conv), "
            "[B, T, D] (tokens) and [B, D] (linear)"
        )
    return kinds[output.dim()]


def token_grid(num_tokens: int, token_mode: TokenMode, layer: str = "?") -> tuple[int, int]:
    """Return ``(skip, side)``: how many leading tokens to drop and the side of the square patch grid.

    Raises:
        ValueError: If the tokens do not form a square grid under ``token_mode``.
    """
    candidates = {"auto": (1, 0), "drop_first": (1,), "keep_all": (0,)}[token_mode]
    for skip in candidates:
        side = math.isqrt(num_tokens - skip)
        if side * side == num_tokens - skip and side > 0:
            return skip, side
    others = " or ".join(repr(m) for m in ("drop_first", "keep_all") if m != token_mode)
    raise ValueError(
        f"layer {layer!r} has {num_tokens} tokens, which do not form a square patch grid with "
        f"token_mode={token_mode!r}; use token_mode={others} ('drop_first': a class token comes first), or record "
        "a layer whose tokens are the patch grid"
    )


def unit_maps(output: Tensor, kind: UnitKind, token_mode: TokenMode = "auto", layer: str = "?") -> Tensor:
    """Return the per-unit maps ``[B, U, h, w]`` of a layer output (a view where possible, no copy or cast).

    Args:
        output: The selected layer output.
        kind: From :func:`infer_kind`.
        token_mode: For token outputs, whether the first (class) token is dropped.
        layer: Layer name, for error messages.
    """
    if kind == "conv":
        return output
    if kind == "linear":
        return output[:, :, None, None]
    skip, side = token_grid(output.shape[1], token_mode, layer)
    tokens = output[:, skip:, :]
    return tokens.transpose(1, 2).reshape(output.shape[0], output.shape[2], side, side)


def reduce_maps(maps: Tensor, reduction: Literal["max", "mean"] = "max") -> tuple[Tensor, Tensor]:
    """Reduce ``[B, U, h, w]`` maps to per-unit values and peak positions, in one pass in the maps' own dtype.

    The reduction runs over the maps' memory layout as it is: a channels-last conv output (or a token output,
    whose unit maps are channels-last views) is reduced as ``[B, h*w, U]`` and a contiguous one as
    ``[B, U, h*w]``, so that neither is copied first. ``max`` returns values and positions from one kernel.

    Returns:
        ``values [B, U]`` and ``peaks [B, U]`` (flat index of the maximum inside ``h x w``).
    """
    batch, units, height, width = maps.shape
    if maps.stride(1) == 1 and units > 1:
        flat, dim = maps.permute(0, 2, 3, 1).reshape(batch, height * width, units), 1
    else:
        flat, dim = maps.reshape(batch, units, height * width), 2
    values, peaks = flat.max(dim=dim)
    if reduction == "mean":
        values = flat.mean(dim=dim)
    return values, peaks


def _describe(obj: Any) -> str:
    if isinstance(obj, Tensor):
        return f"a tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, (tuple, list)):
        return f"a {type(obj).__name__} of {len(obj)} items"
    if isinstance(obj, dict):
        return f"a dict with keys {list(obj)[:8]}"
    return f"a {type(obj).__name__}"


__all__ = ["infer_kind", "reduce_maps", "select_output", "token_grid", "unit_maps"]
