"""Activated regions: unit maps -> thresholds -> boxes, crops, masks and previews.

The steps of DESIGN.md "The method", step 2, vectorised over many ``(unit, sample)`` pairs at once and
device-agnostic (everything stays on the device of its inputs):

1. :func:`unit_thresholds`: per unit, the top ``quantile`` (Network Dissection: 0.995) of its activations
   over the control (reservoir) maps and its own top maps.
2. :func:`region_boxes`: each pair's map is upsampled (bilinear) to a working resolution of the input,
   thresholded (quantile threshold, or the relative ``min + r * (peak - min)`` threshold where that is lower:
   always when the quantile threshold leaves nothing, and when it would leave only a sliver), reduced to the
   connected component that contains the peak, and its box is padded, grown to a minimum size and made
   square (so that resizing the crop does not distort it). The component is found on the masks' horizontal
   runs (:class:`MaskRuns`, :func:`peak_runs`): tensor ops only, batched over all pairs of a chunk, no SciPy
   and no copy to the host, and the box comes from reductions over the runs without painting the mask.
3. :func:`dedupe_boxes`: boxes of the same sample that overlap with IoU above a threshold (the pipeline's
   ``ExplainConfig.dedupe_iou``, 0.7) become one crop (greedy suppression, larger boxes first, resolved in
   parallel rounds over the overlapping pairs).
4. :func:`crop_images` / :func:`crop_masks`: crops and masks resized to a fixed size (``roi_align``).
5. :func:`preview_images`: ``uint8`` crops, dimmed outside the region and with the region outlined.

Why the peak's connected component rather than the box of the whole mask: a unit that fires on two
separate objects in one image would get one large box that is mostly background between them; the
peak's component gives a tight crop of the strongest instance (the other instances appear in the other
top samples anyway). ``component="all"`` gives the whole-mask box.

Example:
    >>> import torch
    >>> maps = torch.zeros(1, 7, 7); maps[0, 1:3, 4:6] = 1.0
    >>> boxes, _ = region_boxes(maps, torch.tensor([0.5]), (224, 224), padding=0.0, min_size=0.0)
    >>> boxes.tolist()
    [[128, 32, 192, 96]]
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_iou, roi_align

Component = Literal["peak", "all"]


def check_image_inputs(inputs: Tensor) -> None:
    """Fail with the fix unless ``inputs`` are images the explanation stage can cut crops from.

    Args:
        inputs: A batch of model inputs.

    Raises:
        ValueError: Unless ``inputs`` is ``[N, 1 or 3, H, W]``; the message says how to explain a model whose inputs
            are something else (RGBA, multispectral, other shapes): images in the loader and a ``forward_fn``.

    Example:
        >>> check_image_inputs(torch.zeros(2, 3, 8, 8))
        >>> check_image_inputs(torch.zeros(2, 4, 8, 8))
        Traceback (most recent call last):
        ...
        ValueError: the explanation stage needs image inputs [N, 1 or 3, H, W], got shape (2, 4, 8, 8). ...
    """
    if inputs.dim() != 4 or inputs.shape[1] not in (1, 3):
        raise ValueError(
            f"the explanation stage needs image inputs [N, 1 or 3, H, W], got shape {tuple(inputs.shape)}. "
            "It cuts its crops from the probe loader's inputs. For a model with other inputs (RGBA, multispectral), "
            "give it a loader of grey or RGB images and turn them into the model's input in forward_fn, e.g. "
            "forward_fn=lambda model, x: model(to_model_input(x))."
        )


def images_from_inputs(
    inputs: Tensor, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> Tensor:
    """Turn model inputs into RGB images in ``[0, 1]``.

    Args:
        inputs: ``[N, C, H, W]`` with ``C`` 1 or 3.
        mean: Per-channel mean the inputs were normalised with; ``None`` with ``std=None`` min-max scales
            every image to ``[0, 1]``.
        std: Per-channel standard deviation.

    Returns:
        float32 ``[N, 3, H, W]`` in ``[0, 1]``.

    Raises:
        ValueError: If the inputs are not images.

    Example:
        >>> images_from_inputs(torch.zeros(2, 1, 4, 4)).shape
        torch.Size([2, 3, 4, 4])
    """
    check_image_inputs(inputs)
    x = inputs.detach().float()
    if mean is not None or std is not None:
        m = torch.as_tensor(mean if mean is not None else 0.0, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
        s = torch.as_tensor(std if std is not None else 1.0, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
        x = x * s + m
    else:
        flat = x.flatten(1)
        lo = flat.min(dim=1).values.reshape(-1, 1, 1, 1)
        hi = flat.max(dim=1).values.reshape(-1, 1, 1, 1)
        x = (x - lo) / (hi - lo).clamp_min(1e-8)
    x = x.clamp(0.0, 1.0)
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x


def quantile_from_sorted(sorted_values: Tensor, count: Tensor, quantile: float) -> Tensor:
    """Linear-interpolated quantile of each row's first ``count`` values (rows sorted ascending).

    Args:
        sorted_values: ``[U, M]`` ascending, where only the first ``count[u]`` entries of row ``u`` are data.
        count: ``[U]`` number of data entries per row.
        quantile: In ``[0, 1]``.
    """
    pos = quantile * (count.clamp_min(1) - 1).to(sorted_values.dtype)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=sorted_values.shape[1] - 1)
    hi = torch.minimum(hi, (count - 1).clamp_min(0))
    frac = pos - lo.to(pos.dtype)
    v_lo = sorted_values.gather(1, lo[:, None]).squeeze(1)
    v_hi = sorted_values.gather(1, hi[:, None]).squeeze(1)
    out = v_lo + frac * (v_hi - v_lo)
    return torch.where(count > 0, out, torch.full_like(out, float("inf")))


def unit_thresholds(
    top_maps: Tensor,
    control_values: Tensor | None = None,
    quantile: float = 0.995,
    valid: Tensor | None = None,
) -> Tensor:
    """Per-unit activation threshold: the top ``quantile`` of the unit's control and top-map activations.

    Args:
        top_maps: ``[U, k, h, w]`` (or ``[U, k, n]``) maps of each unit on its top samples.
        control_values: ``[U, M]`` activations of each unit on the control samples (a subsample of their map
            values is enough); ``None`` for none.
        quantile: Network Dissection uses 0.995 (top 0.5%).
        valid: ``[U, k]`` bool, which top slots hold a sample; ``None`` = all.

    Returns:
        float32 ``[U]``; ``inf`` for a unit with no finite value (the relative fallback then applies).

    Example:
        >>> t = unit_thresholds(torch.arange(10.0).reshape(1, 1, 10), quantile=0.5)
        >>> round(float(t), 2)
        4.5
    """
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    num_units, k = top_maps.shape[:2]
    top = top_maps.reshape(num_units, k, -1).float()
    if valid is not None:
        top = torch.where(valid[:, :, None].to(top.device), top, torch.full_like(top, float("nan")))
    parts = [top.reshape(num_units, -1)]
    if control_values is not None and control_values.numel() > 0:
        parts.append(control_values.to(top.device, torch.float32).reshape(num_units, -1))
    values = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    bad = ~torch.isfinite(values)
    count = values.shape[1] - bad.sum(dim=1)
    # Only the ranks around ``quantile * (count - 1)`` are needed: for a high quantile, a partial top-m
    # selection (m = the largest number of values above that rank, plus one) is much cheaper than a full sort.
    width = values.shape[1]
    pos = quantile * (count.clamp_min(1) - 1).to(torch.float32)
    lo = pos.floor().long()
    need = int((count - lo).max().item()) + 1 if num_units else 0
    if 0 < need <= width // 4:
        desc = torch.topk(values.masked_fill(bad, float("-inf")), need, dim=1, largest=True, sorted=True).values
        # ascending rank r of a row with c values is descending position c - 1 - r
        r_hi = torch.minimum(lo + 1, (count - 1).clamp_min(0))
        v_lo = desc.gather(1, (count - 1 - lo).clamp(0, need - 1)[:, None]).squeeze(1)
        v_hi = desc.gather(1, (count - 1 - r_hi).clamp(0, need - 1)[:, None]).squeeze(1)
        out = v_lo + (pos - lo.to(torch.float32)) * (v_hi - v_lo)
        return torch.where(count > 0, out, torch.full_like(out, float("inf")))
    # NaN sorts last, so the data of each row is its first ``count`` entries.
    sorted_values = torch.sort(values.masked_fill(bad, float("nan")), dim=1).values
    return quantile_from_sorted(sorted_values, count, quantile)


def working_size(image_size: tuple[int, int], mask_size: int) -> tuple[int, int]:
    """Resolution at which masks are computed: the input size shrunk so that its long side is ``mask_size``."""
    height, width = image_size
    scale = min(1.0, mask_size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def threshold_masks(
    maps: Tensor, thresholds: Tensor, mask_hw: tuple[int, int], relative_threshold: float = 0.5
) -> tuple[Tensor, Tensor]:
    """Upsample maps to ``mask_hw`` (once, in one call) and threshold them; see :func:`region_masks`.

    Returns:
        ``(mask bool [P, mh, mw], peak_idx int64 [P])``: the whole thresholded mask (every component) and
        the flat index of each map's peak pixel, which is always in the mask.
    """
    num = maps.shape[0]
    if tuple(maps.shape[-2:]) == tuple(mask_hw):
        up = maps.float()
    else:
        up = F.interpolate(maps[:, None].float(), size=mask_hw, mode="bilinear", align_corners=False)[:, 0]
    flat = up.flatten(1)
    peak_val, peak_idx = flat.max(dim=1)
    low = flat.amin(dim=1)
    thr = thresholds.to(up.device, torch.float32)
    relative = low + relative_threshold * (peak_val - low)
    # The relative threshold is a floor on the region, not only a fallback for maps that never reach the
    # quantile: a map that barely reaches it (or a saturated plateau that *is* the quantile) would otherwise
    # give an arbitrary sliver around the peak. Where the quantile selects more, Network Dissection's rule holds.
    thr = torch.minimum(thr, relative)
    mask = flat >= (thr - 1e-6 * thr.abs())[:, None]
    mask[torch.arange(num, device=mask.device), peak_idx] = True
    return mask.reshape(num, *mask_hw), peak_idx


def region_masks(
    maps: Tensor,
    thresholds: Tensor,
    mask_hw: tuple[int, int],
    *,
    relative_threshold: float = 0.5,
    component: Component = "peak",
) -> Tensor:
    """Activated-region masks of many maps at resolution ``mask_hw``.

    Args:
        maps: ``[P, h, w]`` unit maps, one per ``(unit, sample)`` pair.
        thresholds: ``[P]`` the unit's quantile threshold for each pair.
        mask_hw: Output resolution (the input image's aspect ratio).
        relative_threshold: ``min + r * (peak - min)`` of the upsampled map; used where it is below the quantile
            threshold (always where the quantile threshold leaves nothing).
        component: ``"peak"`` keeps the 8-connected component that contains the peak; ``"all"`` the whole mask.

    Returns:
        bool ``[P, mh, mw]``, never empty (the peak pixel is always in).

    Example:
        >>> maps = torch.zeros(1, 4, 4); maps[0, 0, 0] = 2.0; maps[0, 3, 3] = 1.0
        >>> region_masks(maps, torch.tensor([0.5]), (4, 4)).nonzero().tolist()
        [[0, 0, 0]]
    """
    mask, peak_idx = threshold_masks(maps, thresholds, mask_hw, relative_threshold)
    if component == "peak":
        mask = peak_component(mask, peak_idx)
    return mask


class MaskRuns:
    """The horizontal runs of a stack of masks: the compact form the component search works on.

    A run is a maximal horizontal segment of mask pixels. A ``112 x 112`` region mask has a few hundred runs
    against 12,544 pixels, so the graph search below touches ~50x less data than a per-pixel flood fill and
    needs no loop over pixels, units or pairs.

    Attributes:
        shape: ``(P, H, W)`` of the masks.
        start: int64 ``[R]`` flat index (into ``P * H * W``) of each run's first pixel, ascending.
        row: int64 ``[R]`` global row (``p * H + y``) of each run.
        x0: int64 ``[R]`` first column; ``x1``: last column (inclusive).

    Example:
        >>> runs = MaskRuns(torch.tensor([[[1, 1, 0, 1], [0, 0, 1, 0]]], dtype=torch.bool))
        >>> runs.x0.tolist(), runs.x1.tolist(), [t.tolist() for t in runs.links()]
        ([0, 3, 2], [1, 3, 2], [[0, 1], [2, 2]])
        >>> runs.boxes().tolist()
        [[0, 0, 4, 2]]
    """

    def __init__(self, mask: Tensor) -> None:
        num, height, width = mask.shape
        self.shape = (num, height, width)
        # a run begins where a pixel is in and its left neighbour is not (True > False), and ends likewise
        begins = torch.empty_like(mask)
        begins[..., 0] = mask[..., 0]
        torch.gt(mask[..., 1:], mask[..., :-1], out=begins[..., 1:])
        ends = torch.empty_like(mask)
        ends[..., -1] = mask[..., -1]
        torch.gt(mask[..., :-1], mask[..., 1:], out=ends[..., :-1])
        # One scan for both (a host synchronisation: the number of runs; everything else stays on the device):
        # in flat order the marks alternate start, end, start, end (a one-pixel run is both at once).
        marks = torch.nonzero((begins | ends).reshape(-1)).squeeze(1)
        self.start = marks[begins.reshape(-1)[marks]]
        end = marks[ends.reshape(-1)[marks]]
        self.row = torch.div(self.start, width, rounding_mode="floor")
        self.x0 = self.start - self.row * width
        self.x1 = end - self.row * width
        self.begins: Tensor | None = begins
        self.mask: Tensor | None = mask

    @classmethod
    def cat(cls, parts: Sequence[MaskRuns]) -> MaskRuns:
        """The runs of the parts' masks stacked in order, without their pixels (no :meth:`paint`).

        Lets one component search and one set of box reductions serve many chunks of masks: the runs are
        compact, and fewer, larger tensor ops are what both a GPU and a busy CPU run fastest.
        """
        _, height, width = parts[0].shape
        out = cls.__new__(cls)
        counts = [p.shape[0] for p in parts]
        bases = [sum(counts[:i]) for i in range(len(parts))]
        out.shape = (sum(counts), height, width)
        out.start = torch.cat([p.start + b * height * width for p, b in zip(parts, bases)])
        out.row = torch.cat([p.row + b * height for p, b in zip(parts, bases)])
        out.x0 = torch.cat([p.x0 for p in parts])
        out.x1 = torch.cat([p.x1 for p in parts])
        out.begins = out.mask = None
        return out

    @property
    def map_index(self) -> Tensor:
        """int64 ``[R]``: the mask each run belongs to."""
        return torch.div(self.row, self.shape[1], rounding_mode="floor")

    def links(self) -> tuple[Tensor, Tensor]:
        """8-connected pairs of runs in adjacent rows of one mask, as two int64 ``[E]`` run indices.

        Runs are sorted by (row, column), so the runs of the next row that touch a run (column ranges that
        overlap once widened by one pixel: diagonal links) are one contiguous range, found by binary search.
        """
        _, height, width = self.shape
        stride = width + 2  # > any column difference, so (row, column) keys never collide across rows
        key_start = self.row * stride + self.x0
        key_end = self.row * stride + self.x1
        below = (self.row + 1) * stride
        lo = torch.searchsorted(key_end, below + self.x0 - 1)
        hi = torch.searchsorted(key_start, below + self.x1 + 1, right=True)
        count = (hi - lo).clamp_min(0)
        count = torch.where(self.row % height == height - 1, torch.zeros_like(count), count)
        src = torch.repeat_interleave(torch.arange(count.numel(), device=count.device), count)
        offset = torch.cumsum(count, 0) - count
        dst = lo[src] + torch.arange(src.numel(), device=src.device) - offset[src]
        return src, dst

    def boxes(self, selected: Tensor | None = None) -> Tensor:
        """Tight ``(x0, y0, x1, y1)`` boxes (end exclusive, mask pixels) of the selected runs of every mask."""
        num, height, width = self.shape
        owner = self.map_index
        y = self.row - owner * height
        if selected is None:
            selected = torch.ones_like(y, dtype=torch.bool)

        def reduce(values: Tensor, neutral: int, how: str) -> Tensor:
            init = torch.full((num,), neutral, dtype=torch.long, device=values.device)
            picked = torch.where(selected, values, torch.full_like(values, neutral))
            return init.scatter_reduce_(0, owner, picked, reduce=how)

        return torch.stack(
            [
                reduce(self.x0, width, "amin"),
                reduce(y, height, "amin"),
                reduce(self.x1 + 1, 0, "amax"),
                reduce(y + 1, 0, "amax"),
            ],
            dim=1,
        )

    def paint(self, selected: Tensor) -> Tensor:
        """The pixels of the selected runs (``selected``: bool ``[R]``), as bool ``[P, H, W]``."""
        if self.begins is None or self.mask is None:
            raise ValueError("these runs were concatenated without their pixels; paint each part instead")
        run_of_pixel = torch.cumsum(self.begins.reshape(-1), 0) - 1  # outside pixels: the run before them
        return selected[run_of_pixel.clamp_min(0)].reshape(self.shape) & self.mask


def peak_runs(runs: MaskRuns, peak_idx: Tensor, check_every: int = 2) -> Tensor:
    """Which runs (bool ``[R]``) make up the 8-connected component that holds each mask's peak pixel.

    Connected components of the run graph by hooking and pointer jumping (Shiloach-Vishkin style): every
    run points to a run of its component with an index no larger; each step hooks the pointer of one end of
    every link under the other's (a ``scatter_reduce`` minimum) and then halves every pointer path
    (``L <- L[L]``), so blob-like regions converge in a few steps. Convergence is checked every
    ``check_every`` steps (the only host synchronisations) and is reached after at most ``R`` steps.

    Args:
        runs: The masks' runs.
        peak_idx: ``[P]`` flat index (into ``H * W``) of the seed pixel of each mask (inside the mask).
        check_every: Steps between convergence checks.
    """
    num, height, width = runs.shape
    src, dst = runs.links()
    parent = torch.arange(runs.start.numel(), device=runs.start.device)
    check_every = max(1, int(check_every))
    for _ in range(0, parent.numel() + check_every, check_every):
        for _ in range(check_every):
            ps, pd = parent[src], parent[dst]
            parent.scatter_reduce_(0, torch.maximum(ps, pd), torch.minimum(ps, pd), reduce="amin")
            parent = parent[parent]
            parent = parent[parent]
        if bool((parent[src] == parent[dst]).all()) and bool((parent[parent] == parent).all()):
            break
    seed_pixel = torch.arange(num, device=parent.device) * (height * width) + peak_idx.to(parent.device).long()
    seed = torch.searchsorted(runs.start, seed_pixel, right=True) - 1
    return parent == parent[seed][runs.map_index]


def peak_component(mask: Tensor, peak_idx: Tensor, check_every: int = 2, method: str = "auto") -> Tensor:
    """The 8-connected component of each mask that contains its peak pixel.

    Two exact implementations:

    * ``"torch"`` (the default, ``"auto"``, on every device): the masks' horizontal runs (:class:`MaskRuns`)
      are linked to the touching runs of the next row and labelled by hooking and pointer jumping
      (:func:`peak_runs`); pure tensor ops on the device of ``mask``, no loop over maps, units or pixels.
    * ``"scipy"`` (a reference for tests): one :func:`scipy.ndimage.label` call over the ``[P, H, W]``
      stack with a structuring element that connects pixels within a map only (copies to the host).

    Args:
        mask: bool ``[P, H, W]``.
        peak_idx: ``[P]`` flat index of the seed pixel of each mask (must be inside the mask).
        check_every: Steps between convergence checks (torch path).
        method: ``"auto"``, ``"scipy"`` or ``"torch"``.

    Returns:
        bool ``[P, H, W]`` on the device of ``mask``.

    Example:
        >>> m = torch.tensor([[[1, 0, 1], [1, 0, 1], [0, 0, 1]]], dtype=torch.bool)
        >>> peak_component(m, torch.tensor([2])).int().tolist()
        [[[0, 0, 1], [0, 0, 1], [0, 0, 1]]]
    """
    if method not in ("auto", "scipy", "torch"):
        raise ValueError(f"method must be 'auto', 'scipy' or 'torch', got {method!r}")
    if mask.shape[0] == 0:
        return mask.clone()
    if method == "scipy":
        return _peak_component_scipy(mask, peak_idx)
    runs = MaskRuns(mask)
    return runs.paint(peak_runs(runs, peak_idx, check_every))


def _peak_component_scipy(mask: Tensor, peak_idx: Tensor) -> Tensor:
    import numpy as np
    from scipy import ndimage

    num, height, width = mask.shape
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True  # 8-connectivity inside a map, none across maps
    labels, _ = ndimage.label(mask.detach().cpu().numpy(), structure=structure)
    flat = labels.reshape(num, height * width)
    peak_labels = flat[np.arange(num), peak_idx.detach().cpu().numpy()]
    out = torch.from_numpy((flat == peak_labels[:, None]) & (peak_labels[:, None] > 0))
    return out.reshape(num, height, width).to(mask.device)


def mask_boxes(mask: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Tight ``(x0, y0, x1, y1)`` boxes (end exclusive) of masks, in input pixels.

    Args:
        mask: bool ``[P, mh, mw]``, each non-empty.
        image_size: ``(H, W)`` of the input the masks cover.

    Returns:
        int64 ``[P, 4]``.
    """
    _, mh, mw = mask.shape
    height, width = image_size
    rows = mask.any(dim=2)
    cols = mask.any(dim=1)
    ar_h = torch.arange(mh, device=mask.device)
    ar_w = torch.arange(mw, device=mask.device)
    y0 = torch.where(rows, ar_h, mh).min(dim=1).values
    y1 = torch.where(rows, ar_h, -1).max(dim=1).values + 1
    x0 = torch.where(cols, ar_w, mw).min(dim=1).values
    x1 = torch.where(cols, ar_w, -1).max(dim=1).values + 1
    return _to_image_pixels(torch.stack([x0, y0, x1, y1], dim=1), (mh, mw), image_size)


def _to_image_pixels(boxes: Tensor, mask_hw: tuple[int, int], image_size: tuple[int, int]) -> Tensor:
    """Boxes in mask pixels -> the smallest boxes in input pixels that cover them."""
    (mh, mw), (height, width) = mask_hw, image_size
    sy, sx = height / mh, width / mw
    return torch.stack(
        [
            (boxes[:, 0] * sx).floor().long(),
            (boxes[:, 1] * sy).floor().long(),
            (boxes[:, 2] * sx).ceil().long().clamp(max=width),
            (boxes[:, 3] * sy).ceil().long().clamp(max=height),
        ],
        dim=1,
    )


def pad_boxes(
    boxes: Tensor, image_size: tuple[int, int], padding: float = 0.1, min_size: float = 0.1, square: bool = True
) -> Tensor:
    """Pad boxes by a fraction of their size, grow them to a minimum size, optionally make them square.

    The result stays inside the image (a box is shifted, then clipped, when it would leave it).

    Args:
        boxes: int64 ``[P, 4]`` ``(x0, y0, x1, y1)``, end exclusive.
        image_size: ``(H, W)``.
        padding: Added on every side, as a fraction of the box's width / height.
        min_size: Minimum side, as a fraction of the image's shorter side.
        square: Grow the shorter side to the longer one (CLIP-style encoders see square crops).

    Returns:
        int64 ``[P, 4]``.
    """
    height, width = image_size
    b = boxes.float()
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    bw = (b[:, 2] - b[:, 0]) * (1 + 2 * padding)
    bh = (b[:, 3] - b[:, 1]) * (1 + 2 * padding)
    smallest = max(1.0, min_size * min(height, width))
    bw, bh = bw.clamp_min(smallest), bh.clamp_min(smallest)
    if square:
        side = torch.maximum(bw, bh)
        bw, bh = side, side
    bw, bh = bw.clamp(max=width), bh.clamp(max=height)
    x0 = (cx - bw / 2).clamp(min=0)
    y0 = (cy - bh / 2).clamp(min=0)
    x0 = torch.minimum(x0, width - bw)
    y0 = torch.minimum(y0, height - bh)
    out = torch.stack([x0, y0, x0 + bw, y0 + bh], dim=1).round().long()
    out[:, 0::2] = out[:, 0::2].clamp(0, width)
    out[:, 1::2] = out[:, 1::2].clamp(0, height)
    return out


def region_boxes(
    maps: Tensor,
    thresholds: Tensor,
    image_size: tuple[int, int],
    *,
    relative_threshold: float = 0.5,
    padding: float = 0.1,
    min_size: float = 0.1,
    square: bool = True,
    mask_size: int = 112,
    component: Component = "peak",
    return_masks: bool = False,
    chunk_size: int = 1024,
) -> tuple[Tensor, Tensor | None]:
    """Padded crop boxes (and optionally masks) of the activated regions of many unit maps.

    Args:
        maps: ``[P, h, w]`` unit maps (``1 x 1`` maps, from linear units, give the whole image).
        thresholds: ``[P]`` quantile threshold of each pair's unit.
        image_size: ``(H, W)`` of the model input.
        relative_threshold: Fallback threshold as a fraction of the map's range, see :func:`region_masks`.
        padding: See :func:`pad_boxes`.
        min_size: See :func:`pad_boxes`.
        square: See :func:`pad_boxes`.
        mask_size: Long side of the working resolution of the masks.
        component: ``"peak"`` or ``"all"``, see the module docstring.
        return_masks: Also return the masks (``[P, mh, mw]`` bool over the whole image).
        chunk_size: Pairs per vectorised pixel step (upsample, threshold, runs; bounds memory). The component
            search and the box reductions then run once over the compact runs of all chunks.

    Returns:
        ``(boxes int64 [P, 4], masks or None)``.

    Example:
        >>> boxes, masks = region_boxes(torch.ones(3, 1, 1), torch.zeros(3), (32, 32), return_masks=True)
        >>> boxes[0].tolist(), masks.shape
        ([0, 0, 32, 32], torch.Size([3, 32, 32]))
    """
    mask_hw = working_size(image_size, mask_size)
    num = maps.shape[0]
    boxes = torch.empty(num, 4, dtype=torch.long, device=maps.device)
    masks = torch.empty(num, *mask_hw, dtype=torch.bool, device=maps.device) if return_masks else None
    if maps.shape[-2:] == (1, 1):
        boxes[:] = torch.tensor([0, 0, image_size[1], image_size[0]], device=maps.device)
        if masks is not None:
            masks[:] = True
        return boxes, masks
    # Per chunk only the pixel work (upsample, threshold, runs); the runs of all chunks then get one component
    # search and one set of box reductions. Boxes come straight from the runs of the peak's component: the
    # component mask itself is painted only when asked for (previews, chunk by chunk).
    parts: list[MaskRuns] = []
    peaks: list[Tensor] = []
    for start in range(0, num, chunk_size):
        sl = slice(start, min(num, start + chunk_size))
        mask, peak_idx = threshold_masks(maps[sl], thresholds[sl], mask_hw, relative_threshold)
        runs = MaskRuns(mask)
        if masks is not None:
            masks[sl] = mask if component == "all" else runs.paint(peak_runs(runs, peak_idx))
        runs.begins = runs.mask = None  # free the chunk's pixels
        parts.append(runs)
        peaks.append(peak_idx)
    if not parts:
        return boxes, masks
    runs = MaskRuns.cat(parts) if len(parts) > 1 else parts[0]
    selected = peak_runs(runs, torch.cat(peaks)) if component == "peak" else None
    tight = _to_image_pixels(runs.boxes(selected), mask_hw, image_size)
    boxes[:] = pad_boxes(tight, image_size, padding, min_size, square)
    return boxes, masks


def dedupe_boxes(
    sample_index: Tensor, boxes: Tensor, iou_threshold: float = 0.8, pair_budget: int = 1 << 21
) -> tuple[Tensor, Tensor]:
    """Merge boxes of the same sample that overlap with IoU above ``iou_threshold`` into one crop.

    Exact duplicates are merged first; then greedy suppression (larger boxes win) per sample; every box is
    assigned to the kept box of its sample that it overlaps most (at least ``iou_threshold`` when suppressed).

    Args:
        sample_index: int64 ``[P]`` which image each box belongs to.
        boxes: int64 ``[P, 4]``.
        iou_threshold: Merge threshold.
        pair_budget: Box pairs compared per vectorised block (bounds memory).

    Returns:
        ``(keep [K], assign [P])``: indices (into ``P``) of the unique crops, and for every box the index
        (into ``K``) of the crop that represents it.

    Example:
        >>> keep, assign = dedupe_boxes(torch.tensor([0, 0, 1]), torch.tensor([[0, 0, 10, 10], [0, 0, 10, 9],
        ...     [0, 0, 10, 10]]))
        >>> keep.tolist(), assign.tolist()
        ([0, 2], [0, 0, 1])
    """
    num = boxes.shape[0]
    device = boxes.device
    if num == 0:
        return torch.empty(0, dtype=torch.long, device=device), torch.empty(0, dtype=torch.long, device=device)
    uniq, inverse = _unique_rows(torch.cat([sample_index[:, None], boxes], dim=1).long())
    # First occurrence of each exact-duplicate group, so that ``keep`` indexes the caller's pairs.
    first = torch.full((uniq.shape[0],), num, dtype=torch.long, device=device)
    first.scatter_reduce_(0, inverse, torch.arange(num, device=device), reduce="amin")
    ub = uniq[:, 1:].float()
    us = uniq[:, 0].contiguous()
    area = (ub[:, 2] - ub[:, 0]) * (ub[:, 3] - ub[:, 1])
    # Greedy order of torchvision's nms: area descending, ties by position (stable).
    order = torch.sort(area, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=device)
    src, dst, iou = _suppressions(ub, us, rank, iou_threshold, pair_budget)
    kept = _greedy_keep(src, dst, ub.shape[0])
    # Every unique box goes to the kept box of its sample it overlaps most (ties: the earlier in greedy
    # order): itself when kept; else a kept box it overlaps above the threshold (a suppressor, or a later
    # kept box; kept boxes below the threshold overlap it less than its suppressor does).
    cand_src, cand_dst, cand_iou = torch.cat([src, dst]), torch.cat([dst, src]), torch.cat([iou, iou])
    from_kept = kept[cand_src] & ~kept[cand_dst]
    cand_src, cand_dst, cand_iou = cand_src[from_kept], cand_dst[from_kept], cand_iou[from_kept]
    num_u = ub.shape[0]
    best_iou = torch.full((num_u,), -1.0, device=device)
    best_iou.scatter_reduce_(0, cand_dst, cand_iou, reduce="amax")
    top = cand_iou == best_iou[cand_dst]
    best_rank = torch.where(kept, rank, torch.full_like(rank, num_u))
    best_rank.scatter_reduce_(0, cand_dst[top], rank[cand_src[top]], reduce="amin")
    # Crops in (sample, greedy order); ``uniq`` is sorted by sample, so a key of sample rank then greedy rank.
    kept_sorted = torch.nonzero(kept).squeeze(1)
    kept_sorted = kept_sorted[torch.argsort(us[kept_sorted] * num_u + rank[kept_sorted])]
    position = torch.empty(num_u + 1, dtype=torch.long, device=device)  # indexed by rank
    position[rank[kept_sorted]] = torch.arange(kept_sorted.numel(), device=device)
    return first[kept_sorted], position[best_rank][inverse]


def _unique_rows(rows: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.unique(rows, dim=0, return_inverse=True)`` for ``[N, 5]`` (sample, box) rows, vectorised.

    ``unique(dim=0)`` compares rows one by one on the CPU; here the four coordinates are packed into one
    int64 key (15 bits each, order-preserving), and two stable sorts give the same lexicographic order.
    """
    if rows.numel() and (int(rows[:, 1:].min()) < 0 or int(rows[:, 1:].max()) >= 1 << 15):
        return torch.unique(rows, dim=0, return_inverse=True)  # pragma: no cover - images of 32k px and up
    coords = rows[:, 1:]
    packed = ((coords[:, 0] * (1 << 15) + coords[:, 1]) * (1 << 15) + coords[:, 2]) * (1 << 15) + coords[:, 3]
    order = torch.sort(packed, stable=True).indices
    order = order[torch.sort(rows[order, 0], stable=True).indices]
    ordered = rows[order]
    new = torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device)
    new[1:] = (ordered[1:] != ordered[:-1]).any(dim=1)
    group = torch.cumsum(new, 0) - 1
    inverse = torch.empty_like(group)
    inverse[order] = group
    return ordered[new], inverse


def _suppressions(
    boxes: Tensor, groups: Tensor, rank: Tensor, iou_threshold: float, pair_budget: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Every ``(i, j, IoU)`` of boxes of one group where ``i`` comes first in greedy order and IoU > threshold.

    ``groups`` is sorted, so the pairs of a group are the upper triangle of a contiguous block: enumerated
    in blocks of rows holding at most ``pair_budget`` pairs (bounded memory), with no loop over groups or
    boxes. The IoU is torchvision's nms formula in float32, compared in float64 as its kernel does.
    """
    num = boxes.shape[0]
    device = boxes.device
    _, counts = torch.unique_consecutive(groups, return_counts=True)
    group_end = torch.repeat_interleave(torch.cumsum(counts, 0), counts)
    per_row = group_end - torch.arange(num, device=device) - 1  # partners after row i in its group
    cum = torch.cumsum(per_row, 0)
    # row blocks of at most ``pair_budget`` pairs (a single row may exceed it)
    cuts = torch.searchsorted(cum, torch.arange(pair_budget, int(cum[-1]) + pair_budget, pair_budget, device=device))
    bounds = [0, *sorted({min(num, int(c) + 1) for c in cuts.tolist()})]
    x0, y0, x1, y1 = boxes.unbind(1)  # 1-D columns: plain gathers, much cheaper than 2-D fancy indexing
    x0, y0, x1, y1 = x0.contiguous(), y0.contiguous(), x1.contiguous(), y1.contiguous()
    area = (x1 - x0) * (y1 - y0)
    out_src, out_dst, out_iou = [], [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):  # memory blocks, not a loop over boxes
        if hi <= lo:
            continue
        rows = torch.arange(lo, hi, device=device)
        count = per_row[lo:hi]
        i = torch.repeat_interleave(rows, count)
        offset = torch.cumsum(count, 0) - count
        j = i + 1 + torch.arange(i.numel(), device=device) - offset[i - lo]
        w = (torch.minimum(x1[i], x1[j]) - torch.maximum(x0[i], x0[j])).clamp_min(0)
        h = (torch.minimum(y1[i], y1[j]) - torch.maximum(y0[i], y0[j])).clamp_min(0)
        inter = w * h
        iou = inter / (area[i] + area[j] - inter)
        hit = iou.double() > iou_threshold
        i, j, iou = i[hit], j[hit], iou[hit]
        first = rank[i] < rank[j]
        out_src.append(torch.where(first, i, j))
        out_dst.append(torch.where(first, j, i))
        out_iou.append(iou)
    if not out_src:
        empty = torch.empty(0, dtype=torch.long, device=device)
        return empty, empty, torch.empty(0, device=device)
    return torch.cat(out_src), torch.cat(out_dst), torch.cat(out_iou)


def _greedy_keep(src: Tensor, dst: Tensor, num: int) -> Tensor:
    """Greedy suppression resolved in parallel: bool ``[num]``, which boxes the sequential greedy pass keeps.

    A box is kept once every box that would suppress it (``src -> dst`` links, from earlier boxes) is
    removed, and removed once one of them is kept. Each round settles at least the earliest open box of
    every group, so the loop ends after at most the longest chain of suppressions (a few rounds in practice).
    """
    kept = torch.zeros(num, dtype=torch.bool, device=src.device)
    removed = torch.zeros_like(kept)
    for _ in range(num + 1):
        removed[dst[kept[src]]] = True
        # links into settled boxes or from removed ones can no longer change anything: drop them
        live = ~(kept[dst] | removed[dst] | removed[src])
        src, dst = src[live], dst[live]
        blocked = torch.zeros(num, dtype=torch.bool, device=src.device)
        blocked[dst] = True  # still has a suppressor that is not settled
        now = ~(blocked | removed | kept)
        if not bool(now.any()):
            break
        kept |= now
    return kept


def _paired_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of boxes ``a[..., 4]`` and ``b[..., 4]`` element by element."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp_min(0).prod(dim=-1)
    area_a = (a[..., 2:] - a[..., :2]).prod(dim=-1)
    area_b = (b[..., 2:] - b[..., :2]).prod(dim=-1)
    return inter / (area_a + area_b - inter).clamp_min(1e-9)


def box_iou_matrix(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU ``[len(a), len(b)]`` of ``(x0, y0, x1, y1)`` boxes (for tests and evaluation)."""
    return box_iou(a.float(), b.float())


#: Fewest boxes per thread worth splitting :func:`_roi_align` for (a thread costs tens of microseconds).
_ROIS_PER_THREAD = 8


def _roi_align(src: Tensor, rois: Tensor, out_hw: tuple[int, int]) -> Tensor:
    """The ``roi_align`` of torchvision (aligned, adaptive sampling), its boxes split across the CPU threads.

    Its CPU kernel runs on one thread, and every box is computed on its own, so cutting the boxes into one run per
    thread gives the same tensor, bit for bit, in less time: 1.6x on 2 cores (64 crops of 224 px: 76 vs 125 ms).
    On other devices, and for a few boxes, it is one call.

    Example:
        >>> src, rois = torch.rand(2, 3, 16, 16), torch.tensor([[0, 0.0, 0, 8, 8]] * 20 + [[1, 4.0, 4, 12, 12]] * 20)
        >>> torch.equal(_roi_align(src, rois, (4, 4)), roi_align(src, rois, (4, 4), 1.0, -1, True))
        True
    """
    workers = min(torch.get_num_threads(), rois.shape[0] // _ROIS_PER_THREAD) if src.device.type == "cpu" else 1
    if workers < 2:
        return roi_align(src, rois, output_size=out_hw, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    with ThreadPoolExecutor(workers) as pool:  # the op releases the GIL
        parts = pool.map(lambda part: roi_align(src, part, out_hw, 1.0, -1, True), rois.tensor_split(workers))
        return torch.cat(list(parts))


#: Most crops per ``grid_sample`` call of :func:`_upsample_rois` (its grid holds 2 floats per output pixel: 25 MB at
#: 224 px).
_GRID_CHUNK = 64
#: Floats of source images gathered per ``grid_sample`` call (one copy per crop): 64 MiB, 21 crops of 512 px photos.
_GRID_SOURCE_FLOATS = 1 << 24


def _upsample_rois(src: Tensor, rois: Tensor, out_hw: tuple[int, int]) -> Tensor:
    """:func:`_roi_align` of boxes no larger than the output, as batched bilinear ``grid_sample``.

    For such a box ``roi_align``'s adaptive sampling takes one bilinear sample per output pixel, at the pixel's
    centre, with coordinates clamped to the image: exactly what ``grid_sample`` computes with ``align_corners=False``
    and border padding, in vectorised code (2.1x faster on 2 cores: 256 crops of 224 px from 96 px photos, 0.16 vs
    0.34 s). The crops agree to float rounding (1e-5 of the 0-1 range).

    Example:
        >>> src, rois = torch.rand(2, 3, 16, 16), torch.tensor([[0, 0.0, 0, 8, 8], [1, 3.0, 5, 12, 9]])
        >>> expected = roi_align(src, rois, (12, 12), 1.0, -1, True)
        >>> torch.allclose(_upsample_rois(src, rois, (12, 12)), expected, atol=1e-5)
        True
    """
    height, width = src.shape[-2:]
    out_h, out_w = out_hw
    # Output pixel i samples the box at its centre, (i + 0.5) / out of the way across; grid_sample's -1 and 1 are the
    # image's outer pixel edges (align_corners=False).
    tx = (torch.arange(out_w, dtype=src.dtype, device=src.device) + 0.5) / out_w
    ty = (torch.arange(out_h, dtype=src.dtype, device=src.device) + 0.5) / out_h
    parts = []
    per_call = max(1, min(_GRID_CHUNK, _GRID_SOURCE_FLOATS // max(1, src[0].numel())))
    for chunk in rois.split(per_call):
        x0, y0, x1, y1 = chunk[:, 1:2], chunk[:, 2:3], chunk[:, 3:4], chunk[:, 4:5]
        gx = (2 * (x0 + tx * (x1 - x0)) / width - 1)[:, None, :].expand(-1, out_h, -1)
        gy = (2 * (y0 + ty * (y1 - y0)) / height - 1)[:, :, None].expand(-1, -1, out_w)
        grid = torch.stack([gx, gy], dim=-1)
        source = src[chunk[:, 0].long()]
        parts.append(F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=False))
    return parts[0] if len(parts) == 1 else torch.cat(parts)  # cat copies even a single part


def _cut_rois(src: Tensor, rois: Tensor, out_hw: tuple[int, int]) -> Tensor:
    """Resized crops of ``rois`` ``[K, 5]``: :func:`_upsample_rois` for the boxes it serves on a CPU, else roi_align."""
    if src.device.type != "cpu":
        return _roi_align(src, rois, out_hw)
    box_w, box_h = rois[:, 3] - rois[:, 1], rois[:, 4] - rois[:, 2]
    small = (box_w > 0) & (box_h > 0) & (box_w <= out_hw[1]) & (box_h <= out_hw[0])
    if bool(small.all()):
        return _upsample_rois(src, rois, out_hw)
    if not bool(small.any()):
        return _roi_align(src, rois, out_hw)
    crops = src.new_empty(rois.shape[0], src.shape[1], *out_hw)
    crops[small] = _upsample_rois(src, rois[small], out_hw)
    crops[~small] = _roi_align(src, rois[~small], out_hw)
    return crops


def crop_images(images: Tensor, sample_index: Tensor, boxes: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Cut boxes out of images and resize them (bilinear, area-averaged when shrinking).

    Args:
        images: ``[N, C, H, W]``; ``uint8`` (0-255) or float (0-1).
        sample_index: int64 ``[K]`` image of each box.
        boxes: ``[K, 4]`` ``(x0, y0, x1, y1)`` in pixels, end exclusive.
        size: Output side (or ``(h, w)``).

    Returns:
        float32 ``[K, C, size, size]`` in ``[0, 1]``, on the images' device.

    Example:
        >>> crop_images(torch.rand(2, 3, 32, 32), torch.tensor([1]), torch.tensor([[0, 0, 16, 16]]), 8).shape
        torch.Size([1, 3, 8, 8])
    """
    out_hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if boxes.shape[0] == 0:
        return torch.empty(0, images.shape[1], *out_hw, device=images.device)
    used, local = torch.unique(sample_index.to(images.device), return_inverse=True)
    src = images[used].float()
    if images.dtype == torch.uint8:
        src = src / 255.0
    rois = torch.cat([local[:, None].to(src.dtype), boxes.to(src.device, src.dtype)], dim=1)
    return _cut_rois(src, rois, out_hw).clamp_(0.0, 1.0)  # a new tensor: clamped in place, no second copy


def crop_batches(
    images: Tensor,
    sample_index: Tensor,
    boxes: Tensor,
    size: int | tuple[int, int],
    batch_size: int,
    *,
    prefetch: bool = True,
) -> Iterator[Tensor]:
    """:func:`crop_images` in batches, in order; on CUDA the next batch is cut while the caller uses this one.

    On a CUDA device (with ``prefetch``) every batch is cut on a side stream one batch ahead: while the caller
    encodes batch ``i`` on the current stream, batch ``i + 1`` is being cut, so the encoder does not wait for
    the crops. Elsewhere the batches are cut when asked for. The crops are the same either way.

    Args:
        images: See :func:`crop_images`.
        sample_index: int64 ``[K]`` image of each box.
        boxes: ``[K, 4]``.
        size: Output side (or ``(h, w)``).
        batch_size: Crops per batch.
        prefetch: Cut one batch ahead on a side stream (CUDA only).

    Yields:
        float32 ``[<= batch_size, C, size, size]`` in ``[0, 1]``.

    Example:
        >>> boxes = torch.tensor([[0, 0, 8, 8]] * 3)
        >>> batches = crop_batches(torch.rand(2, 3, 16, 16), torch.tensor([0, 1, 1]), boxes, 4, batch_size=2)
        >>> [b.shape[0] for b in batches]
        [2, 1]
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    starts = list(range(0, boxes.shape[0], batch_size))
    if not prefetch or images.device.type != "cuda" or len(starts) < 2:
        for s in starts:
            yield crop_images(images, sample_index[s : s + batch_size], boxes[s : s + batch_size], size)
        return
    main = torch.cuda.current_stream(images.device)
    side = torch.cuda.Stream(device=images.device)
    side.wait_stream(main)  # the images and boxes were made on the current stream

    def cut(s: int) -> Tensor:
        with torch.cuda.stream(side):
            return crop_images(images, sample_index[s : s + batch_size], boxes[s : s + batch_size], size)

    ready = cut(starts[0])
    for following in [*starts[1:], None]:
        main.wait_stream(side)  # this batch is cut before the caller's work on it starts
        ready.record_stream(main)  # and its memory stays reserved until that work is done
        current = ready
        if following is not None:
            ready = cut(following)  # queued now: runs while the caller encodes ``current``
        yield current


def crop_masks(masks: Tensor, boxes: Tensor, image_size: tuple[int, int], size: int) -> Tensor:
    """Cut each pair's box out of its own whole-image mask and resize it.

    Args:
        masks: bool ``[P, mh, mw]`` (working resolution, covering the whole image).
        boxes: ``[P, 4]`` in input pixels.
        image_size: ``(H, W)`` of the input.
        size: Output side.

    Returns:
        bool ``[P, size, size]``.
    """
    if masks.shape[0] == 0:
        return torch.zeros(0, size, size, dtype=torch.bool, device=masks.device)
    mh, mw = masks.shape[1:]
    scale = torch.tensor([mw / image_size[1], mh / image_size[0]] * 2, device=masks.device)
    scaled = boxes.to(masks.device).float() * scale
    idx = torch.arange(masks.shape[0], device=masks.device, dtype=torch.float32)
    rois = torch.cat([idx[:, None], scaled], dim=1)
    out = _roi_align(masks[:, None].float(), rois, (size, size))
    return out[:, 0] >= 0.5


def preview_images(
    crops: Tensor, masks: Tensor | None = None, dim: float = 0.35, color: tuple[int, int, int] = (255, 220, 0)
) -> Tensor:
    """``uint8`` previews: the crop dimmed outside the region and the region outlined.

    Args:
        crops: float ``[n, 3, s, s]`` in ``[0, 1]``.
        masks: bool ``[n, s, s]``; ``None`` leaves the crops as they are.
        dim: Brightness kept outside the region.
        color: Outline colour.

    Returns:
        uint8 ``[n, 3, s, s]``.

    Example:
        >>> m = torch.zeros(1, 8, 8, dtype=torch.bool); m[:, 2:6, 2:6] = True
        >>> p = preview_images(torch.ones(1, 3, 8, 8), m)
        >>> p.dtype, p[0, :, 0, 0].tolist(), p[0, :, 2, 2].tolist(), p[0, :, 4, 4].tolist()
        (torch.uint8, [89, 89, 89], [255, 220, 0], [255, 255, 255])
    """
    img = crops.float().clamp(0, 1)  # a new tensor: the rest works on it in place (half the time of copies)
    if masks is not None:
        inside = masks[:, None].bool()
        img.mul_(torch.where(inside, 1.0, dim))  # one factor per pixel for the three channels
        edge = inside & ~_eroded(inside)
        for channel, value in enumerate(color):
            img[:, channel : channel + 1].masked_fill_(edge, value / 255.0)
    return img.mul_(255).round_().to(torch.uint8)


def _eroded(mask: Tensor) -> Tensor:
    """A bool mask ``[..., H, W]`` eroded by a 3x3 square, pixels outside the image left out of each window.

    The minimum over a square is a minimum over its rows of a minimum over its columns, so two in-place ANDs per
    direction do what a 3x3 min-pool does, without the pool's float copy (a tenth of the time on a CPU).

    Example:
        >>> m = torch.ones(1, 4, 4, dtype=torch.bool); m[0, 0, 3] = False
        >>> _eroded(m).int().tolist()
        [[[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]]
    """
    rows = mask.clone()
    rows[..., 1:] &= mask[..., :-1]
    rows[..., :-1] &= mask[..., 1:]
    out = rows.clone()
    out[..., 1:, :] &= rows[..., :-1, :]
    out[..., :-1, :] &= rows[..., 1:, :]
    return out


def random_boxes(
    count: int, image_size: tuple[int, int], side_fractions: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """Random square-ish boxes whose sides are drawn from ``side_fractions`` (fractions of each image side).

    Boxes drawn anew on every call; the explanation's control crops use :func:`pooled_control_boxes`, whose boxes
    repeat across rounds and layers.

    Args:
        count: Number of boxes.
        image_size: ``(H, W)``.
        side_fractions: ``[M, 2]`` ``(width/W, height/H)`` fractions to draw from (with replacement).
        generator: CPU random generator for reproducibility.

    Returns:
        int64 ``[count, 4]`` on the CPU.
    """
    height, width = image_size
    if side_fractions.numel() == 0:
        side_fractions = torch.full((1, 2), 0.5)
    fr = side_fractions.cpu().float()
    pick = torch.randint(0, fr.shape[0], (count,), generator=generator)
    bw = (fr[pick, 0] * width).clamp(1, width)
    bh = (fr[pick, 1] * height).clamp(1, height)
    x0 = torch.rand(count, generator=generator) * (width - bw)
    y0 = torch.rand(count, generator=generator) * (height - bh)
    return torch.stack([x0, y0, x0 + bw, y0 + bh], dim=1).round().long()


#: Size classes per image side of the control crops (:func:`pooled_control_boxes`): a crop's side is the centre of
#: one of these equal bins of ``(0, 1]``, so sizes are matched to within 1/16 of the side.
CONTROL_SIZE_BINS = 8


def pooled_control_boxes(
    sample_ids: Tensor,
    slots: int,
    image_size: tuple[int, int],
    side_fractions: Tensor,
    seed: int = 0,
    bins: int = CONTROL_SIZE_BINS,
) -> Tensor:
    """Control boxes whose sizes follow ``side_fractions``, drawn so that equal draws give equal boxes.

    Each sample has a fixed pool of boxes, one per size class (``bins`` classes per side), at a position that
    depends on the sample, the class and the seed only. Slot ``j`` of sample ``s`` takes the class that a fixed
    uniform number of ``(s, j)`` falls on in the distribution of ``side_fractions``' classes (inverse-CDF sampling
    with common random numbers). So two layers or two rounds whose top boxes have similar sizes get mostly the same
    boxes (which the region-embedding cache embeds once), while each set still depends on its own sizes alone.

    Args:
        sample_ids: int64 ``[S]`` the probe sample ids (stable across rounds, unlike bank rows).
        slots: Boxes per sample.
        image_size: ``(H, W)``.
        side_fractions: ``[M, 2]`` ``(width/W, height/H)`` of the boxes whose sizes are matched.
        seed: The explanation's seed.
        bins: Size classes per side.

    Returns:
        int64 ``[S * slots, 4]`` on the CPU, slot-major (all samples' slot 0, then slot 1, ...).

    Example:
        >>> fr = torch.tensor([[0.5, 0.5], [0.25, 0.25]])
        >>> a = pooled_control_boxes(torch.arange(3), 2, (64, 64), fr)
        >>> b = pooled_control_boxes(torch.arange(3), 2, (64, 64), fr[[1, 0]])
        >>> a.shape, torch.equal(a, b)
        (torch.Size([6, 4]), True)
    """
    from lightning_neurons.explanation.seeding import hashed_uniform

    height, width = image_size
    ids = sample_ids.long().cpu()
    fr = side_fractions.cpu().float().reshape(-1, 2)
    if fr.numel() == 0:
        fr = torch.full((1, 2), 0.5)
    classes = (fr * bins).floor().long().clamp(0, bins - 1)
    counts = torch.bincount(classes[:, 0] * bins + classes[:, 1], minlength=bins * bins).double()
    cdf = counts.cumsum(0) / counts.sum()
    slot = torch.arange(slots).repeat_interleave(ids.numel())
    sample = ids.repeat(slots)
    u = hashed_uniform(torch.stack([sample, slot], 1), seed, "control size")
    pick = torch.searchsorted(cdf, u, right=True).clamp(max=bins * bins - 1)
    bw = (((pick // bins).double() + 0.5) / bins * width).round().clamp(1, width)
    bh = (((pick % bins).double() + 0.5) / bins * height).round().clamp(1, height)
    where = torch.stack([sample, pick], 1)
    x0 = (hashed_uniform(where, seed, "control x") * (width - bw + 1)).floor()
    y0 = (hashed_uniform(where, seed, "control y") * (height - bh + 1)).floor()
    return torch.stack([x0, y0, x0 + bw, y0 + bh], dim=1).long()


def snap_boxes(boxes: Tensor, image_size: tuple[int, int], cells: int) -> Tensor:
    """Move box edges to the nearest line of a grid of ``cells`` steps per image side (``cells <= 0``: unchanged).

    Along each side, a box at least half the image long uses a grid twice as coarse (``cells / 2`` steps), so an
    edge moves by at most a sixteenth of the box's length and by at most a ``2 * cells``-th of the image for smaller
    boxes (a small region keeps its place). A region whose activation moves a little between rounds keeps its box,
    so its crop is embedded once (the region-embedding cache) and merges with its neighbours (deduplication). A box
    never shrinks below one step.

    Example:
        >>> snap_boxes(torch.tensor([[5, 7, 30, 33], [3, 3, 50, 60]]), (64, 64), 8).tolist()
        [[8, 8, 32, 32], [0, 0, 48, 64]]
    """
    if cells <= 0 or boxes.numel() == 0:
        return boxes
    height, width = image_size
    out = boxes.clone()
    for lo, hi, side in ((0, 2, width), (1, 3, height)):
        large = (boxes[:, hi] - boxes[:, lo]) * 2 >= side
        steps = torch.where(large, max(1, cells // 2), cells)
        first = torch.div(boxes[:, lo] * steps * 2 + side, side * 2, rounding_mode="floor").clamp(min=0)
        first = torch.minimum(first, steps - 1)
        last = torch.minimum(torch.div(boxes[:, hi] * steps * 2 + side, side * 2, rounding_mode="floor"), steps)
        last = torch.maximum(last, first + 1)
        out[:, lo] = first * side // steps
        out[:, hi] = last * side // steps
    return out


def box_area_fraction(boxes: Tensor, image_size: tuple[int, int]) -> float:
    """Mean area of boxes as a fraction of the image (a summary statistic for ``meta``)."""
    if boxes.numel() == 0:
        return math.nan
    b = boxes.float()
    return float(((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).mean() / (image_size[0] * image_size[1]))


__all__ = [
    "CONTROL_SIZE_BINS",
    "box_area_fraction",
    "box_iou_matrix",
    "crop_batches",
    "crop_images",
    "crop_masks",
    "dedupe_boxes",
    "check_image_inputs",
    "images_from_inputs",
    "mask_boxes",
    "MaskRuns",
    "pad_boxes",
    "peak_component",
    "peak_runs",
    "preview_images",
    "quantile_from_sorted",
    "pooled_control_boxes",
    "random_boxes",
    "snap_boxes",
    "region_boxes",
    "region_masks",
    "threshold_masks",
    "unit_thresholds",
    "working_size",
]
