"""RunHistory at scale: indexed queries and incremental rounds give the results of the straightforward code, a round
costs its own units whatever the length of the history, and a checkpoint holds one round, not the whole run."""

from __future__ import annotations

import json
import math
import random
import warnings

import pytest
import torch

from _rounds import bow_embed, make_round
from lightning_neurons.drift.history import HISTORY_FILENAME, HistoryRecord, RunHistory, load_history
from lightning_neurons.drift.metrics import compare_units, summarize_layer
from lightning_neurons.results import ExplanationRound, UnitExplanation

WORDS = ["red dots", "grass", "sky", "stripes", "cat face", "wheel"]


def _round(rng: random.Random, epoch: int, layers=("conv", "fc"), units: int = 6) -> ExplanationRound:
    out = []
    for layer in rng.sample(list(layers), rng.randint(1, len(layers))):  # layers in any order, some missing
        for u in sorted(rng.sample(range(units), rng.randint(1, units))):
            out.append(
                UnitExplanation(
                    layer, u, epoch, rng.choice(WORDS), rng.random(), top_sample_ids=rng.sample(range(9), 3)
                )
            )
    return ExplanationRound(epoch, out)


class _Reference:
    """The straightforward history of the previous code: a dict rebuilt on every round."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, int, int], tuple[UnitExplanation, object]] = {}

    def add(self, rnd: ExplanationRound, keep_later: bool) -> None:
        ep = rnd.epoch
        revisit = keep_later and any(k[2] > ep for k in self.records)
        kept = {k: v for k, v in self.records.items() if (k[2] != ep if revisit else k[2] < ep)}
        previous = {}
        for k, (u, _) in sorted(((k, v) for k, v in kept.items() if k[2] < ep), key=lambda kv: kv[0][2]):
            previous[k[:2]] = u
        drifts = compare_units(previous, rnd.units, bow_embed, epoch=ep)
        self.records = {**kept, **{(u.layer, u.unit, ep): (u, d) for u, d in zip(rnd.units, drifts)}}

    def timelines(self, layer: str) -> dict[int, list]:
        out: dict[int, list] = {}
        for k in sorted((k for k in self.records if k[0] == layer), key=lambda k: k[2]):
            out.setdefault(k[1], []).append(self.records[k][1])
        return out


def _comparable(data):
    return json.loads(json.dumps(data, default=str).replace("NaN", "null"))


@pytest.mark.parametrize("seed", range(4))
def test_random_rounds_rewinds_and_revisits_match_the_straightforward_history(tmp_path, seed):
    rng = random.Random(seed)
    history = RunHistory(path=tmp_path / HISTORY_FILENAME)
    reference = _Reference()
    epoch = -1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rewinds warn
        for _ in range(14):
            action = rng.random()
            if action < 0.6 or epoch < 1:
                epoch, keep_later = epoch + 1, False  # the next epoch
            elif action < 0.75:
                epoch, keep_later = rng.randint(0, epoch), False  # a resume from an earlier checkpoint
            else:
                keep_later = True  # validate(ckpt_path=) of an older checkpoint: keeps the later epochs
            target = rng.randint(0, epoch) if keep_later else epoch
            rnd = _round(rng, target)
            drift = history.add_round(rnd, bow_embed, keep_later=keep_later)
            reference.add(rnd, keep_later)
            assert [d.to_dict() for d in drift] == [
                reference.records[(d.layer, d.unit, target)][1].to_dict() for d in drift
            ]

            # every query against the reference
            assert set(history._records) == set(reference.records)
            records = history.records
            rank = {name: i for i, name in enumerate(history.layers)}
            assert [r.key for r in records] == sorted(reference.records, key=lambda k: (k[2], rank[k[0]], k[1]))
            for r in records:
                u, d = reference.records[r.key]
                assert r.drift.to_dict() == d.to_dict() and r.explanation.description == u.description
            assert history.epochs == sorted({k[2] for k in reference.records})
            for layer in history.layers:
                timelines = reference.timelines(layer)
                assert history.units(layer) == sorted(timelines)
                for unit, timeline in timelines.items():
                    assert [r.drift for r in history.timeline(layer, unit)] == timeline
            for ep in history.epochs:
                assert [d.to_dict() for d in history.drift(ep)] == [
                    r.drift.to_dict() for r in records if r.key[2] == ep
                ]
            expected = [
                summarize_layer(layer, ep, reference.timelines(layer), history.stable_rounds)
                for ep in history.epochs
                for layer in history.layers
                if any(k[0] == layer and k[2] == ep for k in reference.records)
            ]
            assert _comparable([s.to_dict() for s in history.summary()]) == _comparable([s.to_dict() for s in expected])
            assert _comparable([s.to_dict() for s in history.summary(target)]) == _comparable(
                [s.to_dict() for s in expected if s.epoch == target]
            )
            latest = {r.key[:2]: r.key[2] for r in records}
            assert [r.key for r in history.latest()] == sorted(
                ((*k, e) for k, e in latest.items()), key=lambda k: (rank[k[0]], k[1])
            )
    # the file replays (in one pass) to the same history, and so does a checkpoint of it
    assert load_history(tmp_path).state_dict() == history.state_dict()
    restored = RunHistory()
    restored.load_state_dict(json.loads(json.dumps(history.checkpoint_state())))
    assert restored.state_dict() == history.state_dict()


class _KeyReads:
    """Counts reads of HistoryRecord.key: the old add_round and summary read it for every record held."""

    def __init__(self, monkeypatch) -> None:
        self.n = 0
        original = HistoryRecord.key.fget

        def counted(record):
            self.n += 1
            return original(record)

        monkeypatch.setattr(HistoryRecord, "key", property(counted))

    def during(self, fn) -> int:
        before = self.n
        fn()
        return self.n - before


def _unit_round(epoch: int, units: int = 20) -> ExplanationRound:
    return ExplanationRound(
        epoch, [UnitExplanation("fc", u, epoch, WORDS[(u + epoch // 3) % len(WORDS)], 0.6) for u in range(units)]
    )


def test_a_round_and_its_summary_cost_the_same_at_round_3_and_round_30(monkeypatch):
    history = RunHistory()
    reads = _KeyReads(monkeypatch)
    cost = {}
    for epoch in range(31):
        rnd = _unit_round(epoch)
        add = reads.during(lambda: history.add_round(rnd, bow_embed))  # noqa: B023 (called at once)
        summary = reads.during(lambda: history.summary(epoch))  # noqa: B023
        drift = reads.during(lambda: history.drift(epoch))  # noqa: B023
        cost[epoch] = (add, summary, drift)
    assert cost[30] == cost[3]  # the old code: 580 reads at round 30, 40 at round 3 (every record held)
    assert cost[30][0] <= 3 * 20 and cost[30][1:] == (0, 0)


def test_checkpoint_state_holds_one_round_and_resumes_like_the_full_state(tmp_path):
    full = RunHistory(path=tmp_path / "full" / HISTORY_FILENAME)
    for e in range(5):
        full.add_round(make_round(e), bow_embed)

    first = RunHistory(path=tmp_path / "a" / HISTORY_FILENAME)
    for e in range(3):
        first.add_round(make_round(e), bow_embed)
    state = first.checkpoint_state()
    assert "records" not in state and len(state["latest"]) == 5  # one record per unit, not 3 rounds of them
    assert [ep for ep, _ in state["store"]["rounds"]] == [0, 1, 2] and state["store"]["records"] == 15
    first.add_round(make_round(3), bow_embed)  # the run went on past its checkpoint, then crashed
    first.close()

    # A Lightning checkpoint read with weights_only=True (plain types only)
    path = tmp_path / "cb.ckpt"
    torch.save({"history": state}, path)
    state = torch.load(path, weights_only=True)["history"]

    resumed = RunHistory()
    resumed.load_state_dict(state)
    assert resumed.epochs == [0, 1, 2] and len(resumed) == 15  # epoch 3 of the abandoned timeline is not restored
    resumed.attach(tmp_path / "a" / HISTORY_FILENAME)
    for e in (3, 4):
        resumed.add_round(make_round(e), bow_embed)
    resumed.close()
    assert resumed.state_dict() == full.state_dict()
    assert load_history(tmp_path / "a").state_dict() == full.state_dict()
    # the resumed history's own checkpoint names the rounds of the file it now writes
    assert [ep for ep, _ in resumed.checkpoint_state()["store"]["rounds"]] == [0, 1, 2, 3, 4]


def test_checkpoint_state_without_its_file_keeps_drift_and_summaries_exact(tmp_path):
    full = RunHistory()
    for e in range(5):
        full.add_round(make_round(e), bow_embed)

    first = RunHistory(path=tmp_path / "gone" / HISTORY_FILENAME)
    for e in range(3):
        first.add_round(make_round(e), bow_embed)
    state = json.loads(json.dumps(first.checkpoint_state()))
    first.close()
    (tmp_path / "gone" / HISTORY_FILENAME).unlink()  # the checkpoint was copied elsewhere without its history

    resumed = RunHistory()
    with pytest.warns(UserWarning, match=r"does not exist; restored each unit's latest explanation only \(5 of 15"):
        resumed.load_state_dict(state)
    assert len(resumed) == 5 and resumed.epochs == [2]
    for e in (3, 4):
        drift = resumed.add_round(make_round(e), bow_embed)
        assert [d.to_dict() for d in drift] == [d.to_dict() for d in full.drift(e)]
        assert [s.to_dict() for s in resumed.summary(e)] == [s.to_dict() for s in full.summary(e)]


def test_memory_only_history_checkpoints_every_record():
    history = RunHistory()
    history.add_round(make_round(0), bow_embed)
    assert history.checkpoint_state() == history.state_dict()


def test_loading_is_one_pass_and_keeps_float_fields(tmp_path):
    history = RunHistory(path=tmp_path / HISTORY_FILENAME)
    for e in range(3):
        rnd = make_round(e)
        rnd.units[0].score = float("nan")
        history.add_round(rnd, bow_embed)
    history.close()
    loaded = load_history(tmp_path)
    assert math.isnan(loaded.get("features.3", 0, 2).drift.score)
    assert [r.to_dict() for r in loaded.records] == [r.to_dict() for r in history.records]
    assert loaded._round_ids == history._round_ids  # each epoch knows the round of the file it came from
