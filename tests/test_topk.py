import pytest
import torch

from lightning_neurons.recording.topk import Reservoir, TopKBuffer, random_keys, sort_keys


def reference_topk(values: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Store everything, then sort each unit by (value desc, id asc); non-finite values excluded."""
    out_v = torch.full((values.shape[1], k), float("-inf"))
    out_i = torch.full((values.shape[1], k), -1, dtype=torch.long)
    for u in range(values.shape[1]):
        rows = [(float(v), int(i)) for v, i in zip(values[:, u], ids) if torch.isfinite(v)]
        rows.sort(key=lambda r: (-r[0], r[1]))
        for j, (v, i) in enumerate(rows[:k]):
            out_v[u, j], out_i[u, j] = v, i
    return out_v, out_i


@pytest.mark.parametrize("merge_rows", [1, 13, 512])
def test_exact_topk_equals_brute_force_with_ties(merge_rows):
    g = torch.Generator().manual_seed(0)
    values = (torch.randn(203, 7, generator=g) * 3).round()  # many ties
    values[5, 2] = float("nan")
    values[9, 0] = float("inf")
    ids = torch.randperm(203, generator=g)  # arrival order must not matter
    buf = TopKBuffer(7, 6, merge_rows=merge_rows)
    peaks = torch.arange(203)[:, None].expand(203, 7) * 10
    labels = ids % 5
    for s in range(0, 203, 16):
        buf.add(values[s : s + 16], ids[s : s + 16], peaks[s : s + 16], labels[s : s + 16])
    state = buf.state()
    ref_v, ref_i = reference_topk(values, ids, 6)
    assert torch.equal(state["sample_ids"], ref_i)
    assert torch.equal(state["values"], ref_v)
    # payloads travel with their sample
    pos = {int(i): p for p, i in enumerate(ids)}
    for u in range(7):
        for j in range(6):
            i = int(state["sample_ids"][u, j])
            assert int(state["peaks"][u, j]) == pos[i] * 10
            assert int(state["labels"][u, j]) == i % 5
    assert int(buf.nonfinite) == 2


def test_topk_larger_than_samples_pads():
    buf = TopKBuffer(3, 10)
    buf.add(torch.tensor([[1.0, float("nan"), 2.0], [0.5, 0.1, -1.0]]), torch.tensor([4, 9]))
    st = buf.state()
    assert st["sample_ids"].tolist() == [[4, 9] + [-1] * 8, [9] + [-1] * 9, [4, 9] + [-1] * 8]
    assert torch.isinf(st["values"][:, 2:]).all() and st["values"][0, 0] == 1.0
    assert (st["peaks"] == -1).all()  # no peaks given
    assert int(buf.nonfinite) == 1


def test_sort_keys_orders_negative_values_and_ids():
    values = torch.tensor([-2.0, -0.5, 0.0, 3.0, 3.0, float("-inf"), float("nan")])
    ids = torch.tensor([0, 1, 2, 8, 5, 6, 7])
    order = sort_keys(values, ids).argsort(descending=True)
    assert ids[order].tolist()[:5] == [5, 8, 2, 1, 0]


def pack(buf: TopKBuffer) -> torch.Tensor:
    buf.flush()
    return torch.stack([buf.values.view(torch.int32).long(), buf.sample_ids, buf.peaks, buf.labels], dim=-1)


def fake_gather(*bufs: TopKBuffer):
    packed = [pack(b) for b in bufs]
    counts = [b.nonfinite.reshape(1) for b in bufs]

    def gather(t: torch.Tensor) -> torch.Tensor:
        return torch.stack(packed if t.dim() == 3 else counts)

    return gather


def test_merge_across_ranks_equals_single_process():
    g = torch.Generator().manual_seed(1)
    values = torch.randn(100, 5, generator=g).round(decimals=1)
    values[3, 1] = float("nan")
    ids = torch.arange(100)
    single = TopKBuffer(5, 8)
    single.add(values, ids)
    ranks = [TopKBuffer(5, 8, merge_rows=4), TopKBuffer(5, 8, merge_rows=4)]
    for r, buf in enumerate(ranks):  # DistributedSampler deals index i to rank i % 2
        buf.add(values[r::2], ids[r::2])
    gather = fake_gather(*ranks)
    for buf in ranks:
        buf.merge_across_ranks(gather)
        assert torch.equal(buf.state()["sample_ids"], single.state()["sample_ids"])
        assert torch.equal(buf.state()["values"], single.state()["values"])
        assert int(buf.nonfinite) == 1


def test_merge_across_ranks_drops_padding_duplicates():
    a, b = TopKBuffer(1, 3), TopKBuffer(1, 3)
    a.add(torch.tensor([[1.0], [5.0]]), torch.tensor([0, 2]))
    b.add(torch.tensor([[2.0], [9.0]]), torch.tensor([1, 3]))  # id 3 is a DistributedSampler duplicate
    a.merge_across_ranks(fake_gather(a, b), id_limit=3)
    assert a.state()["sample_ids"].tolist() == [[2, 1, 0]]


def test_reservoir_is_smallest_keys_and_rank_independent():
    ids = torch.arange(1000)
    whole = Reservoir(20, seed=3)
    for s in range(0, 1000, 64):
        whole.add(ids[s : s + 64], ids[s : s + 64] % 7)
    expected = ids[random_keys(ids, 3).argsort()[:20]]
    assert sorted(whole.ids().tolist()) == sorted(expected.tolist())
    assert (whole.labels() == whole.ids() % 7).all()
    parts = [Reservoir(20, seed=3), Reservoir(20, seed=3)]
    for r, res in enumerate(parts):
        res.add(ids[r::2])
    gather = fake_gather(*(p.buffer for p in parts))
    parts[0].merge_across_ranks(gather)
    assert parts[0].ids().tolist() == whole.ids().tolist()
    assert Reservoir(20, seed=4).ids().numel() == 0
    other = Reservoir(20, seed=4)
    other.add(ids)
    assert set(other.ids().tolist()) != set(whole.ids().tolist())  # the seed matters


def test_random_keys_are_roughly_uniform():
    keys = random_keys(torch.arange(20000), seed=0)
    hist = torch.histc(keys, bins=10, min=0, max=1)
    assert ((hist - 2000).abs() < 200).all()
    assert torch.equal(keys, random_keys(torch.arange(20000), seed=0))


def test_bad_shapes():
    with pytest.raises(ValueError, match="expected values"):
        TopKBuffer(3, 2).add(torch.zeros(4, 2), torch.arange(4))
    with pytest.raises(ValueError):
        TopKBuffer(0, 2)
