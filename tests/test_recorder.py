import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, Sampler, TensorDataset

from lightning_neurons.recording.recorder import ActivationRecorder, collect_top_k
from lightning_neurons.recording.samples import DataLoaderSampleSource


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 5, 3, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        h = self.conv2(torch.relu(self.conv1(x)))
        return self.fc(self.pool(h).flatten(1))


class TokenNet(nn.Module):
    """ViT-like: [B, 1 + 16, D] with a huge class token that must be dropped."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, d, 4, stride=4)
        self.mlp = nn.Linear(d, d)

    def forward(self, x):
        tok = self.embed(x).flatten(2).transpose(1, 2)
        cls = torch.full_like(tok[:, :1], 100.0)
        return self.mlp(torch.cat([cls, tok], dim=1))


class TupleNet(nn.Module):
    def __init__(self, as_dict: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.as_dict = as_dict

    def forward(self, x):
        y = self.conv(x)
        return {"feat": y, "aux": y.mean()} if self.as_dict else (y, y.mean())


class Wrapper(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x)
        return out["feat"] if isinstance(out, dict) else out[0]


def data(n=50, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(0, 4, (n,), generator=g))


def brute_force(model, module, loader, k, reduce="max"):
    """Store the whole [N, U, h*w] activation stack, then sort: the published-tools baseline."""
    outs = []
    handle = module.register_forward_hook(lambda m, a, o: outs.append(o.detach()))
    with torch.no_grad():
        for x, _ in loader:
            model(x)
    handle.remove()
    acts = torch.cat(outs)
    flat = acts.flatten(2) if acts.dim() == 4 else acts[:, :, None]
    vals = flat.amax(2) if reduce == "max" else flat.mean(2)
    peaks = flat.argmax(2)
    ids = torch.arange(vals.shape[0])
    order = torch.tensor(
        [sorted(range(len(ids)), key=lambda i: (-float(vals[i, u]), i))[:k] for u in range(vals.shape[1])]
    )
    return vals.T.gather(1, order), order, peaks.T.gather(1, order)


@pytest.mark.parametrize("reduction", ["max", "mean"])
def test_conv_topk_equals_brute_force(reduction):
    torch.manual_seed(0)
    model = ConvNet().eval()
    loader = DataLoader(data(), batch_size=8)
    rec = collect_top_k(model, loader, ["conv1", "conv2"], top_k=7, reduction=reduction, show_progress=False)
    for name in ("conv1", "conv2"):
        ref_v, ref_i, ref_p = brute_force(model, getattr(model, name), loader, 7, reduction)
        lt = rec.layers[name]
        assert lt.kind == "conv" and lt.num_units == ref_v.shape[0]
        assert torch.equal(lt.sample_ids, ref_i)
        torch.testing.assert_close(lt.values, ref_v)
        assert torch.equal(lt.peaks, ref_p)
    assert rec.layers["conv2"].map_size == (7, 7)
    assert rec.num_samples == 50 and rec.reduction == reduction
    assert hook_count(model) == 0


def test_token_units_drop_class_token():
    torch.manual_seed(0)
    model = TokenNet().eval()
    loader = DataLoader(data(n=20), batch_size=6)
    rec = collect_top_k(model, loader, "mlp", top_k=4, show_progress=False)
    lt = rec.layers["mlp"]
    assert lt.kind == "token" and lt.map_size == (4, 4) and lt.num_units == 6
    assert (lt.values < 50).all()  # the class token (100 before the linear map) is not in the grid
    # brute force over patch tokens only
    with torch.no_grad():
        out = model(torch.cat([x for x, _ in loader]))[:, 1:, :]  # [N, 16, D]
    vals, peaks = out.max(dim=1)
    for u in range(6):
        order = sorted(range(20), key=lambda i: (-float(vals[i, u]), i))[:4]
        assert lt.sample_ids[u].tolist() == order
        assert lt.peaks[u].tolist() == peaks[order, u].tolist()
    with pytest.raises(ValueError, match="square"):
        collect_top_k(model, loader, "mlp", top_k=4, token_mode="keep_all", show_progress=False)


def test_linear_units_have_no_map():
    torch.manual_seed(0)
    model = ConvNet().eval()
    loader = DataLoader(data(n=30), batch_size=7)
    rec = collect_top_k(model, loader, "fc", top_k=3, show_progress=False)
    lt = rec.layers["fc"]
    assert lt.kind == "linear" and lt.map_size is None and (lt.peaks == -1).all()
    with torch.no_grad():
        logits = model(torch.cat([x for x, _ in loader]))
    for u in range(4):
        assert lt.sample_ids[u].tolist() == logits[:, u].argsort(descending=True)[:3].tolist()


@pytest.mark.parametrize("as_dict", [False, True])
def test_tuple_or_dict_output_needs_selector(as_dict):
    model = Wrapper(TupleNet(as_dict))
    loader = DataLoader(data(n=10), batch_size=5)
    with pytest.raises(TypeError, match="output_selector") as err:
        collect_top_k(model, loader, "inner", top_k=2, show_progress=False)
    assert "'inner'" in str(err.value)
    assert hook_count(model) == 0  # removed although the forward raised
    rec = collect_top_k(
        model, loader, "inner", top_k=2, output_selector={"inner": "feat" if as_dict else 0}, show_progress=False
    )
    assert rec.layers["inner"].num_units == 4
    with pytest.raises(TypeError, match="does not apply"):
        collect_top_k(model, loader, "inner", top_k=2, output_selector={"inner": 5}, show_progress=False)
    with pytest.raises(ValueError, match="matches none"):
        ActivationRecorder(model, "inner", output_selector={"other": 0})


def test_unsupported_rank_names_layer_and_shape():
    model = nn.Sequential(nn.Conv3d(1, 2, 1))
    with pytest.raises(ValueError, match=r"'0'.*\(2, 2, 3, 3, 3\)"):
        collect_top_k(model, [torch.zeros(2, 1, 3, 3, 3)], "0", show_progress=False)


def test_nonfinite_values_excluded_counted_and_warned():
    model = nn.Sequential(nn.Identity())
    x = torch.arange(24.0).reshape(6, 4)
    x[5, 0] = float("nan")  # the largest sample of unit 0 becomes NaN
    x[4, 1] = float("inf")
    with pytest.warns(RuntimeWarning, match="2 NaN/Inf"):
        rec = collect_top_k(model, [x[:3], x[3:]], "0", top_k=3, show_progress=False)
    assert rec.nonfinite == 2
    assert rec.layers["0"].sample_ids[0].tolist() == [4, 3, 2]
    assert rec.layers["0"].sample_ids[1].tolist() == [5, 3, 2]


def test_top_k_larger_than_probe_set():
    model = ConvNet().eval()
    rec = collect_top_k(model, DataLoader(data(n=5), batch_size=2), "conv2", top_k=9, show_progress=False)
    lt = rec.layers["conv2"]
    assert lt.values.shape == (5, 9)
    assert (lt.sample_ids[:, :5] >= 0).all() and (lt.sample_ids[:, 5:] == -1).all()
    assert torch.isinf(lt.values[:, 5:]).all() and (lt.peaks[:, 5:] == -1).all()
    assert rec.unique_sample_ids().tolist() == [0, 1, 2, 3, 4]


class Stream(IterableDataset):
    def __init__(self, n: int) -> None:
        self.ds = data(n=n, seed=3)

    def __iter__(self):
        return iter(self.ds[i] for i in range(len(self.ds)))


def test_iterable_dataset_and_labels():
    model = ConvNet().eval()
    it_loader = DataLoader(Stream(23), batch_size=5)
    rec = collect_top_k(model, it_loader, "conv2", top_k=4, reservoir_size=6, show_progress=False)
    ref = collect_top_k(
        model, DataLoader(data(n=23, seed=3), batch_size=4), "conv2", top_k=4, reservoir_size=6, show_progress=False
    )
    assert torch.equal(rec.layers["conv2"].sample_ids, ref.layers["conv2"].sample_ids)
    assert torch.equal(rec.reservoir_ids, ref.reservoir_ids) and rec.reservoir_ids.numel() == 6
    labels = data(n=23, seed=3).tensors[1]
    assert set(rec.labels) == set(rec.unique_sample_ids().tolist())  # only ids in top-k sets / reservoir
    assert all(labels[i] == lab for i, lab in rec.labels.items())
    inputs, got_labels = DataLoaderSampleSource(it_loader).fetch([17, 2, 9])
    assert torch.equal(inputs, data(n=23, seed=3).tensors[0][[17, 2, 9]])
    assert got_labels.tolist() == labels[[17, 2, 9]].tolist()
    with pytest.raises(IndexError, match="beyond"):
        DataLoaderSampleSource(it_loader).fetch([30])


class Reverse(Sampler):
    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        return iter(range(self.n - 1, -1, -1))

    def __len__(self) -> int:
        return self.n


def test_sample_source_map_style():
    ds = data(n=12)
    inputs, labels = DataLoaderSampleSource(DataLoader(ds, batch_size=5)).fetch([3, 11, 0])
    assert torch.equal(inputs, ds.tensors[0][[3, 11, 0]]) and torch.equal(labels, ds.tensors[1][[3, 11, 0]])
    # a deterministic non-sequential sampler: id = position in the stream
    inputs, _ = DataLoaderSampleSource(DataLoader(ds, batch_size=5, sampler=Reverse(12))).fetch([0, 1])
    assert torch.equal(inputs, ds.tensors[0][[11, 10]])
    dict_ds = [{"image": ds.tensors[0][i], "label": ds.tensors[1][i]} for i in range(12)]
    inputs, labels = DataLoaderSampleSource(DataLoader(dict_ds, batch_size=4)).fetch([5])
    assert torch.equal(inputs[0], ds.tensors[0][5]) and labels.tolist() == [int(ds.tensors[1][5])]
    with pytest.raises(ValueError, match="shuffle"):
        DataLoaderSampleSource(DataLoader(ds, batch_size=5, shuffle=True))
    with pytest.raises(IndexError):
        DataLoaderSampleSource(DataLoader(ds, batch_size=5)).fetch([12])


def test_bf16_autocast_channels_last_same_ranking():
    torch.manual_seed(0)
    model = ConvNet().eval()
    loader = DataLoader(data(n=64, size=24), batch_size=16)
    ref = collect_top_k(model, loader, ["conv1", "conv2"], top_k=8, show_progress=False)
    model_cl = model.to(memory_format=torch.channels_last)
    recorder = ActivationRecorder(model_cl, ["conv1", "conv2"], top_k=8)
    with recorder, torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for x, _ in loader:
            recorder.begin_batch(x.shape[0])
            out = model_cl(x.to(memory_format=torch.channels_last))
        assert out.dtype == torch.bfloat16
    rec = recorder.result()
    for name in ("conv1", "conv2"):
        a, b = ref.layers[name], rec.layers[name]
        assert b.values.dtype == torch.float32
        torch.testing.assert_close(b.values, a.values, rtol=0.03, atol=0.03)
        overlap = [len(set(x.tolist()) & set(y.tolist())) / 8 for x, y in zip(a.sample_ids, b.sample_ids)]
        assert sum(overlap) / len(overlap) > 0.85
        assert (a.sample_ids[:, 0] == b.sample_ids[:, 0]).float().mean() > 0.8


def test_attach_detach_idempotent_and_memory_bound():
    model = ConvNet()
    rec = ActivationRecorder(model, "conv*", top_k=4, reservoir_size=5, merge_rows=16)
    rec.attach()
    rec.attach()
    assert rec.num_hooks == 2 and hook_count(model) == 2
    sizes = []
    with torch.no_grad():
        for n in (32, 320):
            rec.reset()
            for x, _ in DataLoader(data(n=n, size=8), batch_size=16):
                rec.begin_batch(x.shape[0])
                model(x)
            rec.sync(lambda t: t)  # world size 1: only flushes
            sizes.append(rec.nbytes)
            assert rec.result().num_samples == n
    assert sizes[0] == sizes[1] == (6 + 5) * 4 * 28 + 5 * 28
    rec.detach()
    rec.detach()
    assert rec.num_hooks == 0 and hook_count(model) == 0


def test_reused_module_recorded_once_and_ids_without_begin_batch():
    relu = nn.ReLU()
    model = nn.Sequential(nn.Linear(3, 3), relu, nn.Linear(3, 3), relu)
    rec = ActivationRecorder(model, "1", top_k=2)
    with rec, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(torch.randn(4, 3))
        model(torch.randn(3, 3))  # no begin_batch: ids continue from the output's batch size
    assert sum("more than once" in str(w.message) for w in caught) == 1
    assert rec.num_samples == 4  # the second call of a batch is ignored until the next batch begins
    rec.begin_batch(5)
    with rec:
        model(torch.randn(5, 3))
    assert rec.num_samples == 9
    with pytest.raises(ValueError, match="batch dimension"):
        rec.begin_batch(2)
        with rec:
            model(torch.randn(5, 3))


def test_distributed_ids():
    model = nn.Sequential(nn.Identity())
    rec = ActivationRecorder(model, "0", top_k=3, world_size=2, rank=1)
    with rec:
        rec.begin_batch(2)
        model(torch.tensor([[1.0], [3.0]]))
        rec.begin_batch(1)
        model(torch.tensor([[2.0]]))
    # local positions 0, 1, 2 -> global ids 1, 3, 5 on rank 1 of 2
    assert rec.result().layers["0"].sample_ids.tolist() == [[3, 5, 1]]
