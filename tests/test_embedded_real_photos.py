"""The embedded offline backend on real photos: a unit built to fire on the cat gets a cat-like description."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import Tensor, nn

from lightning_neurons.backends.base import Backend
from lightning_neurons.explanation.pipeline import ExplainConfig, explain_recording
from lightning_neurons.recording.types import LayerTopK, Recording

skdata = pytest.importorskip("skimage.data")

PHOTOS = {"cat": "chelsea", "coffee": "coffee", "rocket": "rocket", "person": "astronaut"}
ACCEPT = {
    "cat": {"cat", "kitten", "tabby cat", "tiger cat", "egyptian cat", "animal", "fur", "pet"},
    "coffee": {"coffee", "cup", "coffee cup", "espresso", "coffee mug", "mug", "drink", "cup of coffee"},
}
VOCAB = [
    "cat",
    "kitten",
    "coffee",
    "cup",
    "rocket",
    "space shuttle",
    "person",
    "astronaut",
    "dog",
    "car",
    "tree",
    "building",
    "water",
    "grass",
    "sky",
    "food",
    "flower",
    "bicycle",
    "bird",
    "fish",
    "book",
    "mountain",
]


def load_backend_embedded() -> Backend:
    try:
        from lightning_neurons.backends import load_backend
    except ImportError:
        from lightning_neurons.backends.embedded import load_embedded_backend

        return load_embedded_backend(device="cpu")
    return load_backend("embedded", device="cpu")


def augmented(photo: Tensor, n: int, gen: torch.Generator, size: int = 128) -> Tensor:
    """Random resized crops (60-100% of each side) and flips."""
    _, h, w = photo.shape
    out = []
    for _ in range(n):
        s = 0.6 + 0.4 * float(torch.rand(1, generator=gen))
        ch, cw = int(h * s), int(w * s)
        y = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
        x = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
        crop = photo[:, y : y + ch, x : x + cw]
        if bool(torch.rand(1, generator=gen) < 0.5):
            crop = crop.flip(-1)
        out.append(nn.functional.interpolate(crop[None], size=(size, size), mode="bilinear", antialias=True)[0])
    return torch.stack(out)


class OracleNet(nn.Module):
    """Unit i of ``head`` is high only on photo i: it looks the input up among the known probe images."""

    def __init__(self, probe: Tensor, owner: Tensor, num_units: int) -> None:
        super().__init__()
        self.register_buffer("probe", probe.flatten(1))
        self.register_buffer("owner", nn.functional.one_hot(owner, num_units).float())
        self.head = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        nearest = torch.cdist(x.flatten(1), self.probe).argmin(dim=1)
        jitter = 0.01 * torch.rand(x.shape[0], self.owner.shape[1], generator=torch.Generator().manual_seed(1))
        return self.head(self.owner[nearest] + jitter)


class ListSource:
    def __init__(self, inputs: Tensor) -> None:
        self.inputs = inputs

    def fetch(self, ids):
        return self.inputs[torch.as_tensor(list(ids))], None


@pytest.fixture(scope="module")
def backend():
    try:
        return load_backend_embedded()
    except Exception as err:  # noqa: BLE001 - the pack is not installed here
        pytest.skip(f"embedded backend unavailable: {err}")


def test_oracle_units_get_semantically_close_descriptions(backend):
    gen = torch.Generator().manual_seed(0)
    photos = {
        k: torch.from_numpy(getattr(skdata, v)().copy()).permute(2, 0, 1).float() / 255 for k, v in PHOTOS.items()
    }
    per = 6
    inputs = torch.cat([augmented(p, per, gen) for p in photos.values()])  # [24, 3, 128, 128]
    model = OracleNet(inputs, torch.arange(len(PHOTOS)).repeat_interleave(per), len(PHOTOS))
    with torch.no_grad():
        acts = model(inputs)  # [24, 4]
    top = acts.T.topk(per, dim=1)
    # the oracle is right: each unit's top samples are its own photo's augmentations
    for i in range(len(PHOTOS)):
        assert (top.indices[i] // per == i).all()
    rec = Recording(
        layers={
            "head": LayerTopK("head", "linear", 4, None, top.values, top.indices, torch.full_like(top.indices, -1))
        },
        reservoir_ids=torch.arange(inputs.shape[0]),
        num_samples=inputs.shape[0],
        top_k=per,
    )
    rnd = explain_recording(
        model, rec, ListSource(inputs), backend, VOCAB, ExplainConfig(crop_size=128, show_progress=False)
    )
    cat, coffee = rnd.get("head", 0), rnd.get("head", 1)
    assert cat.description in ACCEPT["cat"], (cat.description, cat.alternatives)
    assert coffee.description in ACCEPT["coffee"], (coffee.description, coffee.alternatives)
    assert cat.score > 0.7 and coffee.score > 0.7
    # the description is also close to the target word in the text space (MiniLM)
    emb = backend.encode_descriptions([cat.description, "cat", "rocket"])
    assert float(emb[0] @ emb[1]) > float(emb[0] @ emb[2])


def test_embedded_session_leaves_its_basis_names_out_of_the_general_vocabulary(backend):
    """ConSE image embeddings mix the ImageNet names' embeddings, so the session's general vocabulary drops them
    (class names that happen to be ImageNet names stay); ``keep_basis_concepts=True`` keeps them."""
    from lightning_neurons import NeuronExplainer
    from lightning_neurons.backends.embedded import imagenet_class_names
    from lightning_neurons.session import ExplanationSession

    assert len(backend.basis_concepts) == 1000 and "espresso" in backend.basis_concepts
    explainer = NeuronExplainer(
        layers=["head"], backend="embedded", backend_kwargs={"device": "cpu"}, class_names=["goldfish", "rocket"]
    )
    session = ExplanationSession(explainer.config)
    session.setup()
    assert session.concepts is not None
    texts = list(session.concepts.texts)
    assert "goldfish" in texts and "rocket" in texts and "cat" in texts
    assert "espresso" not in texts and "egyptian cat" not in texts
    assert session.concepts.embeddings.shape[0] == len(texts)
    names = {n.lower() for n in imagenet_class_names()}
    assert [t for t in texts if t in names] == ["goldfish"]  # only the class name
    from lightning_neurons.backends import load_backend

    kept = load_backend("embedded", device="cpu", generator=False, keep_basis_concepts=True)
    assert kept.basis_concepts == frozenset()


def test_embedded_backends_with_different_settings_do_not_share_them():
    from lightning_neurons.backends import load_backend

    small = load_backend("embedded", device="cpu", generator=False, image_size=128, batch_size=8)
    large = load_backend("embedded", device="cpu", generator=False, image_size=224)
    assert small.encoder.image_size == 128 and small.encoder.batch_size == 8  # not overwritten by the second load
    assert large.encoder.image_size == 224 and large.encoder.batch_size == "auto"
    assert small.encoder.classifier is large.encoder.classifier  # the weights are loaded once
