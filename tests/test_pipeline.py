"""Planted ground truth: shapes with known concepts, units built to detect them, an encoder that knows them."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Sequence

import pytest
import torch
from torch import Tensor, nn

from lightning_neurons.backends.base import Backend
from lightning_neurons.explanation.pipeline import ExplainConfig, explain_recording
from lightning_neurons.recording.types import LayerTopK, Recording
from lightning_neurons.recording.units import infer_kind, reduce_maps, unit_maps
from lightning_neurons.regions import box_iou_matrix

CONCEPTS = ["red", "green", "blue", "stripes"]  # planted concepts, unit i detects CONCEPTS[i]
VOCAB = [*CONCEPTS, "grey background", "dog", "car", "everything"]
SIZE = 64


# ---------------------------------------------------------------- data
def make_data(n: int = 96, seed: int = 0) -> tuple[Tensor, Tensor, list[dict[int, tuple[int, int, int, int]]]]:
    """Grey images with two shapes of two different concepts; returns images, labels, planted boxes."""
    g = torch.Generator().manual_seed(seed)
    images = torch.full((n, 3, SIZE, SIZE), 0.5)
    planted = []
    rows = torch.arange(SIZE)[:, None].expand(SIZE, SIZE)
    for i in range(n):
        concepts = torch.randperm(4, generator=g)[:2].tolist()
        quads = torch.randperm(4, generator=g)[:2].tolist()
        boxes = {}
        for c, q in zip(concepts, quads):
            side = int(torch.randint(14, 20, (1,), generator=g))
            ox, oy = (q % 2) * 32, (q // 2) * 32
            x0 = ox + int(torch.randint(2, 32 - side - 1, (1,), generator=g))
            y0 = oy + int(torch.randint(2, 32 - side - 1, (1,), generator=g))
            region = images[i, :, y0 : y0 + side, x0 : x0 + side]
            if c < 3:
                region[:] = 0.0
                region[c] = 1.0
            else:
                stripe = ((rows[y0 : y0 + side, x0 : x0 + side] // 2) % 2 == 0).float() * 0.8 + 0.1
                region[:] = stripe[None]
            boxes[c] = (x0, y0, x0 + side, y0 + side)
        planted.append(boxes)
    labels = torch.tensor([min(p) for p in planted])
    return images, labels, planted


class ListSource:
    """A SampleSource over in-memory tensors."""

    def __init__(self, inputs: Tensor, labels: Tensor | None = None) -> None:
        self.inputs, self.labels = inputs, labels
        self.calls = 0

    def fetch(self, ids: Sequence[int]) -> tuple[Tensor, Tensor | None]:
        self.calls += 1
        idx = torch.as_tensor(list(ids), dtype=torch.long)
        return self.inputs[idx], None if self.labels is None else self.labels[idx]


# ---------------------------------------------------------------- network
def detector_conv() -> nn.Conv2d:
    """Units 0-2 fire on pure red/green/blue, unit 3 on horizontal stripes of period 4."""
    conv = nn.Conv2d(3, 4, kernel_size=5, padding=2)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        for c in range(3):
            conv.weight[c, :, :, :] = -1.0 / 25
            conv.weight[c, c, :, :] = 1.0 / 25
        pattern = torch.tensor([1.0, 1.0, -1.0, -1.0, 0.0])[:, None].expand(5, 5) / 15
        conv.weight[3, :, :, :] = pattern[None]
        conv.bias[3] = -0.1
    return conv


class PlantedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.detect = detector_conv()
        self.act = nn.ReLU()
        self.pool = nn.AvgPool2d(4)  # conv layer explained: 16 x 16 maps
        self.head = nn.Linear(4, 4)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(4))
            self.head.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        maps = self.pool(self.act(self.detect(x)))
        return self.head(maps.amax(dim=(2, 3)))


class Tokens(nn.Module):
    """Identity module whose output is a token sequence (a hook point)."""

    def forward(self, x: Tensor) -> Tensor:
        return x


class PlantedViT(nn.Module):
    """Token outputs [B, 1 + 16, 4]: a class token plus a 4x4 patch grid of the detector maps; linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.detect = detector_conv()
        self.tokens = Tokens()
        self.pooled = nn.Identity()  # linear layer: [B, 4]

    def forward(self, x: Tensor) -> Tensor:
        maps = nn.functional.avg_pool2d(torch.relu(self.detect(x)), 16)  # [B, 4, 4, 4]
        patches = maps.flatten(2).transpose(1, 2)
        cls = patches.mean(dim=1, keepdim=True)
        tokens = self.tokens(torch.cat([cls, patches], dim=1))
        return self.pooled(tokens[:, 1:].amax(dim=1))


# ---------------------------------------------------------------- encoder that knows every pixel
def concept_histogram(images: Tensor) -> Tensor:
    r, g, b = images[:, 0], images[:, 1], images[:, 2]
    grey = ((r - g).abs() < 0.08) & ((g - b).abs() < 0.08)
    lum = (r + g + b) / 3
    masks = [
        (r > 0.7) & (g < 0.3) & (b < 0.3),
        (g > 0.7) & (r < 0.3) & (b < 0.3),
        (b > 0.7) & (r < 0.3) & (g < 0.3),
        grey & ((lum > 0.75) | (lum < 0.25)),
        grey & ((lum - 0.5).abs() < 0.1),
    ]
    return torch.stack([m.float().mean(dim=(1, 2)) for m in masks], dim=1)


class PlantedEncoder:
    """Image embedding: the normalised histogram of the planted concepts in the crop; texts: one-hot."""

    name = "planted"
    dim = len(VOCAB)

    def __init__(self) -> None:
        self.image_calls = 0
        self.images_seen = 0

    def encode_images(self, images: Tensor) -> Tensor:
        self.image_calls += 1
        self.images_seen += images.shape[0]
        hist = concept_histogram(images)
        out = torch.zeros(images.shape[0], self.dim)
        out[:, :5] = hist + 1e-6
        return torch.nn.functional.normalize(out, dim=1)

    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        out = torch.zeros(len(texts), self.dim)
        for i, t in enumerate(texts):
            if t == "everything":
                out[i, :5] = 1.0
            else:
                out[i, VOCAB.index(t)] = 1.0
        return torch.nn.functional.normalize(out, dim=1)


# ---------------------------------------------------------------- a minimal exact recorder (independent of recorder.py)
def record(model: nn.Module, layers: list[str], images: Tensor, top_k: int, reservoir: int = 24) -> Recording:
    modules = dict(model.named_modules())
    outs: dict[str, Tensor] = {}
    handles = [modules[n].register_forward_hook(lambda m, a, o, n=n: outs.__setitem__(n, o.detach())) for n in layers]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in handles:
            h.remove()
    result = {}
    for name in layers:
        kind = infer_kind(outs[name], name)
        maps = unit_maps(outs[name], kind)
        values, peaks = reduce_maps(maps)
        top = values.T.topk(top_k, dim=1)
        result[name] = LayerTopK(
            name=name,
            kind=kind,
            num_units=maps.shape[1],
            map_size=None if kind == "linear" else tuple(maps.shape[2:]),
            values=top.values,
            sample_ids=top.indices,
            peaks=peaks.T.gather(1, top.indices),
        )
    res = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(5))[:reservoir]
    return Recording(layers=result, reservoir_ids=res, num_samples=images.shape[0], top_k=top_k)


CFG = dict(crop_size=32, preview_size=24, show_progress=False, image_mean=(0.0, 0.0, 0.0), image_std=(1.0, 1.0, 1.0))


@pytest.fixture(scope="module")
def data():
    return make_data()


@pytest.mark.parametrize("correction", ["control", "soft_wpmi"])
def test_planted_units_are_named_and_cropped(data, correction):
    images, labels, planted = data
    model = PlantedNet().train()
    rec = record(model, ["pool"], images, top_k=8)
    encoder = PlantedEncoder()
    rnd = explain_recording(
        model,
        rec,
        ListSource(images, labels),
        Backend("planted", encoder),
        VOCAB,
        ExplainConfig(correction=correction, **CFG),
    )
    assert model.training  # training mode restored
    assert not model.pool._forward_hooks and not model.detect._forward_hooks
    for c, concept in enumerate(CONCEPTS):
        ex = rnd.get("pool", c)
        assert ex.description == concept, (c, ex.description, ex.alternatives)
        assert ex.score > 0.9 and ex.margin > 0.2
        assert len(ex.alternatives) == 4 and "everything" != ex.description
        assert len(ex.boxes) == 8 and ex.top_sample_ids == rec.layers["pool"].sample_ids[c].tolist()
        for sid, box in zip(ex.top_sample_ids, ex.boxes):
            truth = torch.tensor([planted[sid][c]])
            iou = box_iou_matrix(torch.tensor([box]), truth).item()
            assert iou > 0.45, (concept, sid, box, planted[sid][c], iou)
    meta = rnd.meta
    assert meta["units"] == 4 and meta["crops"] == 32 and meta["unique_crops"] <= 32
    assert meta["concepts"] == len(VOCAB) and meta["correction"] == correction
    assert set(meta["timings"]) >= {"forward", "regions", "embed_crops", "score"}
    # each unique crop, each control crop and each other whole image embedded exactly once
    assert encoder.images_seen == meta["unique_crops"] + meta["control_crops"] + meta["whole_images"]
    prev = rnd.previews[("pool", 0)]
    assert prev.dtype == torch.uint8 and prev.shape == (8, 3, 24, 24)


def test_token_and_linear_layers(data):
    images, labels, planted = data
    model = PlantedViT().eval()
    rec = record(model, ["tokens", "pooled"], images, top_k=6)
    assert rec.layers["tokens"].kind == "token" and rec.layers["pooled"].kind == "linear"
    rnd = explain_recording(
        model,
        rec,
        ListSource(images),
        PlantedEncoder(),
        VOCAB,
        ExplainConfig(preview_units={"tokens": [0]}, **CFG),
    )
    assert not model.training
    for c in range(3):  # colour units on the 4x4 patch grid
        ex = rnd.get("tokens", c)
        assert ex.description == CONCEPTS[c]
        for sid, box in zip(ex.top_sample_ids, ex.boxes):
            inter = box_iou_matrix(torch.tensor([box]), torch.tensor([planted[sid][c]])).item()
            assert inter > 0.2  # coarse 16-px patches: the box must still overlap the shape
    for c in range(3):  # linear units use the whole image
        ex = rnd.get("pooled", c)
        assert all(tuple(b) == (0, 0, SIZE, SIZE) for b in ex.boxes)
        assert ex.description == CONCEPTS[c]
    assert list(rnd.previews) == [("tokens", 0)]
    # whole-image crops of one sample are shared by every linear unit that has it in its top set
    lin_ids = rec.layers["pooled"].sample_ids
    assert rnd.meta["unique_crops"] <= rnd.meta["crops"] - (lin_ids.numel() - lin_ids.unique().numel())


def test_dedupe_shares_crops_between_units_of_a_layer_only(data):
    images, _, _ = data
    model = PlantedNet()
    rec = record(model, ["pool"], images, top_k=8)
    alone = explain_recording(model, rec, ListSource(images), PlantedEncoder(), VOCAB, ExplainConfig(**CFG))
    # duplicate the layer under a second name: same regions, but a layer's crops are merged within the layer only,
    # so that which box stands for a merged group never depends on the other layers explained beside it
    layer = rec.layers["pool"]
    model.pool2 = model.pool
    rec.layers["pool2"] = LayerTopK(**{**layer.to_state(), "name": "pool2"})
    encoder = PlantedEncoder()
    rnd = explain_recording(model, rec, ListSource(images), encoder, VOCAB, ExplainConfig(**CFG))
    assert rnd.meta["crops"] == 64 and rnd.meta["unique_crops"] == 2 * alone.meta["unique_crops"]
    assert rnd.get("pool2", 1).description == "green"
    assert [u.to_dict() for u in rnd.layer("pool")] == [u.to_dict() for u in alone.layer("pool")]


def test_hooks_removed_and_mode_restored_on_error(data):
    images, _, _ = data
    model = PlantedNet().train()
    rec = record(model, ["pool"], images, top_k=4)

    class Failing(ListSource):
        def fetch(self, ids):
            if self.calls == 1:
                raise RuntimeError("disk gone")
            return super().fetch(ids)

    with pytest.raises(RuntimeError, match="disk gone"):
        explain_recording(model, rec, Failing(images), PlantedEncoder(), VOCAB, ExplainConfig(batch_size=8, **CFG))
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())


def test_mismatching_model_raises_and_cleans_up(data):
    images, _, _ = data
    rec = record(PlantedNet(), ["pool"], images, top_k=4)
    other = PlantedNet()
    other.pool = nn.AvgPool2d(2)  # 32x32 maps instead of 16x16
    with pytest.raises(ValueError, match="recording"):
        explain_recording(other, rec, ListSource(images), PlantedEncoder(), VOCAB, ExplainConfig(**CFG))
    assert all(not m._forward_hooks for m in other.modules())


def test_describe_stage_keeps_better_phrase_and_ablation(data):
    images, labels, _ = data

    class Captioner:
        name = "cap"

        def caption(self, images):
            hist = concept_histogram(images)[:, :4]
            return [f"a {CONCEPTS[int(i)]} square on grey" for i in hist.argmax(dim=1)]

    class Generator:
        name = "gen"
        prompts: list[str] = []

        def generate(self, prompt, max_new_tokens=128):
            self.prompts.append(prompt)
            return f"Answer: {prompt.split('- a ')[1].split()[0]} patch.\nThe regions show..."

    class PhraseEncoder(PlantedEncoder):
        def encode_texts(self, texts):
            return super().encode_texts([t.removesuffix(" patch") for t in texts])

    model = PlantedNet()
    rec = record(model, ["pool"], images, top_k=8)
    gen = Generator()
    backend = Backend("fake", PhraseEncoder(), captioner=Captioner(), generator=gen)
    cfg = ExplainConfig(describe=True, ablation=True, ablation_units={"pool": [0, 1]}, **CFG)
    rnd = explain_recording(
        model,
        rec,
        ListSource(images, labels),
        backend,
        [c for c in VOCAB if c != "red"],
        cfg,
        class_names=["r", "g", "b", "s"],
    )
    red = rnd.get("pool", 0)
    assert red.source == "describe" and red.description == "red patch"
    assert red.score > 0.9
    assert rnd.get("pool", 1).source == "concept" and rnd.get("pool", 1).description == "green"
    assert len(gen.prompts) == 4 and "a red square on grey" in gen.prompts[0]
    # ablation: zeroing the red unit hurts class 'r' (images whose smallest planted concept is red)
    assert red.ablation is not None and red.ablation[0][0] == "r"
    assert rnd.get("pool", 2).ablation is None
    with pytest.raises(ValueError, match="captioner"):
        explain_recording(model, rec, ListSource(images), PlantedEncoder(), VOCAB, ExplainConfig(describe=True, **CFG))


def test_vocabulary_object_is_used_for_embeddings(data):
    images, _, _ = data

    class Vocab:
        concepts = VOCAB

        def __init__(self):
            self.calls = 0

        def embed(self, encoder):
            self.calls += 1
            return encoder.encode_texts(self.concepts)

    vocab = Vocab()
    model = PlantedNet()
    rec = record(model, ["pool"], images, top_k=4)
    rnd = explain_recording(model, rec, ListSource(images), PlantedEncoder(), vocab, ExplainConfig(**CFG))
    assert vocab.calls == 1 and rnd.get("pool", 2).description == "blue"
    rt = type(rnd).from_json(rnd.to_json())
    assert rt.get("pool", 2).boxes == rnd.get("pool", 2).boxes


def test_truncate_forward_gives_same_round_and_skips_the_rest(data):
    images, _, _ = data
    model = PlantedNet()
    rec = record(model, ["pool"], images, top_k=4)
    calls = []
    handle = model.head.register_forward_hook(lambda *a: calls.append(1))
    try:
        full = explain_recording(model, rec, ListSource(images), PlantedEncoder(), VOCAB, ExplainConfig(**CFG))
        n_full = len(calls)
        cut = explain_recording(
            model, rec, ListSource(images), PlantedEncoder(), VOCAB, ExplainConfig(truncate_forward=True, **CFG)
        )
    finally:
        handle.remove()
    assert n_full > 0 and len(calls) == n_full  # the head never ran in the truncated pass
    assert [u.description for u in cut.units] == [u.description for u in full.units]
    assert [u.boxes for u in cut.units] == [u.boxes for u in full.units]
    assert all(not m._forward_hooks for m in model.modules())


def test_correction_value_gives_the_round_of_its_name(data):
    from lightning_neurons.explanation.correction import ControlCorrection, SoftWPMI
    from lightning_neurons.explanation.scoring import concept_scores

    images, _, _ = data
    model = PlantedNet()
    rec = record(model, ["pool"], images, top_k=4, reservoir=12)

    def run(**kw):
        # The correction chooses the concept (and gives concept_score) with selection="concept_score".
        cfg = ExplainConfig(**kw, selection="concept_score", **CFG)
        return explain_recording(model, rec, ListSource(images), PlantedEncoder(), VOCAB, cfg)

    by_name, by_value = run(correction="soft_wpmi", wpmi_temperature=5.0), run(correction=SoftWPMI(temperature=5.0))
    assert by_value.meta["correction"] == by_name.meta["correction"] == "soft_wpmi"
    assert [(u.description, u.concept_score, u.score) for u in by_value.units] == [
        (u.description, u.concept_score, u.score) for u in by_name.units
    ]
    # the temperature is the value's: a name's wpmi_temperature changes the scores, a value ignores it
    assert run(correction="soft_wpmi").get("pool", 0).concept_score != by_name.get("pool", 0).concept_score
    assert ExplainConfig(correction=SoftWPMI(5.0), wpmi_temperature=1.0).correction_value == SoftWPMI(5.0)
    z = run(correction=ControlCorrection(scale="std"))
    assert z.meta["correction"] == "control" and [u.description for u in z.units] == CONCEPTS
    with pytest.raises(ValueError, match="correction"):
        ExplainConfig(correction="nope")
    with pytest.raises(TypeError, match="correction"):
        ExplainConfig(correction=10.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="temperature"):
        SoftWPMI(temperature=0.0)
    with pytest.raises(TypeError, match="value"):
        concept_scores(torch.zeros(1, 1, 2), torch.ones(1, 1, dtype=torch.bool), torch.zeros(0, 2), SoftWPMI(), lam=2.0)


def test_stages_run_by_hand_hand_each_other_their_values(data):
    from lightning_neurons.explanation.crops import embed_crops, find_regions
    from lightning_neurons.explanation.forward import RoundSamples, forward_samples
    from lightning_neurons.explanation.units import (
        RoundEvidence,
        build_units,
        concept_set,
        crop_similarities,
        score_layers,
        test_layers,
    )

    images, _, _ = data
    model = PlantedNet()
    rec = record(model, ["pool"], images, top_k=8)
    cfg, device, encoder = ExplainConfig(**CFG), torch.device("cpu"), PlantedEncoder()
    samples = RoundSamples.of(rec)
    forward = forward_samples(model, samples, ListSource(images), cfg, device)
    assert forward.bank.dtype == torch.uint8 and forward.bank.shape[0] == samples.ids.numel()
    assert forward.image_size == (SIZE, SIZE) and forward.layers["pool"].top_maps.shape == (4, 8, 16, 16)
    regions = find_regions(forward, {"pool": [2]}, cfg)
    assert forward.layers["pool"].top_maps.numel() == 0  # freed once boxed
    assert regions.boxes.shape == (32, 4) and regions.spans == {"pool": slice(0, 32)}
    assert regions.crop_index["pool"].shape == (4, 8) and int(regions.crop_index["pool"].max()) < len(regions.crop_bank)
    assert list(regions.previews) == [("pool", 2)]
    crops = embed_crops(encoder, forward, regions, cfg)
    whole = int(crops.whole_rows.numel()) - samples.reservoir.numel()  # whole images of the top samples too
    assert crops.embeddings.shape[0] == crops.num_unique + crops.num_control + whole == encoder.images_seen
    concepts = concept_set(VOCAB, encoder, batch_size=3)
    sims = crop_similarities(crops, concepts, device)
    significance = test_layers(forward, crops, sims, cfg, reduction=rec.reduction)
    scores = score_layers(sims, crops, regions, cfg, device, significance)
    units = build_units(RoundEvidence(forward, regions, crops, concepts, scores, sims, significance), rec.epoch)
    whole = explain_recording(model, rec, ListSource(images), PlantedEncoder(), VOCAB, cfg)
    def key(u):
        return u.description, u.score, u.boxes

    assert [key(u) for u in units] == [key(u) for u in whole.units]


class SizedEncoder(PlantedEncoder):
    """The planted encoder, declaring the side it embeds images at and noting the sides it is given."""

    def __init__(self, image_size: object = None) -> None:
        super().__init__()
        if image_size is not None:
            self.image_size = image_size
        self.sides: set[tuple[int, int]] = set()

    def encode_images(self, images: Tensor) -> Tensor:
        self.sides.add(tuple(images.shape[-2:]))
        return super().encode_images(images)


@pytest.mark.parametrize(
    ("image_size", "crop_size", "expected"),
    [(48, None, 48), ((40, 40), None, 40), (None, None, 224), (48, 32, 32), ((40, 48), None, 224)],
)
def test_crops_are_cut_at_the_side_the_encoder_embeds_at(data, image_size, crop_size, expected):
    """A crop cut at 224 px for an encoder that resizes to 128 px is resampled twice; cut at its side it is not."""
    images, labels, _ = data
    model = PlantedNet()
    rec = record(model, ["pool"], images, top_k=4)
    encoder = SizedEncoder(image_size)
    settings = {**CFG, "crop_size": crop_size}
    rnd = explain_recording(model, rec, ListSource(images, labels), encoder, VOCAB, ExplainConfig(**settings))
    assert encoder.sides == {(expected, expected)}
    assert rnd.meta["crop_size"] == expected
    assert [u.description for u in rnd.units[:4]] == CONCEPTS
