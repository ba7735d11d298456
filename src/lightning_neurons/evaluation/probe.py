"""The evaluation probe: held-out images with labels, the units' activations on them and their embeddings.

Simulation, contrast and ablation all look at the same held-out samples, so they are run through the model
and the image encoder once (:func:`build_probe`) and every metric reads the resulting :class:`Probe`.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    >>> acts = layer_activations(model, torch.randn(5, 3, 8, 8), ["1"])
    >>> tuple(acts["1"].shape)
    (5, 4)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_neurons.backends.base import ImageTextEncoder
from lightning_neurons.recording.hooks import ForwardFn, LayerTaps, SelectorSpec
from lightning_neurons.recording.samples import InputKey, SampleSource, batch_inputs, batch_targets
from lightning_neurons.recording.types import Reduction
from lightning_neurons.recording.units import TokenMode, reduce_maps
from lightning_neurons.regions import images_from_inputs

ProbeData = Iterable[Any] | tuple[Tensor, Tensor]


@dataclass
class Probe:
    """Held-out samples prepared for evaluation.

    Args:
        inputs: ``[N, ...]`` model inputs.
        labels: ``[N]`` int64 class labels (``-1`` where unknown).
        activations: Per layer, ``[N, U]`` per-sample unit values (spatial max or mean, as in recording).
        image_embeddings: ``[N, D]`` L2-normalised encoder embeddings of the whole images.
        ablation: Per layer, ``{unit: [(class, drop), ...]}`` once measured (it does not depend on the
            descriptions, so every method evaluated on this probe shares it).
        ablation_measure: The hurt measure ``ablation`` was computed with (``"probability"`` or ``"accuracy"``;
            ``None`` before any); evaluating with another measure recomputes it.
    """

    inputs: Tensor
    labels: Tensor
    activations: dict[str, Tensor] = field(default_factory=dict)
    image_embeddings: Tensor | None = None
    ablation: dict[str, dict[int, list[tuple[str, float]]]] = field(default_factory=dict)
    ablation_measure: str | None = None

    def __len__(self) -> int:
        return int(self.inputs.shape[0])


def probe_tensors(probe: ProbeData, input_key: InputKey = None, target_key: InputKey = None) -> tuple[Tensor, Tensor]:
    """Materialise a probe given as ``(inputs, labels)`` or as a dataloader into two CPU tensors.

    Args:
        probe: ``(inputs [N, ...], labels [N])`` or an iterable of batches (a ``DataLoader``).
        input_key: Index/key of the inputs in a batch (``None``: guess).
        target_key: Index/key of the labels in a batch (``None``: guess; missing labels become ``-1``).

    Raises:
        ValueError: If the probe is empty or inputs and labels disagree in length.

    Example:
        >>> import torch
        >>> x, y = probe_tensors([(torch.zeros(2, 3, 4, 4), torch.tensor([0, 1]))])
        >>> tuple(x.shape), y.tolist()
        ((2, 3, 4, 4), [0, 1])
    """
    if isinstance(probe, tuple) and len(probe) == 2 and all(isinstance(t, Tensor) for t in probe):
        inputs, labels = probe
    else:
        xs, ys = [], []
        for batch in probe:
            x = batch_inputs(batch, input_key)
            y = batch_targets(batch, target_key)
            xs.append(x.detach().cpu())
            ys.append(y.detach().cpu().long() if y is not None else torch.full((x.shape[0],), -1, dtype=torch.long))
        if not xs:
            raise ValueError("the evaluation probe is empty")
        inputs, labels = torch.cat(xs), torch.cat(ys)
    if inputs.shape[0] == 0 or inputs.shape[0] != labels.shape[0]:
        raise ValueError(f"probe needs N > 0 inputs with N labels, got {inputs.shape[0]} and {labels.shape[0]}")
    return inputs, labels.long()


@torch.no_grad()
def layer_activations(
    model: nn.Module,
    inputs: Tensor,
    layers: Sequence[str],
    *,
    reduction: Reduction = "max",
    token_mode: TokenMode = "auto",
    batch_size: int = 128,
    output_selector: SelectorSpec = None,
    forward_fn: ForwardFn | None = None,
) -> dict[str, Tensor]:
    """Per-sample unit values of ``layers``, reduced over each unit's map the way recording reduces them.

    The model runs in ``eval()`` mode; its mode is restored and every hook removed afterwards, also on error.

    Args:
        model: The network.
        inputs: ``[N, ...]`` model inputs (moved to the model's device batch by batch).
        layers: Layer names in ``model.named_modules()``.
        reduction: ``"max"`` or ``"mean"`` over a unit's spatial map.
        token_mode: Class-token handling for ``[B, T, D]`` outputs.
        batch_size: Forward batch size.
        output_selector: Which part of a tuple/dict layer output holds the units: one selector or
            ``{layer name or glob: selector}``, as in recording.
        forward_fn: How to run the model, ``forward_fn(model, inputs)`` (``None``: ``model(inputs)``).

    Returns:
        Per layer, float32 ``[N, U]`` on the CPU.

    Raises:
        KeyError: If a layer is not in the model.
    """
    taps = LayerTaps.from_names(model, layers, output_selector, token_mode)
    chunks: dict[str, list[Tensor]] = {name: [] for name in taps.layers}

    def record(name: str, out: Tensor) -> None:
        chunks[name].append(reduce_maps(taps.unit_maps(name, out.detach()), reduction)[0].float().cpu())

    with taps.hooks(record, forward_fn=forward_fn) as run:
        for start in range(0, inputs.shape[0], batch_size):
            run(inputs[start : start + batch_size])
    return {name: torch.cat(parts) for name, parts in chunks.items()}


@torch.no_grad()
def encode_probe_images(
    encoder: ImageTextEncoder,
    inputs: Tensor,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    batch_size: int = 64,
) -> Tensor:
    """Embed the probe's whole images with the image-text encoder.

    Args:
        encoder: The backend's image-text encoder.
        inputs: ``[N, C, H, W]`` model inputs.
        image_mean: Normalisation mean of the inputs (``None`` with ``image_std=None``: per-image min-max).
        image_std: Normalisation standard deviation of the inputs.
        batch_size: Encoder batch size.

    Returns:
        float32 ``[N, D]`` L2-normalised embeddings.
    """
    parts = []
    for start in range(0, inputs.shape[0], batch_size):
        images = images_from_inputs(inputs[start : start + batch_size], image_mean, image_std)
        parts.append(encoder.encode_images(images).float().cpu())
    return torch.cat(parts)


def build_probe(
    model: nn.Module,
    probe: ProbeData,
    layers: Sequence[str],
    encoder: ImageTextEncoder | None = None,
    *,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    reduction: Reduction = "max",
    token_mode: TokenMode = "auto",
    input_key: InputKey = None,
    target_key: InputKey = None,
    exclude_ids: Iterable[int] | None = None,
    output_selector: SelectorSpec = None,
    forward_fn: ForwardFn | None = None,
) -> Probe:
    """Run the held-out probe through the model (activations) and the encoder (image embeddings) once.

    Args:
        model: The network whose units were explained.
        probe: ``(inputs, labels)`` or a dataloader of held-out samples.
        layers: Layers whose activations are needed.
        encoder: Image-text encoder; ``None`` skips the embeddings (ablation-only evaluation).
        image_mean: Input normalisation mean (to turn inputs back into ``[0, 1]`` images).
        image_std: Input normalisation standard deviation.
        reduction: Per-sample reduction of a unit's map.
        token_mode: Class-token handling for token outputs.
        input_key: Index/key of the inputs in a batch.
        target_key: Index/key of the labels in a batch.
        exclude_ids: Positions in the probe to leave out, e.g. the samples the explanations were made from
            when the same loader is used for both (the metrics are only honest on held-out samples).
        output_selector: Which part of a tuple/dict layer output holds the units (as in recording).
        forward_fn: How to run the model, ``forward_fn(model, inputs)`` (``None``: ``model(inputs)``).

    Returns:
        The :class:`Probe`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        >>> p = build_probe(model, (torch.randn(6, 3, 2, 2), torch.arange(6) % 3), ["1"], exclude_ids=[0])
        >>> len(p), tuple(p.activations["1"].shape)
        (5, (5, 3))
    """
    inputs, labels = probe_tensors(probe, input_key, target_key)
    if exclude_ids is not None:
        keep = torch.ones(inputs.shape[0], dtype=torch.bool)
        drop = torch.tensor([i for i in exclude_ids if 0 <= int(i) < inputs.shape[0]], dtype=torch.long)
        keep[drop] = False
        if int(keep.sum()) < 2:
            raise ValueError("fewer than two probe samples are left after exclude_ids")
        inputs, labels = inputs[keep], labels[keep]
    activations = layer_activations(
        model,
        inputs,
        layers,
        reduction=reduction,
        token_mode=token_mode,
        output_selector=output_selector,
        forward_fn=forward_fn,
    )
    embeddings = encode_probe_images(encoder, inputs, image_mean, image_std) if encoder is not None else None
    return Probe(inputs=inputs, labels=labels, activations=activations, image_embeddings=embeddings)


def held_out_probe(
    source: SampleSource, explained: set[int], max_samples: int | None = None, *, seed: int = 0, chunk: int = 256
) -> tuple[Tensor, Tensor] | Any | None:
    """The probe samples outside every unit's top-k set, fetched by their global sample ids.

    Under DDP each rank's validation loader holds a shard, but sample ids are global (dataset indices), so the
    held-out samples are fetched from the dataset by id rather than by iterating rank 0's loader.

    Args:
        source: The sample source of the recording (a :class:`DataLoaderSampleSource`).
        explained: Ids in any unit's top-k set (:func:`~lightning_neurons.evaluation.explained_sample_ids`).
        max_samples: Keep at most this many, a random subset drawn with ``seed`` (``None``: all).
        seed: Seed of that draw.
        chunk: Samples fetched per call.

    Returns:
        ``(inputs, labels)`` (labels ``-1`` where the batches have none); the dataloader itself for an iterable
        dataset, whose size is unknown (then exclude ``explained`` by position); ``None`` when fewer than two
        samples are left.

    Raises:
        ValueError: If the source is not backed by a dataloader.
    """
    loader = getattr(source, "dataloader", None)
    if loader is None:
        raise ValueError("evaluate=True needs a dataloader-backed probe source")
    size = getattr(source, "size", None)
    if size is None:
        return loader
    ids = [i for i in range(size) if i not in explained]
    if len(ids) < 2:
        return None
    if max_samples is not None and len(ids) > max_samples:
        keep = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))[:max_samples].sort().values
        ids = [ids[int(i)] for i in keep]
    parts = [source.fetch(ids[start : start + chunk]) for start in range(0, len(ids), chunk)]
    inputs = torch.cat([x for x, _ in parts])
    if all(y is not None for _, y in parts):
        labels = torch.cat([y for _, y in parts if y is not None]).long()
    else:
        labels = torch.full((inputs.shape[0],), -1, dtype=torch.long)
    return inputs, labels


__all__ = [
    "Probe",
    "ProbeData",
    "build_probe",
    "encode_probe_images",
    "held_out_probe",
    "layer_activations",
    "probe_tensors",
]
