"""The published protocols on your own model and images: CLIP-Dissect's final layer and the simulation metric.

For people who have the weights (a CLIP, a ResNet-50, ImageNet): point :func:`run_protocol` at a model and an
ImageFolder and get the table in the published form.

- ``"final-layer"`` (CLIP-Dissect, Table 3): the output units of a classifier are explained with the class
  names as the vocabulary (top-1 / top-5 accuracy: is the unit's own class its description?) and with a general
  vocabulary (mean cosine similarity of the description with the class name in the text encoder's space).
  Unit ``j`` is class ``j``: the ImageFolder's sorted folders must follow the model's output order (true for
  ImageNet's ``n01440764 ...`` folders and torchvision's models); give ``class_names`` for readable names.
- ``"simulation"`` (Linear Explanations): the images are split in two halves; a layer's units are explained
  on one half and, on the other, each description's image-text similarity is correlated with the unit's
  activation (Pearson, mean over units).

Example:
    >>> out = run_protocol("final-layer", "torchvision:resnet50", "imagenet/val", "clip")  # doctest: +SKIP
    >>> print(out["table"])  # doctest: +SKIP
    | method | top-1 | top-5 | cos. sim. (class name) | units | images |
    | --- | --- | --- | --- | --- | --- |
    | lightning-neurons (clip) | 0.954 | 0.998 | 0.812 | 1000 | 50000 |
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from lightning_neurons.backends.base import Backend

Protocol = Literal["final-layer", "simulation"]
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def load_model(spec: str | nn.Module, weights: str | None = "DEFAULT") -> tuple[nn.Module, list[str] | None]:
    """A model and, where its weights name them, its class names.

    Args:
        spec: An ``nn.Module`` or ``"torchvision:<name>"`` (e.g. ``"torchvision:resnet50"``).
        weights: torchvision weights (``"DEFAULT"``, ``"IMAGENET1K_V2"``, ...; ``None``: random weights).

    Raises:
        ValueError: If ``spec`` is a string that is not ``torchvision:<name>``.

    Example:
        >>> model, names = load_model("torchvision:resnet18", weights=None)
        >>> names is None
        True
    """
    if isinstance(spec, nn.Module):
        return spec.eval(), None
    family, _, name = spec.partition(":")
    if family != "torchvision" or not name:
        raise ValueError(f"model {spec!r}: give an nn.Module or 'torchvision:<name>', e.g. 'torchvision:resnet50'")
    import torchvision

    model = torchvision.models.get_model(name, weights=weights)
    names = None
    if weights is not None:
        enum = torchvision.models.get_model_weights(name)
        chosen = enum.DEFAULT if weights == "DEFAULT" else enum[weights]
        names = list(chosen.meta.get("categories") or []) or None
    return model.eval(), names


def output_layer(model: nn.Module) -> str:
    """Name of the model's last ``nn.Linear`` (its classifier head).

    Raises:
        ValueError: If the model has no ``nn.Linear``.

    Example:
        >>> output_layer(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
        '2'
    """
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ValueError("the model has no nn.Linear output layer: pass layer=<name of its classifier>")
    return names[-1]


def run_protocol(
    protocol: Protocol,
    model: str | nn.Module,
    probe_dir: str | Path,
    backend: str | Backend = "clip",
    *,
    layer: str | None = None,
    class_names: Sequence[str] | None = None,
    vocabulary: Sequence[str] | None = None,
    weights: str | None = "DEFAULT",
    image_size: int = 224,
    top_k: int = 10,
    max_images: int | None = None,
    batch_size: int = 64,
    device: str | None = None,
    seed: int = 0,
    backend_kwargs: dict[str, Any] | None = None,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Run a published protocol on an ImageFolder and return its metrics and the table in the published form.

    Args:
        protocol: ``"final-layer"`` (CLIP-Dissect) or ``"simulation"`` (Linear Explanations).
        model: An ``nn.Module`` or ``"torchvision:<name>"`` (loaded with ``weights``).
        probe_dir: An ImageFolder (one folder per class, sorted in the model's output order for
            ``"final-layer"``).
        backend: ``"clip"`` (open_clip; its ``model_name`` / ``pretrained`` in ``backend_kwargs``), ``"embedded"``
            or a loaded :class:`Backend`.
        layer: The layer to explain (default: the model's last ``nn.Linear``; ``"simulation"`` usually wants a
            hidden layer, e.g. ``"layer4"``).
        class_names: Class names in output order (default: the weights' categories, else the folder names).
        vocabulary: Concepts for the general-vocabulary part (default: the built-in general vocabulary).
        weights: torchvision weights for a ``"torchvision:<name>"`` model (``None``: random weights).
        image_size: Side images are resized and centre-cropped to (ImageNet normalisation is applied).
        top_k: Top samples per unit.
        max_images: Use at most this many images (a seeded random subset; ``None``: all).
        batch_size: Batch size of the forward passes.
        device: Device of the model (``None``: CPU).
        seed: Seed of the subset, the split and the recording's reservoir.
        backend_kwargs: Keyword arguments of :func:`~lightning_neurons.backends.load_backend`.
        show_progress: Progress bars.

    Returns:
        ``{"protocol", "metrics", "rows", "table"}``: the metrics, the table's rows and the Markdown table.

    Raises:
        ValueError: If the protocol is unknown or the folder holds too few images or classes.

    Example:
        >>> out = run_protocol("simulation", "torchvision:resnet50", "val", "clip", layer="layer4")  # doctest: +SKIP
        >>> out["metrics"]["simulation"]  # doctest: +SKIP
        0.19
    """
    from torchvision import datasets, transforms

    from lightning_neurons.backends import load_backend
    from lightning_neurons.concepts.vocabulary import Vocabulary
    from lightning_neurons.evaluation.final_layer import final_layer_accuracy, final_layer_similarity
    from lightning_neurons.evaluation.probe import build_probe
    from lightning_neurons.evaluation.simulation import simulation_scores
    from lightning_neurons.explanation.pipeline import explain_recording
    from lightning_neurons.explanation.settings import ExplainConfig
    from lightning_neurons.recording.recorder import collect_top_k
    from lightning_neurons.recording.samples import DataLoaderSampleSource

    if protocol not in ("final-layer", "simulation"):
        raise ValueError(f"unknown protocol {protocol!r}; choose 'final-layer' or 'simulation'")
    net, weight_names = load_model(model, weights)
    net = net.to(device or "cpu")
    transform = transforms.Compose(
        [
            transforms.Resize(image_size),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(_IMAGENET_MEAN, _IMAGENET_STD),
        ]
    )
    folder = datasets.ImageFolder(str(probe_dir), transform=transform)
    names = list(class_names or weight_names or [c.replace("_", " ") for c in folder.classes])
    order = torch.randperm(len(folder), generator=torch.Generator().manual_seed(seed)).tolist()
    if max_images is not None:
        order = order[:max_images]
    order.sort()
    if len(order) < 8:
        raise ValueError(f"{probe_dir} holds {len(order)} images; the protocols need at least 8")
    loaded = load_backend(backend, device=device or "cpu", **(backend_kwargs or {}))
    layer = layer or output_layer(net)
    general = (
        list(vocabulary)
        if vocabulary is not None
        else Vocabulary(["general"], exclude_general=loaded.basis_concepts, show_progress=False)
    )
    explain_cfg = ExplainConfig(
        image_mean=_IMAGENET_MEAN, image_std=_IMAGENET_STD, seed=seed, show_progress=show_progress, preview_units={}
    )

    def explain(indices: list[int], concepts: Any) -> Any:
        loader = DataLoader(Subset(folder, indices), batch_size=batch_size)
        recording = collect_top_k(net, loader, [layer], top_k, seed=seed, show_progress=show_progress)
        return explain_recording(net, recording, DataLoaderSampleSource(loader), loaded, concepts, explain_cfg)

    metrics: dict[str, Any] = {"images": len(order), "layer": layer, "backend": loaded.name}
    if protocol == "final-layer":
        by_class = explain(order, names)
        units = by_class.layer(layer)
        if len(units) > len(names):  # e.g. 1,000 logits and a 10-class folder: keep the named units
            by_class.units = [u for u in by_class.units if u.layer != layer or u.unit < len(names)]
        accuracy = final_layer_accuracy(by_class, layer, names)
        by_general = explain(order, general)
        by_general.units = [u for u in by_general.units if u.layer != layer or u.unit < len(names)]
        embed = loaded.text_encoder.encode_texts if loaded.text_encoder is not None else loaded.encoder.encode_texts
        similarity = final_layer_similarity(by_general, layer, names, embed)
        metrics.update(
            top1=accuracy["top1"], top5=accuracy["top5"], class_similarity=float(similarity.mean()), units=len(units)
        )
        header = ["method", "top-1", "top-5", "cos. sim. (class name)", "units", "images"]
        row = [
            f"lightning-neurons ({loaded.name})",
            *(f"{metrics[k]:.3f}" for k in ("top1", "top5", "class_similarity")),
            str(min(len(units), len(names))),
            str(len(order)),
        ]
    else:
        explaining, held_out = order[::2], order[1::2]
        rnd = explain(explaining, general)
        inputs = torch.stack([folder[i][0] for i in held_out])
        labels = torch.tensor([folder[i][1] for i in held_out])
        probe = build_probe(
            net, (inputs, labels), [layer], loaded.encoder, image_mean=_IMAGENET_MEAN, image_std=_IMAGENET_STD
        )
        units = rnd.layer(layer)
        assert probe.image_embeddings is not None
        texts = loaded.encoder.encode_texts([u.description for u in units])
        acts = probe.activations[layer][:, [u.unit for u in units]]
        scores = simulation_scores(acts, probe.image_embeddings, texts)
        metrics.update(simulation=float(scores.mean()), units=len(units), held_out_images=len(held_out))
        header = ["method", "simulation (Pearson)", "units", "explaining images", "held-out images"]
        row = [
            f"lightning-neurons ({loaded.name})",
            f"{metrics['simulation']:.3f}",
            str(len(units)),
            str(len(explaining)),
            str(len(held_out)),
        ]
    table = "\n".join(
        [
            "| " + " | ".join(header) + " |",
            "| " + " | ".join("---" for _ in header) + " |",
            "| " + " | ".join(row) + " |",
        ]
    )
    return {"protocol": protocol, "metrics": metrics, "rows": [dict(zip(header, row))], "table": table}


__all__ = ["load_model", "output_layer", "run_protocol"]
