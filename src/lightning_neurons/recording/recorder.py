"""Forward hooks that stream per-unit top-k activations of chosen layers, and :func:`collect_top_k`.

:class:`ActivationRecorder` is the engine of :class:`~lightning_neurons.NeuronExplainer`; :func:`collect_top_k`
runs it over a dataloader outside training (post-hoc explanation of a checkpoint).

Inside a hook the output is detached, turned into per-unit maps (:func:`~lightning_neurons.recording.units.unit_maps`),
reduced over the map in its own dtype (bf16 under autocast, channels_last as is) and only the reduced ``[B, U]``
values are cast to float32 and appended to the layer's :class:`~lightning_neurons.recording.topk.TopKBuffer`.
Nothing is read back to the host until :meth:`ActivationRecorder.result`.

Memory held, in bytes, for layers with ``U_l`` units, ``k = top_k``, reservoir ``R``, batch ``B`` and
``M = merge_rows``: ``sum_l [U_l * k * 28 + (M + B) * (U_l * 12 + 16)] + 28 * R`` (+ transient merge
buffers), independent of the number of probe samples.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_neurons.recording.hooks import ForwardFn, LayerTaps, SelectorSpec, TapHandle
from lightning_neurons.recording.layers import LayerSpec
from lightning_neurons.recording.samples import InputKey, batch_inputs, batch_targets
from lightning_neurons.recording.topk import AllGather, Reservoir, TopKBuffer
from lightning_neurons.recording.types import LayerTopK, Recording, Reduction, UnitKind
from lightning_neurons.recording.units import TokenMode, infer_kind, reduce_maps, unit_maps

log = logging.getLogger(__name__)


def _max_argmax(maps: Tensor) -> tuple[Tensor, Tensor]:
    return reduce_maps(maps, "max")


# reduce_maps is already one fused max+argmax pass over the native layout. LIGHTNING_NEURONS_COMPILE=1 puts it
# through torch.compile on CUDA instead (guarded: any failure falls back to eager torch for the process).
_compiled_max_argmax: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None
_compile_failed = os.environ.get("LIGHTNING_NEURONS_COMPILE", "0") != "1"


def _reduce(maps: Tensor, reduction: Reduction) -> tuple[Tensor, Tensor]:
    global _compiled_max_argmax, _compile_failed
    if reduction == "max" and maps.is_cuda and not _compile_failed:
        try:
            if _compiled_max_argmax is None:
                _compiled_max_argmax = torch.compile(_max_argmax)  # shapes differ per layer: auto-dynamic
            return _compiled_max_argmax(maps)
        except Exception as err:  # noqa: BLE001 - any backend failure: use the eager path
            _compile_failed = True
            log.warning("torch.compile of the recording reduction failed (%s); using eager torch", err)
    return reduce_maps(maps, reduction)


@dataclass
class _Batch:
    """Sample ids of the batch being forwarded; created by ``begin_batch``."""

    size: int | None
    start: int
    labels: Tensor | None
    seen: set[str] = field(default_factory=set)
    ids: dict[torch.device, Tensor] = field(default_factory=dict)


class ActivationRecorder:
    """Records the running per-unit top-k activating samples of chosen layers through forward hooks.

    Call :meth:`begin_batch` before each forward pass of probe data so that samples get ids (a probe sample's id
    is its position in this process' stream, made global as ``position * world_size + rank``; see
    docs/ARCHITECTURE.md). Without it, ids continue from the last batch, with the batch size read off the output.
    A layer that runs more than once per batch (a reused module) is recorded on its first call only.

    Memory bound (bytes, independent of the number of probe samples ``N``):
    ``sum over layers of [U * k * 28 + (merge_rows + B) * (U * 12 + 16)] + 28 * reservoir_size``.

    Args:
        model: The network.
        layers: A layer spec (see :func:`~lightning_neurons.recording.layers.resolve_layers`) or an already
            resolved ``{name: module}`` mapping.
        top_k: Samples kept per unit.
        reduction: ``"max"`` (spatial maximum) or ``"mean"`` of a unit's map; the peak is the argmax either way.
        token_mode: For ``[B, T, D]`` outputs: ``"auto"`` drops a leading class token when the rest is a
            square grid, ``"drop_first"`` always drops it, ``"keep_all"`` never does.
        output_selector: Which part of a tuple/dict output to record: one selector for every layer or a
            ``{layer name or glob: index | key | callable}`` mapping.
        reservoir_size: Size of the uniform random control sample of probe ids.
        seed: Seed of the reservoir.
        world_size: Number of processes sharing the probe set (DDP).
        rank: This process' global rank.
        merge_rows: Pending candidate rows per layer that trigger a merge (amortises the top-k merge).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        >>> with ActivationRecorder(model, "0", top_k=2) as rec:
        ...     rec.begin_batch(5)
        ...     _ = model(torch.randn(5, 3, 8, 8))
        >>> rec.result(epoch=0).layers["0"].sample_ids.shape
        torch.Size([4, 2])
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSpec | Mapping[str, nn.Module],
        top_k: int = 16,
        reduction: Reduction = "max",
        token_mode: TokenMode = "auto",
        output_selector: SelectorSpec = None,
        reservoir_size: int = 256,
        seed: int = 0,
        *,
        world_size: int = 1,
        rank: int = 0,
        merge_rows: int = 2048,
    ) -> None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if reduction not in ("max", "mean"):
            raise ValueError(f"reduction must be 'max' or 'mean', got {reduction!r}")
        if token_mode not in ("auto", "drop_first", "keep_all"):
            raise ValueError(f"token_mode must be 'auto', 'drop_first' or 'keep_all', got {token_mode!r}")
        if reservoir_size < 0:
            raise ValueError(f"reservoir_size must be >= 0, got {reservoir_size}")
        self.model = model
        #: The layers, their output selectors (names and globs) and the token mode: how layers are touched.
        self.taps = LayerTaps(model, layers, output_selector, token_mode)
        self.layers: dict[str, nn.Module] = self.taps.layers
        self.top_k = top_k
        self.reduction: Reduction = reduction
        self.reservoir_size = reservoir_size
        self.seed = seed
        self.world_size = world_size
        self.rank = rank
        self.merge_rows = merge_rows
        self._attached: TapHandle | None = None
        self._warned_reuse: set[str] = set()
        self._warned_missed: set[str] = set()
        self.reset()

    # ------------------------------------------------------------------ hooks
    @property
    def num_hooks(self) -> int:
        """Number of forward hooks currently registered by this recorder."""
        return len(self._attached) if self._attached is not None else 0

    @property
    def attached(self) -> bool:
        """Whether the hooks are registered."""
        return self._attached is not None

    def attach(self) -> ActivationRecorder:
        """Register one forward hook per layer (idempotent).

        While attached, ``torch.compile`` runs eagerly so that a compiled model's forward sees the hooks (see
        :mod:`lightning_neurons.recording.hooks`).
        """
        if self._attached is None:
            self._attached = self.taps.attach(self._record)
        return self

    def detach(self) -> None:
        """Remove every hook this recorder registered (idempotent, safe to call in ``finally``)."""
        if self._attached is not None:
            attached, self._attached = self._attached, None
            attached.remove()

    def __enter__(self) -> ActivationRecorder:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget everything recorded (start of a new validation pass)."""
        self._buffers: dict[str, TopKBuffer] = {}
        self._kinds: dict[str, UnitKind] = {}
        self._map_sizes: dict[str, tuple[int, int] | None] = {}
        self._reservoir: Reservoir | None = None
        self._position = 0  # samples seen by this process
        self._batch: _Batch | None = None
        self._skip = False
        self._synced_samples: int | None = None
        self._nonfinite: Tensor | None = None
        self._batches = 0  # batches begun with a known size
        self._missed: dict[str, int] = {}  # per layer, such batches whose forward never reached it

    @property
    def num_samples(self) -> int:
        """Probe samples seen (by all ranks after :meth:`sync`, by this process before)."""
        return self._synced_samples if self._synced_samples is not None else self._position

    def begin_batch(self, batch_size: int | None, labels: Tensor | None = None) -> None:
        """Start a probe batch: the next forward pass' samples get the next ids.

        Args:
            batch_size: Number of samples in the batch, or ``None`` to read it off the first hooked output.
            labels: Optional ``[B]`` integer class labels; kept only for samples that end up in a top-k set
                or in the reservoir.
        """
        self._close_batch()
        self._skip = False
        if labels is not None and (labels.dim() != 1 or labels.is_floating_point() or labels.is_complex()):
            labels = None  # one-hot, soft or dense targets: not class indices
        if labels is not None and batch_size is not None and labels.shape[0] != batch_size:
            labels = None
        self._batch = _Batch(size=batch_size, start=self._position, labels=labels)
        if batch_size is not None:
            self._position += batch_size

    def skip_batch(self) -> None:
        """Ignore the next forward pass(es) until the next :meth:`begin_batch` (e.g. another dataloader)."""
        self._close_batch()
        self._skip = True

    def _close_batch(self) -> None:
        # A batch begun with size None whose forward hooked nothing used no ids: nothing to account for.
        batch, self._batch = self._batch, None
        if batch is not None and batch.size:
            self._batches += 1
            for name in self.layers:
                if name not in batch.seen:
                    self._missed[name] = self._missed.get(name, 0) + 1

    def _record(self, name: str, out: Tensor) -> None:
        if self._skip:
            return
        batch = self._batch
        if batch is None:  # no begin_batch: ids continue from the previous batch
            self.begin_batch(None)
            batch = self._batch
            assert batch is not None
        if name in batch.seen:
            if name not in self._warned_reuse:
                self._warned_reuse.add(name)
                warnings.warn(
                    f"layer {name!r} ran more than once per batch; only its first call is recorded", stacklevel=2
                )
            return
        batch.seen.add(name)

        out = out.detach()
        kind = self._kinds.get(name) or infer_kind(out, name)
        maps = unit_maps(out, kind, self.token_mode, name)
        values, peaks = _reduce(maps, self.reduction)
        n, units = values.shape
        if batch.size is None:
            batch.size = n
            self._position += n
        elif n != batch.size:
            raise ValueError(
                f"layer {name!r} output has batch dimension {n} but the batch has {batch.size} samples; "
                "record a layer whose first dimension is the batch"
            )
        device = values.device
        ids = batch.ids.get(device)
        if ids is None:
            ids = (torch.arange(batch.start, batch.start + n, device=device) * self.world_size) + self.rank
            batch.ids[device] = ids
        labels = batch.labels.to(device, non_blocking=True) if batch.labels is not None else None

        buffer = self._buffers.get(name)
        if buffer is None:
            self._kinds[name] = kind
            self._map_sizes[name] = None if kind == "linear" else (int(maps.shape[2]), int(maps.shape[3]))
            buffer = self._buffers[name] = TopKBuffer(units, self.top_k, device=device, merge_rows=self.merge_rows)
        elif units != buffer.num_units:
            raise ValueError(f"layer {name!r} changed from {buffer.num_units} to {units} units between batches")
        buffer.add(values, ids, None if kind == "linear" else peaks, labels)

        if len(batch.seen) == 1:  # first recorded layer of this batch offers the samples to the reservoir
            if self._reservoir is None:
                self._reservoir = Reservoir(self.reservoir_size, self.seed, device=device)
            self._reservoir.add(ids, labels)

    # ------------------------------------------------------------------ results
    def sync(
        self,
        all_gather: AllGather | Any,
        *,
        device: torch.device | str | None = None,
        num_samples: int | None = None,
    ) -> None:
        """Merge the buffers of all ranks in place. A collective: call it on every rank, never only on rank 0.

        Every rank ends up with the same buffers, equal to what one process would have recorded over the whole
        probe set. With ``world_size == 1`` this only flushes pending candidates.

        Args:
            all_gather: A callable ``tensor -> [W, *tensor.shape]`` or an object with an ``all_gather`` method
                (a Lightning ``Strategy`` or ``LightningModule``).
            device: Device for the collective's bookkeeping tensors (e.g. the module's device); defaults to the
                buffers' device, else the CPU.
            num_samples: Size of the probe set when known; ids ``>= num_samples`` (a ``DistributedSampler``'s
                padding duplicates) are dropped.
        """
        gather: AllGather = all_gather.all_gather if hasattr(all_gather, "all_gather") else all_gather
        if self.world_size <= 1:
            for buffer in self._buffers.values():
                buffer.flush()
            return
        if device is None:
            device = next((b.device for b in self._buffers.values()), torch.device("cpu"))
        device = torch.device(device)

        # Ranks that saw no batch do not know the layers' shapes yet: agree on them first (one small gather).
        names = list(self.layers)
        codes = {"conv": 0, "token": 1, "linear": 2}
        meta = torch.full((len(names), 4), -1, dtype=torch.long, device=device)
        for i, name in enumerate(names):
            if name in self._buffers:
                h, w = self._map_sizes[name] or (0, 0)
                meta[i] = torch.tensor([self._buffers[name].num_units, h, w, codes[self._kinds[name]]])
        counts = torch.tensor([self._position], dtype=torch.long, device=device)
        meta_all = _stacked(gather(meta), meta).amax(dim=0).tolist()
        total = int(_stacked(gather(counts), counts).sum())
        kinds_by_code: dict[int, UnitKind] = {v: k for k, v in codes.items()}  # type: ignore[misc]
        for name, (units, h, w, code) in zip(names, meta_all):
            if units < 0:
                continue  # no rank ran this layer: nothing to merge
            if name not in self._buffers:
                self._kinds[name] = kinds_by_code[code]
                self._map_sizes[name] = None if code == codes["linear"] else (h, w)
                self._buffers[name] = TopKBuffer(units, self.top_k, device=device, merge_rows=self.merge_rows)
        limit = num_samples
        for name in names:
            if name in self._buffers:
                self._buffers[name].merge_across_ranks(gather, limit)
        if self._reservoir is None:
            self._reservoir = Reservoir(self.reservoir_size, self.seed, device=device)
        self._reservoir.merge_across_ranks(gather, limit)
        self._synced_samples = min(total, num_samples) if num_samples is not None else total

    def result(self, epoch: int | None = None) -> Recording:
        """Read the buffers back (host sync happens here, once) as a CPU :class:`Recording`.

        Args:
            epoch: Epoch to stamp on the recording (``None`` post hoc).
        """
        self._close_batch()
        self._warn_missed()
        layers: dict[str, LayerTopK] = {}
        labels: dict[int, int] = {}
        nonfinite = 0
        for name in self.layers:
            buffer = self._buffers.get(name)
            if buffer is None:
                continue
            state = {k: v.detach().cpu() for k, v in buffer.state().items()}
            nonfinite += int(buffer.nonfinite)
            kind = self._kinds[name]
            layers[name] = LayerTopK(
                name=name,
                kind=kind,
                num_units=buffer.num_units,
                map_size=self._map_sizes[name],
                values=state["values"],
                sample_ids=state["sample_ids"],
                peaks=state["peaks"] if kind != "linear" else torch.full_like(state["peaks"], -1),
            )
            _collect_labels(labels, state["sample_ids"], state["labels"])
        if self._reservoir is not None:
            reservoir_ids = self._reservoir.ids().cpu()
            _collect_labels(labels, reservoir_ids, self._reservoir.labels().cpu())
        else:
            reservoir_ids = torch.empty(0, dtype=torch.long)
        if nonfinite:
            warnings.warn(
                f"{nonfinite} NaN/Inf unit activations were left out of the top-k ranking",
                RuntimeWarning,
                stacklevel=2,
            )
        return Recording(
            layers=layers,
            reservoir_ids=reservoir_ids,
            num_samples=self.num_samples,
            top_k=self.top_k,
            reduction=self.reduction,
            nonfinite=nonfinite,
            epoch=epoch,
            labels=labels,
        )

    @property
    def nbytes(self) -> int:
        """Bytes held by the top-k buffers and the reservoir (after a flush; pending chunks not included)."""
        total = sum(b.nbytes for b in self._buffers.values())
        return total + (self._reservoir.buffer.nbytes if self._reservoir is not None else 0)

    # ------------------------------------------------------------------ helpers
    @property
    def token_mode(self) -> TokenMode:
        """Class-token handling of token outputs (``taps.token_mode``)."""
        return self.taps.token_mode

    def _warn_missed(self) -> None:
        # A layer that never ran has no buffer and nothing to explain: most often a validation_step that does not
        # call the model's forward (it runs another module, or nothing), so the hooks never fire.
        never = [n for n in self.layers if n not in self._buffers and n not in self._warned_missed]
        if self._batches and never:
            self._warned_missed.update(never)
            names = ", ".join(repr(n) for n in never)
            warnings.warn(
                f"{'layer' if len(never) == 1 else 'layers'} {names} did not run in any of the {self._batches} probe "
                "batches, so nothing was recorded for them and they are not explained. The validation step (or "
                "forward_fn) must run the model's forward through them, e.g. `self(x)` in validation_step.",
                RuntimeWarning,
                stacklevel=3,
            )
        # A layer that ran in some probe batches but not in others has a top-k over part of the probe set only:
        # a forward that skips it, or a compiled graph that hides hooks (see recording/hooks.py).
        for name, missed in self._missed.items():
            if name in self._buffers and missed and name not in self._warned_missed:
                self._warned_missed.add(name)
                warnings.warn(
                    f"layer {name!r} ran in only {self._batches - missed} of {self._batches} probe batches; its "
                    "top-k covers those batches only (does the forward skip it, or hide hooks, e.g. a compiled "
                    "graph run outside the recorder?)",
                    RuntimeWarning,
                    stacklevel=3,
                )


def _stacked(gathered: Tensor, local: Tensor) -> Tensor:
    return gathered[None] if gathered.dim() == local.dim() else gathered


def _collect_labels(out: dict[int, int], ids: Tensor, labels: Tensor) -> None:
    mask = (ids >= 0) & (labels >= 0)
    # U * k entries name far fewer distinct samples: deduplicate in torch before the Python loop.
    unique, inverse = torch.unique(ids[mask], return_inverse=True)
    unique_labels = torch.empty_like(unique).scatter_(0, inverse, labels[mask])  # one label per sample id
    out.update(zip(unique.tolist(), unique_labels.tolist()))


def collect_top_k(
    model: nn.Module,
    dataloader: Iterable[Any],
    layers: LayerSpec,
    top_k: int = 16,
    *,
    input_key: InputKey = None,
    target_key: InputKey = None,
    device: torch.device | str | None = None,
    reduction: Reduction = "max",
    token_mode: TokenMode = "auto",
    output_selector: SelectorSpec = None,
    reservoir_size: int = 256,
    seed: int = 0,
    show_progress: bool = True,
    forward_fn: ForwardFn | None = None,
) -> Recording:
    """Record the top-k activating samples of ``layers`` over a dataloader, outside training.

    The model is run in ``eval()`` mode under ``torch.no_grad()``; its training mode is restored and every hook
    removed afterwards, also on error. Sample ids are positions in the dataloader's stream (the dataset index for
    a non-shuffling loader), as in the callback.

    Args:
        model: The network (a LightningModule works: its ``forward`` is called).
        dataloader: Probe batches (tensor, tuple/list or dict batches).
        layers: Layer spec: name, glob pattern, list of those, or predicate ``(name, module) -> bool``.
        top_k: Samples kept per unit.
        input_key: Index/key of the inputs in a batch (``None``: guess).
        target_key: Index/key of integer class labels in a batch (``None``: guess; labels are optional).
        device: Device to run on; ``None`` keeps the model where it is.
        reduction: ``"max"`` or ``"mean"`` over a unit's map.
        token_mode: Class-token handling for ``[B, T, D]`` outputs.
        output_selector: Which part of tuple/dict outputs to record: one selector or
            ``{layer name or glob: index | key | callable}`` (see :class:`ActivationRecorder`).
        reservoir_size: Size of the random control sample.
        seed: Reservoir seed.
        show_progress: Show a tqdm progress bar.
        forward_fn: How to run the model on a batch of inputs, ``forward_fn(model, inputs)``, for models whose
            ``forward`` is not ``forward(images)`` (e.g. ``lambda m, x: m.model(pixel_values=x)``); ``None``
            calls ``model(inputs)``.

    Returns:
        A CPU :class:`Recording` with ``epoch=None``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        >>> loader = [torch.randn(4, 3, 8, 8) for _ in range(3)]
        >>> rec = collect_top_k(model, loader, "1", top_k=5, show_progress=False)
        >>> rec.num_samples, tuple(rec.layers["1"].values.shape)
        (12, (4, 5))
    """
    from tqdm.auto import tqdm

    if device is not None:
        model.to(device)
    recorder = ActivationRecorder(model, layers, top_k, reduction, token_mode, output_selector, reservoir_size, seed)
    try:
        total: int | None = len(dataloader)  # type: ignore[arg-type]
    except TypeError:  # an iterable dataset without __len__
        total = None
    # The recorder is the tap function; its hooks are the only ones, removed (and the mode restored) on error too.
    with recorder.taps.hooks(recorder._record, forward_fn=forward_fn) as run:
        for batch in tqdm(dataloader, total=total, disable=not show_progress, desc="recording"):
            inputs = batch_inputs(batch, input_key)
            labels = batch_targets(batch, target_key)
            recorder.begin_batch(inputs.shape[0], labels)
            run(inputs)
        return recorder.result(epoch=None)


__all__ = ["ActivationRecorder", "collect_top_k"]
