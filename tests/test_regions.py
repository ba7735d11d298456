import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from lightning_neurons.regions import (
    box_iou_matrix,
    crop_images,
    crop_masks,
    dedupe_boxes,
    images_from_inputs,
    pad_boxes,
    pooled_control_boxes,
    preview_images,
    random_boxes,
    region_boxes,
    snap_boxes,
    unit_thresholds,
)


def test_images_from_inputs_mean_std_and_minmax():
    x = torch.rand(2, 3, 8, 8)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.4)
    norm = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    assert torch.allclose(images_from_inputs(norm, mean, std), x, atol=1e-5)
    mm = images_from_inputs(norm)
    assert mm.amin(dim=(1, 2, 3)).tolist() == [0.0, 0.0] and mm.amax(dim=(1, 2, 3)).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="image inputs"):
        images_from_inputs(torch.zeros(2, 5))


def test_unit_thresholds_match_torch_quantile_and_ignore_invalid():
    g = torch.Generator().manual_seed(0)
    top = torch.rand(3, 4, 5, 5, generator=g)
    control = torch.rand(3, 50, generator=g)
    valid = torch.tensor([[True] * 4, [True, True, False, False], [False] * 4])
    thr = unit_thresholds(top, control, 0.9, valid)
    for u in range(3):
        vals = torch.cat([top[u][valid[u]].flatten(), control[u]])
        assert thr[u].item() == pytest.approx(torch.quantile(vals, 0.9).item(), abs=1e-6)
    # NaN / inf activations are ignored, a unit without data gets inf
    top[0, 0, 0, 0] = float("nan")
    assert torch.isfinite(unit_thresholds(top, control, 0.9)).all()
    assert unit_thresholds(torch.full((1, 2, 3, 3), float("nan")), None, 0.9).item() == float("inf")


def test_region_box_follows_peak_component_and_fallback():
    maps = torch.zeros(3, 8, 8)
    maps[0, 1:3, 1:3] = 2.0  # strongest blob, top-left
    maps[0, 5:7, 5:7] = 1.5  # second blob, also above threshold
    maps[1] = maps[0]
    maps[2, 4, 4] = 0.3  # below the quantile threshold -> relative fallback
    thr = torch.tensor([1.0, 1.0, 1.0])
    peak, _ = region_boxes(maps, thr, (64, 64), padding=0.0, min_size=0.0, square=False, mask_size=64)
    whole, _ = region_boxes(maps, thr, (64, 64), padding=0.0, min_size=0.0, square=False, mask_size=64, component="all")
    # blob rows/cols 1:3 of an 8x8 map over 64 px -> pixels 8..24 (bilinear half-way crossing)
    assert torch.allclose(peak[0].float(), torch.tensor([10.0, 10.0, 22.0, 22.0]), atol=3)
    assert whole[0, 2] > 50 and whole[0, 0] < 14  # the whole mask spans both blobs
    cx, cy = (peak[2, 0] + peak[2, 2]) / 2, (peak[2, 1] + peak[2, 3]) / 2
    assert abs(cx.item() - 36) <= 4 and abs(cy.item() - 36) <= 4  # fallback region around the lone peak


def test_pad_boxes_square_min_size_and_inside_image():
    boxes = torch.tensor([[0, 0, 10, 4], [90, 90, 100, 100], [40, 40, 41, 41]])
    out = pad_boxes(boxes, (100, 100), padding=0.1, min_size=0.2, square=True)
    w, h = out[:, 2] - out[:, 0], out[:, 3] - out[:, 1]
    assert (w == h).all() and (w >= 20).all()
    assert (out >= 0).all() and (out <= 100).all()
    assert out[1].tolist() == [80, 80, 100, 100]


def test_linear_maps_use_whole_image():
    boxes, masks = region_boxes(torch.ones(4, 1, 1), torch.zeros(4), (30, 40), return_masks=True)
    assert boxes.tolist() == [[0, 0, 40, 30]] * 4 and masks.all()


def test_dedupe_boxes_merges_overlaps_of_same_sample_only():
    samples = torch.tensor([0, 0, 0, 0, 1, 1])
    boxes = torch.tensor(
        [
            [0, 0, 100, 100],
            [0, 0, 100, 100],  # exact duplicate
            [0, 0, 95, 100],  # IoU 0.95 -> merged
            [50, 50, 100, 100],  # IoU 0.25 -> own crop
            [0, 0, 100, 100],  # same box, other sample -> own crop
            [1, 1, 100, 100],
        ]
    )
    keep, assign = dedupe_boxes(samples, boxes, 0.8)
    assert keep.numel() == 3
    assert assign[0] == assign[1] == assign[2] != assign[3]
    assert assign[4] == assign[5] and assign[4] != assign[0]
    # every box maps to a kept box of the same sample with IoU > 0.8 (or itself)
    rep = keep[assign]
    assert (samples[rep] == samples).all()
    ious = box_iou_matrix(boxes, boxes)[torch.arange(6), rep]
    assert (ious > 0.8).all() | (rep == torch.arange(6)).all()


def test_dedupe_many_random_boxes_is_consistent():
    g = torch.Generator().manual_seed(1)
    n = 400
    samples = torch.randint(0, 20, (n,), generator=g)
    xy = torch.randint(0, 40, (n, 2), generator=g)
    side = torch.randint(8, 24, (n, 1), generator=g)
    boxes = torch.cat([xy, xy + side], dim=1)
    keep, assign = dedupe_boxes(samples, boxes, 0.8)
    rep = keep[assign]
    assert (samples[rep] == samples).all()
    iou = box_iou_matrix(boxes, boxes)[torch.arange(n), rep]
    assert (iou > 0.8).all()
    # kept boxes of one sample do not overlap above the threshold
    kb, ks = boxes[keep], samples[keep]
    m = box_iou_matrix(kb, kb)
    same = (ks[:, None] == ks[None]) & ~torch.eye(keep.numel(), dtype=torch.bool)
    assert (m[same] <= 0.8).all()


def test_crop_images_and_masks():
    img = torch.zeros(1, 3, 20, 20, dtype=torch.uint8)
    img[0, 0, 5:15, 5:15] = 255
    crops = crop_images(img, torch.tensor([0]), torch.tensor([[5, 5, 15, 15]]), 8)
    assert crops.shape == (1, 3, 8, 8) and torch.allclose(crops[0, 0, 1:-1, 1:-1], torch.ones(6, 6))
    assert crops[0, 0].min() > 0.75  # bilinear sampling blends only the outermost ring
    assert crops[0, 1:].abs().max() == 0
    masks = torch.zeros(1, 20, 20, dtype=torch.bool)
    masks[0, 5:10] = True
    cut = crop_masks(masks, torch.tensor([[0, 0, 20, 20]]), (20, 20), 10)
    assert cut[0, 3:5].all() and not cut[0, 6:].any()


def test_preview_images_outline_and_dim():
    crops = torch.ones(2, 3, 16, 16)
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[:, 4:12, 4:12] = True
    prev = preview_images(crops, masks)
    assert prev.dtype == torch.uint8 and prev.shape == (2, 3, 16, 16)
    assert prev[0, :, 8, 8].tolist() == [255, 255, 255]
    assert prev[0, :, 4, 8].tolist() == [255, 220, 0]
    assert prev[0, 0, 0, 0] < 100


def test_random_boxes_inside_image():
    g = torch.Generator().manual_seed(0)
    b = random_boxes(50, (32, 48), torch.tensor([[0.5, 0.5], [1.0, 1.0]]), g)
    assert (b[:, 0] >= 0).all() and (b[:, 2] <= 48).all() and (b[:, 3] <= 32).all()
    assert ((b[:, 2] - b[:, 0]) >= 23).all()


def _top_box_fractions(count, generator):
    return torch.rand(count, 2, generator=generator) * 0.6 + 0.2


def test_control_boxes_follow_the_sizes_inside_the_image():
    g = torch.Generator().manual_seed(0)
    fr = _top_box_fractions(400, g)
    boxes = pooled_control_boxes(torch.arange(500), 2, (32, 48), fr, seed=3)
    assert boxes.shape == (1000, 4)
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 48).all() and (boxes[:, 3] <= 32).all()
    assert ((boxes[:, 2:] - boxes[:, :2]) >= 1).all()
    # the mean side matches the top boxes' to within the size classes' half width
    sides = (boxes[:, 2:] - boxes[:, :2]).float() / torch.tensor([48.0, 32.0])
    assert torch.allclose(sides.mean(0), fr.mean(0), atol=1 / 16 + 0.02)


def test_control_boxes_repeat_across_rounds_and_layers_with_similar_sizes():
    # The region-embedding cache only helps if a layer's control crops repeat when its top boxes barely change.
    # Before, the crops were drawn from a generator over the boxes in their order, so any reordering of units or
    # one more box redrew every crop: the second round re-embedded all of them.
    g = torch.Generator().manual_seed(1)
    fr = _top_box_fractions(300, g)
    ids = torch.arange(100, 300)
    first = pooled_control_boxes(ids, 2, (96, 96), fr, seed=0)
    later = torch.cat([fr[torch.randperm(300, generator=g)][:285], _top_box_fractions(15, g)])  # 5% new boxes
    second = pooled_control_boxes(ids, 2, (96, 96), later, seed=0)
    shared = (first == second).all(1).float().mean().item()
    assert shared > 0.8, shared
    # ... and each set depends on its own sizes alone: another seed or other sizes give other boxes
    assert (pooled_control_boxes(ids, 2, (96, 96), fr, seed=1) != first).any(1).float().mean() > 0.5
    small = pooled_control_boxes(ids, 2, (96, 96), torch.full((5, 2), 0.15), seed=0)
    assert ((small[:, 2:] - small[:, :2]) == 18).all()  # the centre of the 1/8-wide size class of 0.15


def test_snapped_boxes_sit_on_the_grid_within_half_a_step():
    g = torch.Generator().manual_seed(2)
    x0 = torch.randint(0, 80, (500,), generator=g)
    y0 = torch.randint(0, 60, (500,), generator=g)
    boxes = torch.stack([x0, y0, x0 + torch.randint(7, 17, (500,), generator=g), y0 + 5 + y0 % 9], 1)  # >= a step
    snapped = snap_boxes(boxes, (72, 96), 16)
    step = torch.tensor([6, 4.5, 6, 4.5])
    on_grid = snapped.float() / step
    assert torch.allclose(on_grid, on_grid.round(), atol=0.12)  # integer pixels of a 4.5 px step
    assert ((snapped - boxes).abs().float() <= step / 2 + 1).all()
    assert (snapped[:, 2] > snapped[:, 0]).all() and (snapped[:, 3] > snapped[:, 1]).all()
    assert (snapped[:, 2] <= 96).all() and (snapped[:, 3] <= 72).all()
    # a region that moves by a pixel keeps its box; 0 cells leaves boxes as they are
    a = snap_boxes(torch.tensor([[13, 13, 40, 40]]), (96, 96), 16)
    assert torch.equal(a, snap_boxes(torch.tensor([[14, 12, 41, 39]]), (96, 96), 16))
    assert torch.equal(snap_boxes(boxes, (72, 96), 0), boxes)
    assert snap_boxes(torch.tensor([[40, 40, 41, 41]]), (96, 96), 16).tolist() == [[42, 42, 48, 48]]  # one step
    # a box at least half the image long moves on a grid half as fine: at most 1/16 of its length
    large = torch.tensor([[3, 10, 60, 50], [20, 2, 90, 94]])
    snapped_large = snap_boxes(large, (96, 96), 16)
    assert (snapped_large % 12 == 0).all() and ((snapped_large - large).abs() <= 6).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_peak_component_scipy_and_torch_agree(seed):
    from lightning_neurons.regions import peak_component

    g = torch.Generator().manual_seed(seed)
    num, height, width = 48, 5 + 7 * seed, 31 - 6 * seed
    mask = torch.rand(num, height, width, generator=g) < torch.rand(num, 1, 1, generator=g)
    peak = torch.randint(0, height * width, (num,), generator=g)
    mask.view(num, -1)[torch.arange(num), peak] = True
    # a long snake in the first map: many steps for a one-pixel flood fill
    mask[0] = False
    mask[0, ::2] = True
    mask[0, 1::4, -1] = True
    mask[0, 3::4, 0] = True
    peak[0] = 0
    a = peak_component(mask, peak, method="scipy")
    b = peak_component(mask, peak, method="torch")
    assert torch.equal(a, b)
    assert a.view(num, -1)[torch.arange(num), peak].all() and not (a & ~mask).any()
    assert a[0].sum() == mask[0].sum()  # the snake is one component
    with pytest.raises(ValueError, match="method"):
        peak_component(mask, peak, method="nope")


def _scipy_reference_boxes(maps, thr, image_size, **kw):
    """Boxes of the peak's component labelled by SciPy (the implementation before the run graph)."""
    from lightning_neurons.regions import mask_boxes, pad_boxes, peak_component, threshold_masks, working_size

    mask_hw = working_size(image_size, kw.pop("mask_size", 112))
    mask, peak = threshold_masks(maps, thr, mask_hw)
    comp = peak_component(mask, peak, method="scipy")
    return pad_boxes(mask_boxes(comp, image_size), image_size), comp


def test_region_boxes_match_scipy_labelling_without_importing_scipy(monkeypatch):
    import sys

    g = torch.Generator().manual_seed(3)
    maps = torch.nn.functional.interpolate(torch.randn(40, 1, 7, 7, generator=g), size=(14, 14), mode="bilinear")
    maps = maps[:, 0]
    thr = maps.flatten(1).quantile(0.9, dim=1)
    ref, ref_masks = _scipy_reference_boxes(maps, thr, (224, 224))
    monkeypatch.setitem(sys.modules, "scipy", None)  # any SciPy import now raises
    monkeypatch.setitem(sys.modules, "scipy.ndimage", None)
    out, out_masks = region_boxes(maps, thr, (224, 224), return_masks=True)
    assert torch.equal(ref, out) and torch.equal(ref_masks, out_masks)
    out_chunked, masks_chunked = region_boxes(maps, thr, (224, 224), chunk_size=7, return_masks=True)
    assert torch.equal(ref, out_chunked) and torch.equal(ref_masks, masks_chunked)


def test_peak_component_connectivity_cases():
    """8-connectivity exactly: diagonal steps join, masks stacked in one batch never join each other."""
    from lightning_neurons.regions import peak_component

    m = torch.zeros(4, 6, 6, dtype=torch.bool)
    m[0, [0, 1, 2, 3], [0, 1, 2, 3]] = True  # a diagonal line: one component under 8-connectivity
    m[1, 5, :] = True  # last row of mask 1 ...
    m[2, 0, :] = True  # ... and first row of mask 2 are adjacent in memory, not in the image
    m[2, 2, 0] = True  # an isolated pixel two rows down: its own component
    m[3] = True  # a full mask
    peak = torch.tensor([0, 30, 3, 35])
    out = peak_component(m, peak)
    assert torch.equal(out[0], m[0]) and torch.equal(out[1], m[1]) and torch.equal(out[3], m[3])
    assert out[2, 0].all() and not out[2, 2, 0]
    assert torch.equal(out, peak_component(m, peak, method="scipy"))


@pytest.mark.parametrize("seed", [0, 1])
def test_region_boxes_same_as_scipy_on_noisy_maps_of_every_scale(seed):
    g = torch.Generator().manual_seed(10 + seed)
    for side in (7, 28, 112):  # ResNet layer4 / layer2 / conv1 map sizes against a 112 working mask
        maps = torch.randn(64, side, side, generator=g)
        maps = maps + torch.nn.functional.avg_pool2d(maps[:, None], 3, 1, 1)[:, 0] * 3
        thr = maps.flatten(1).quantile(torch.rand(1, generator=g).item() * 0.5 + 0.5, dim=1)
        ref, ref_masks = _scipy_reference_boxes(maps, thr, (224, 224))
        out, out_masks = region_boxes(maps, thr, (224, 224), return_masks=True)
        assert torch.equal(ref, out) and torch.equal(ref_masks, out_masks), side


def test_dedupe_matches_greedy_nms_with_ties():
    """Same crops and assignment as torchvision's greedy nms per sample (larger first, ties by position)."""
    from torchvision.ops import nms

    g = torch.Generator().manual_seed(6)
    n = 1500  # above torchvision's 1,000-box switch to a Python loop over samples
    samples = torch.randint(0, 30, (n,), generator=g)
    xy = torch.randint(0, 12, (n, 2), generator=g)
    boxes = torch.cat([xy, xy + torch.randint(20, 24, (n, 1), generator=g)], dim=1)  # many equal areas
    keep, assign = dedupe_boxes(samples, boxes, 0.8, pair_budget=5000)
    # reference: exact duplicates, then one nms over sample-offset boxes, then best-IoU assignment
    uniq, inverse = torch.unique(torch.cat([samples[:, None], boxes], 1), dim=0, return_inverse=True)
    ub, us = uniq[:, 1:].float(), uniq[:, 0]
    area = (ub[:, 2] - ub[:, 0]) * (ub[:, 3] - ub[:, 1])
    kept = nms(ub + us[:, None].float() * 1000, area, 0.8)
    kept = kept[torch.argsort(us[kept], stable=True)]
    iou = box_iou_matrix(ub, ub[kept])
    iou[us[:, None] != us[kept][None]] = -1
    first = torch.full((uniq.shape[0],), n).scatter_reduce(0, inverse, torch.arange(n), reduce="amin")
    assert torch.equal(keep, first[kept])
    assert torch.equal(assign, iou.argmax(dim=1)[inverse])


def test_unit_thresholds_partial_selection_matches_sort():
    g = torch.Generator().manual_seed(4)
    top = torch.randn(6, 5, 9, 9, generator=g)
    control = torch.randn(6, 400, generator=g)
    control[1, :7] = float("inf")
    valid = torch.rand(6, 5, generator=g) > 0.4
    valid[2] = False
    for q in (0.995, 0.9, 0.3, 1.0, 0.0):
        thr = unit_thresholds(top, control, q, valid)
        for u in range(6):
            vals = torch.cat([top[u][valid[u]].flatten(), control[u]])
            vals = vals[torch.isfinite(vals)]
            assert thr[u].item() == pytest.approx(torch.quantile(vals, q).item(), abs=1e-5), (q, u)


def test_region_step_is_fast_at_resnet_scale():
    import time

    g = torch.Generator().manual_seed(5)
    maps = torch.nn.functional.interpolate(torch.randn(512, 1, 28, 28, generator=g), size=(56, 56), mode="bilinear")
    maps = maps[:, 0] + 0.05 * torch.randn(512, 56, 56, generator=g)
    thr = maps.flatten(1).quantile(0.995, dim=1)
    region_boxes(maps[:4], thr[:4], (224, 224))
    t0 = time.perf_counter()
    boxes, _ = region_boxes(maps, thr, (224, 224))
    seconds = time.perf_counter() - t0
    assert boxes.shape == (512, 4)
    assert seconds < 5.0, f"region step took {seconds:.2f} s for 512 pairs (was ~20 s with the iterated flood fill)"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_region_stage_on_cuda_matches_cpu_and_stays_on_device():
    g = torch.Generator().manual_seed(7)
    maps = torch.nn.functional.interpolate(torch.randn(300, 1, 7, 7, generator=g), size=(28, 28), mode="bilinear")[:, 0]
    thr = maps.flatten(1).quantile(0.95, dim=1)
    ref, ref_masks = region_boxes(maps, thr, (224, 224), return_masks=True)
    out, out_masks = region_boxes(maps.cuda(), thr.cuda(), (224, 224), return_masks=True)
    assert out.is_cuda and out_masks is not None and out_masks.is_cuda
    assert torch.equal(ref, out.cpu()) and torch.equal(ref_masks, out_masks.cpu())
    samples = torch.randint(0, 20, (300,), generator=g)
    keep, assign = dedupe_boxes(samples, ref)
    keep_c, assign_c = dedupe_boxes(samples.cuda(), out)
    assert keep_c.is_cuda and torch.equal(keep, keep_c.cpu()) and torch.equal(assign, assign_c.cpu())


def _crop_jobs(device):
    g = torch.Generator().manual_seed(8)
    images = torch.randint(0, 256, (6, 3, 40, 40), dtype=torch.uint8, generator=g)
    xy = torch.randint(0, 20, (23, 2), generator=g)
    boxes = torch.cat([xy, xy + torch.randint(4, 20, (23, 1), generator=g)], dim=1)
    return images.to(device), torch.randint(0, 6, (23,), generator=g).to(device), boxes.to(device)


def test_crop_batches_are_crop_images_in_order():
    from lightning_neurons.regions import crop_batches

    images, idx, boxes = _crop_jobs("cpu")
    whole = crop_images(images, idx, boxes, 16)
    batches = list(crop_batches(images, idx, boxes, 16, 5))
    assert [b.shape[0] for b in batches] == [5, 5, 5, 5, 3]
    assert torch.equal(torch.cat(batches), whole)
    with pytest.raises(ValueError, match="batch_size"):
        list(crop_batches(images, idx, boxes, 16, 0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_crop_batches_prefetch_on_a_side_stream_gives_the_same_crops():
    from lightning_neurons.regions import crop_batches

    images, idx, boxes = _crop_jobs("cuda")
    whole = crop_images(images, idx, boxes, 16)
    got = []
    for batch in crop_batches(images, idx, boxes, 16, 5):
        got.append((batch * 2).cpu())  # the caller's work on the current stream
    assert torch.allclose(torch.cat(got), (whole * 2).cpu(), atol=1e-6)


@pytest.mark.parametrize("size", [224, 64, (40, 70)])
def test_crops_are_torchvisions_roi_align_whether_they_are_upsampled_or_shrunk(size: int | tuple[int, int]) -> None:
    from torchvision.ops import roi_align

    from lightning_neurons.regions import _upsample_rois

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 150, 150), generator=generator, dtype=torch.uint8)
    index = torch.randint(0, 6, (120,), generator=generator)
    corner = torch.randint(0, 75, (120, 2), generator=generator)
    sides = torch.randint(1, 75, (120, 2), generator=generator)  # some boxes smaller than the output, some larger
    boxes = torch.cat([corner, corner + sides], dim=1)
    out_hw = (size, size) if isinstance(size, int) else size
    rois = torch.cat([index[:, None].float(), boxes.float()], dim=1)
    expected = roi_align(images.float() / 255, rois, out_hw, 1.0, -1, True).clamp(0, 1)
    torch.testing.assert_close(crop_images(images, index, boxes, size), expected, atol=1e-4, rtol=0)
    small = (sides[:, 0] <= out_hw[1]) & (sides[:, 1] <= out_hw[0])
    assert 0 < int(small.sum()) < 120 or size == 224  # the mixed case ran (every box fits in 224 px)
    direct = _upsample_rois(images.float() / 255, rois[small], out_hw).clamp(0, 1)
    torch.testing.assert_close(direct, expected[small], atol=1e-4, rtol=0)


def test_preview_outlines_are_the_3x3_min_pool_edge_of_the_mask() -> None:
    import torch.nn.functional as F

    from lightning_neurons.regions import preview_images

    generator = torch.Generator().manual_seed(1)
    for height, width in [(1, 1), (2, 5), (17, 9), (64, 64)]:
        crops = torch.rand(5, 3, height, width, generator=generator)
        masks = torch.rand(5, height, width, generator=generator) > 0.3
        m = masks[:, None].float()
        edge = (m - -F.max_pool2d(-m, 3, stride=1, padding=1)) > 0  # inside pixels with an outside neighbour
        dimmed = crops * (m + (1 - m) * 0.35)
        colour = torch.tensor([255.0, 220.0, 0.0]).reshape(1, 3, 1, 1) / 255.0
        expected = (torch.where(edge, colour.expand_as(crops), dimmed) * 255).round().to(torch.uint8)
        given = crops.clone()
        assert torch.equal(preview_images(crops, masks), expected)
        assert torch.equal(crops, given)  # the caller's crops are left as they were


def test_crops_of_large_photos_are_cut_a_few_at_a_time_and_come_out_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_neurons.regions as regions

    generator = torch.Generator().manual_seed(2)
    images = torch.rand(3, 3, 120, 120, generator=generator)
    index = torch.randint(0, 3, (23,), generator=generator)
    corner = torch.randint(0, 60, (23, 2), generator=generator)
    boxes = torch.cat([corner, corner + torch.randint(4, 60, (23, 2), generator=generator)], dim=1)
    whole = crop_images(images, index, boxes, 64)
    calls: list[int] = []
    grid_sample = torch.nn.functional.grid_sample
    monkeypatch.setattr(regions, "_GRID_SOURCE_FLOATS", 5 * 3 * 120 * 120)  # room for 5 source images a call
    counted = lambda x, *a, **k: calls.append(x.shape[0]) or grid_sample(x, *a, **k)  # noqa: E731
    monkeypatch.setattr(regions.F, "grid_sample", counted)
    assert torch.equal(crop_images(images, index, boxes, 64), whole)
    assert calls and max(calls) == 5
