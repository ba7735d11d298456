"""The model-randomisation table: the share of each unit kind for trained and random-weight networks, per encoder.

A trained network and the same architecture with random weights explain the same probe images through the
pipeline users run (:func:`~lightning_neurons.explanation.pipeline.explain_recording`); each unit gets a
``UnitExplanation.kind`` (``"concept"``, ``"low_level"``, ``"unclear"``, ``"dead"``; ``None`` for a pipeline that
sets no kind). Random-weight units follow brightness and colour, and so do concept similarities: an honest test
gives at most a few of them the kind ``"concept"``, and a trained network clearly more.

Networks (:data:`NETWORKS`):

- ``smallcnn``: the quality benchmark's SmallCNN, trained on a split of the broad benchmark
  (:func:`~lightning_neurons.benchmark.quality.train_classifier`) against the same seed's untrained initialisation;
  layer ``features.block3``, probe: held-out crops of the split (64 px).
- ``mobilenet_v2``: torchvision's MobileNetV2 with the packaged ImageNet weights against a random initialisation;
  layer ``features.14`` (160 units), probe: crops of the split's photos (128 px).

Encoders (:data:`ENCODERS`), both real image-text pairings buildable offline:

- ``conse_classes``: the embedded backend's default, ConSE compared as distributions over the 1,000 ImageNet
  classes (with WordNet hypernyms and colour terms);
- ``conse_text``: classic ConSE (Norouzi et al., 2014) in MiniLM's 384-d sentence space, bare templated texts, no
  hypernyms (``space="text"``: the encoder of ``benchmarks/results/quality_broad_text_space.json``). Its images are
  probability-weighted sums of MiniLM class-name embeddings, its texts plain MiniLM embeddings: another similarity
  geometry with another text side, though the same image classifier.

Both encoders read images through the packaged MobileNetV2, so for the ``mobilenet_v2`` network the encoder shares
the explained network's weights: a trained unit there predicts the encoder's similarities more easily than it
would a CLIP's (the ``smallcnn`` rows have no such overlap).

Example:
    >>> cfg = RandomisationConfig(networks=("smallcnn",), encoders=("conse_classes",))
    >>> out = run_randomisation(cfg)  # doctest: +SKIP
    >>> out["smallcnn"]["conse_classes"]["random"]["concept"] <= 0.1  # doctest: +SKIP
    True
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_neurons.results import UNIT_KINDS

#: The networks of the table.
NETWORKS: tuple[str, ...] = ("smallcnn", "mobilenet_v2")

#: The encoders of the table, as ``load_backend("embedded", ...)`` options.
ENCODERS: dict[str, dict[str, Any]] = {
    "conse_classes": {},
    "conse_text": {"space": "text", "hypernym_weight": 0.0, "template_weight": 1.0},
}

#: Per network: the explained layer, the probe image size and the crops per class.
_LAYERS = {"smallcnn": "features.block3", "mobilenet_v2": "features.14"}
_IMAGE_SIZE = {"smallcnn": 64, "mobilenet_v2": 128}


@dataclass
class RandomisationConfig:
    """Settings of :func:`run_randomisation`.

    Args:
        split: Broad-benchmark split of the images (and of the SmallCNN's training data).
        networks: Which of :data:`NETWORKS`.
        encoders: Which of :data:`ENCODERS`.
        seed: Seed of the data, the training, the random initialisation and the pipeline.
        probe_per_class: Probe crops per class (where the top-k samples and the reservoir come from).
        train_per_class: SmallCNN training crops per class.
        epochs: SmallCNN training epochs.
        top_k: Top samples per unit.
        reservoir_size: Uniform probe samples of the recording.
        layers: Per network, the explained layer (default ``features.block3`` / ``features.14``).
        explain: Extra :class:`~lightning_neurons.explanation.settings.ExplainConfig` fields.
    """

    split: str = "held_out"
    networks: Sequence[str] = NETWORKS
    encoders: Sequence[str] = tuple(ENCODERS)
    seed: int = 0
    probe_per_class: int = 16
    train_per_class: int = 48
    epochs: int = 6
    top_k: int = 8
    reservoir_size: int = 48
    layers: dict[str, str] = field(default_factory=dict)
    explain: dict[str, Any] = field(default_factory=dict)


def kind_fractions(units: Sequence[Any]) -> dict[str, Any]:
    """Share of each kind among ``units`` (``"legacy"`` counts units without a kind), the unit count, the mean score.

    The mean score leaves out units whose score is NaN (dead units); ``None`` when no unit has a score.

    Example:
        >>> from lightning_neurons.results import UnitExplanation
        >>> units = [UnitExplanation("l", i, None, "red", 0.5, kind=k) for i, k in enumerate(["concept", "dead"])]
        >>> kind_fractions(units)["concept"], kind_fractions(units)["units"]
        (0.5, 2)
    """
    counts = Counter(u.kind if u.kind is not None else "legacy" for u in units)
    n = max(1, len(units))
    out: dict[str, Any] = {kind: counts.get(kind, 0) / n for kind in UNIT_KINDS}
    if counts.get("legacy"):
        out["legacy"] = counts["legacy"] / n
    out["units"] = len(units)
    scores = [float(u.score) for u in units if u.score == u.score]  # a dead unit's score is NaN
    out["mean_score"] = sum(scores) / len(scores) if scores else None
    return out


def _networks(name: str, cfg: RandomisationConfig, train_set: Any) -> dict[str, nn.Module]:
    if name == "smallcnn":
        from lightning_neurons.benchmark.quality import BenchmarkConfig, train_classifier

        bench = BenchmarkConfig(split=cfg.split, seed=cfg.seed, epochs=cfg.epochs, train_per_class=cfg.train_per_class)
        return {
            "trained": train_classifier(bench, train_set),
            "random": train_classifier(dataclasses.replace(bench, epochs=0), train_set),
        }
    if name == "mobilenet_v2":
        from torchvision.models import mobilenet_v2

        from lightning_neurons.backends.embedded import load_mobilenet

        torch.manual_seed(cfg.seed)
        return {"trained": load_mobilenet("cpu"), "random": mobilenet_v2().eval()}
    raise ValueError(f"unknown network {name!r}; choose from {list(NETWORKS)}")


def run_randomisation(config: RandomisationConfig | None = None) -> dict[str, Any]:
    """Explain trained and random-weight networks with each encoder; the share of each kind, as one JSON-able dict.

    Returns:
        ``{network: {encoder: {"trained": {kind: share, "units", "mean_score"}, "random": {...}}},
        "checks": {network: {encoder: {"random_concept_at_most_0.1", "trained_more_concept"}}}, "setup": {...}}``.

    Raises:
        ValueError: For an unknown network or encoder name.
    """
    from torch.utils.data import DataLoader

    from lightning_neurons.backends import load_backend
    from lightning_neurons.benchmark.quality import MemoEncoder
    from lightning_neurons.benchmark.scenes import SceneCrops, split_classes
    from lightning_neurons.concepts.vocabulary import Vocabulary
    from lightning_neurons.demo.data import IMAGE_MEAN, IMAGE_STD
    from lightning_neurons.explanation.pipeline import explain_recording
    from lightning_neurons.explanation.settings import ExplainConfig
    from lightning_neurons.recording.recorder import collect_top_k
    from lightning_neurons.recording.samples import DataLoaderSampleSource

    cfg = config or RandomisationConfig()
    unknown = [e for e in cfg.encoders if e not in ENCODERS] + [n for n in cfg.networks if n not in NETWORKS]
    if unknown:
        raise ValueError(f"unknown names {unknown}; networks: {list(NETWORKS)}, encoders: {list(ENCODERS)}")
    start = time.perf_counter()
    scenes = split_classes(cfg.split)
    explain_cfg = ExplainConfig(
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
        seed=cfg.seed,
        show_progress=False,
        preview_units={},
        **cfg.explain,
    )
    result: dict[str, Any] = {}
    checks: dict[str, Any] = {}
    timings: dict[str, float] = {}
    backends = {}
    for encoder in cfg.encoders:
        loaded = load_backend("embedded", device="cpu", generator=False, **ENCODERS[encoder])
        backends[encoder] = dataclasses.replace(loaded, encoder=MemoEncoder(loaded.encoder))
    for network in cfg.networks:
        size = _IMAGE_SIZE[network]
        train_set = SceneCrops(scenes, cfg.train_per_class, 64, seed=cfg.seed)
        probe_set = SceneCrops(scenes, cfg.probe_per_class, size, seed=cfg.seed + 1)
        loader = DataLoader(probe_set, batch_size=32)
        source = DataLoaderSampleSource(loader)
        layer = cfg.layers.get(network, _LAYERS[network])
        nets = _networks(network, cfg, train_set)
        recordings = {
            state: collect_top_k(
                net, loader, [layer], cfg.top_k, reservoir_size=cfg.reservoir_size, seed=cfg.seed, show_progress=False
            )
            for state, net in nets.items()
        }
        result[network] = {}
        checks[network] = {}
        for encoder, backend in backends.items():
            vocabulary = Vocabulary(
                ["general", "classes"],
                class_names=list(probe_set.classes),
                exclude_general=backend.basis_concepts,
                show_progress=False,
            )
            row: dict[str, Any] = {"layer": layer}
            for state, net in nets.items():
                tic = time.perf_counter()
                rnd = explain_recording(
                    net,
                    recordings[state],
                    source,
                    backend,
                    vocabulary,
                    explain_cfg,
                    class_names=list(probe_set.classes),
                )
                row[state] = kind_fractions(rnd.layer(layer))
                timings[f"{network}/{encoder}/{state}"] = round(time.perf_counter() - tic, 1)
            result[network][encoder] = row
            checks[network][encoder] = {
                "random_concept_at_most_0.1": row["random"]["concept"] <= 0.1,
                "trained_more_concept": row["trained"]["concept"] > row["random"]["concept"],
            }
    result["checks"] = checks
    result["setup"] = {
        **{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()},
        "classes": [s.name for s in scenes],
        "encoders": {name: ENCODERS[name] for name in cfg.encoders},
        "timings_s": timings,
        "seconds": round(time.perf_counter() - start, 1),
    }
    return result


__all__ = ["ENCODERS", "NETWORKS", "RandomisationConfig", "kind_fractions", "run_randomisation"]
