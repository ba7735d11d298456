"""Touching a layer: forward hooks, output selection, unit kinds and running the model, in one place.

Every part of the library that looks at (or changes) a layer's output goes through a :class:`LayerTaps`: the
recorder, the explanation stage's forward pass and ablation, the evaluation probe and its ablation check. A
``LayerTaps`` is built once from the model, the layers, the ``output_selector`` (exact names and globs) and the
``token_mode``; :meth:`LayerTaps.hooks` registers forward hooks for the duration of a ``with`` block (in the
spirit of TransformerLens' ``hooks()``), calls ``fn(name, tensor)`` with the selected output tensor and, when
``fn`` returns a tensor, puts it back into the module's output structure (a tuple, list or dict output keeps its
other parts). Hooks are removed in ``finally``, the training mode is restored, and inputs are moved to the
model's device and cast to its parameter dtype.

While hooks are registered, ``torch.compile`` runs eagerly (``torch.compiler.set_stance("force_eager")``): a
graph compiled without the hooks does not see hooks added later (dynamo skips guards on module hooks by default),
so a compiled model would silently record the wrong values. Recording on a compiled model then costs an eager
forward, and is correct.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    >>> taps = LayerTaps(model, ["0"])
    >>> seen = {}
    >>> with taps.hooks(lambda name, out: seen.setdefault(name, out.shape)) as run:
    ...     _ = run(torch.zeros(4, 2))
    >>> seen["0"]
    torch.Size([4, 3])
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_neurons.recording.layers import LayerSpec, resolve_layers
from lightning_neurons.recording.types import UnitKind
from lightning_neurons.recording.units import OutputSelector, TokenMode, infer_kind, select_output, unit_maps

#: How to run the model on a batch of probe inputs: ``forward_fn(model, inputs)``; ``None`` calls ``model(inputs)``.
#: E.g. ``lambda m, x: m.model(pixel_values=x)`` for a Hugging Face style LightningModule.
ForwardFn = Callable[[nn.Module, Tensor], Any]
#: One selector for every layer, or ``{layer name or glob: selector}``.
SelectorSpec = OutputSelector | Mapping[str, OutputSelector] | None
#: ``fn(layer name, selected output) -> replacement tensor or None``.
TapFn = Callable[[str, Tensor], Tensor | None]


class StopForward(Exception):
    """Raised by the last wanted hook of a forward pass (``stop_early=True``); caught by the runner."""


def selector_for(selector: SelectorSpec, name: str) -> OutputSelector | None:
    """The output selector of layer ``name``: an exact mapping key wins, then the first matching glob key.

    Example:
        >>> selector_for({"blocks.*": 0, "blocks.1": "hidden"}, "blocks.0"), selector_for(1, "head")
        (0, 1)
    """
    if not isinstance(selector, Mapping):
        return selector
    if name in selector:
        return selector[name]
    return next((value for key, value in selector.items() if fnmatch.fnmatchcase(name, key)), None)


def resolve_selectors(names: Iterable[str], selector: SelectorSpec) -> dict[str, OutputSelector]:
    """Map each layer name to its output selector (see :func:`selector_for`); layers without one are left out.

    Raises:
        ValueError: If a mapping key matches none of the layers.

    Example:
        >>> resolve_selectors(["block.0", "block.1", "head"], {"block.*": 0, "block.1": "hidden"})
        {'block.0': 0, 'block.1': 'hidden'}
    """
    layer_names = list(names)
    if selector is None:
        return {}
    if isinstance(selector, Mapping):
        for key in selector:
            if key not in layer_names and not any(fnmatch.fnmatchcase(n, key) for n in layer_names):
                raise ValueError(f"output_selector key {key!r} matches none of the recorded layers {layer_names}")
    resolved = {name: selector_for(selector, name) for name in layer_names}
    return {name: value for name, value in resolved.items() if value is not None}


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for a model without either."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def prepare_inputs(model: nn.Module, inputs: Tensor) -> Tensor:
    """Move inputs to the model's device and cast floating inputs to its floating parameter dtype.

    Example:
        >>> prepare_inputs(nn.Linear(2, 2).double(), torch.zeros(1, 2)).dtype
        torch.float64
    """
    x = inputs.to(model_device(model), non_blocking=True)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if dtype is not None and x.is_floating_point() and x.dtype != dtype:
        x = x.to(dtype)
    return x


def run_model(model: nn.Module, inputs: Tensor, forward_fn: ForwardFn | None = None) -> Any:
    """``forward_fn(model, inputs)``, or ``model(inputs)`` without one."""
    return model(inputs) if forward_fn is None else forward_fn(model, inputs)


def _put_back(output: Any, selector: OutputSelector | None, selected: Tensor, new: Tensor) -> Any:
    """The module output with ``new`` in place of the selected tensor (other parts of the structure kept)."""
    if new is selected:
        return None
    if callable(selector):  # no way to rebuild the structure: write into the selected tensor
        selected.copy_(new)
        return None
    if selector is None or isinstance(output, Tensor):  # a tensor output is never indexed by a selector
        return new
    if isinstance(output, tuple) and isinstance(selector, int):
        items = list(output)
        items[selector] = new
        return type(output)(*items) if hasattr(output, "_fields") else tuple(items)
    replaced = copy.copy(output)  # list, dict or a dict-like model output: a shallow copy keeps the rest
    replaced[selector] = new
    return replaced


class TapRunner:
    """Runs the model inside :meth:`LayerTaps.hooks`; yielded by the ``with`` statement.

    Calling it forwards one batch (inputs moved and cast, ``forward_fn`` applied) and returns the model output,
    or ``None`` when the forward was stopped early after the last wanted layer.
    """

    def __init__(self, model: nn.Module, forward_fn: ForwardFn | None, wanted: Sequence[str], stop_early: bool):
        self.model = model
        self.forward_fn = forward_fn
        self.wanted = list(wanted)
        self.stop_early = stop_early
        self.pending: set[str] = set()
        self.seen: set[str] = set()

    def __call__(self, inputs: Tensor) -> Any:
        self.pending = set(self.wanted)
        self.seen = set()
        try:
            return run_model(self.model, prepare_inputs(self.model, inputs), self.forward_fn)
        except StopForward:
            return None

    def _mark(self, name: str) -> None:
        self.seen.add(name)
        if self.stop_early:
            self.pending.discard(name)
            if not self.pending:
                raise StopForward


class LayerTaps:
    """The layers of a model that the library touches, with each one's output selector and unit kind.

    Args:
        model: The network (the module whose forward is run; a LightningModule is fine).
        layers: A layer spec (name, glob, list, predicate; see :func:`~lightning_neurons.recording.layers.
            resolve_layers`) or an already resolved ``{name: module}`` mapping.
        output_selector: Which part of a tuple/dict output holds the units: one selector for every layer or
            ``{layer name or glob: index | key | callable}``.
        token_mode: Class-token handling of ``[B, T, D]`` outputs (``"auto"``, ``"drop_first"``, ``"keep_all"``).
        kinds: Unit kinds already known (e.g. from a recording); the others are inferred from the output rank.

    Raises:
        ValueError: If a layer or a selector key matches nothing, or ``token_mode`` is unknown.

    Example:
        >>> from torch import nn
        >>> taps = LayerTaps(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), "*", output_selector={"1": 0})
        >>> list(taps.layers), taps.selector_for("0"), taps.selector_for("1")
        (['0', '1'], None, 0)
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSpec | Mapping[str, nn.Module],
        output_selector: SelectorSpec = None,
        token_mode: TokenMode = "auto",
        *,
        kinds: Mapping[str, UnitKind] | None = None,
    ) -> None:
        if token_mode not in ("auto", "drop_first", "keep_all"):
            raise ValueError(f"token_mode must be 'auto', 'drop_first' or 'keep_all', got {token_mode!r}")
        self.model = model
        self.layers: dict[str, nn.Module] = (
            dict(layers) if isinstance(layers, Mapping) else resolve_layers(model, layers)
        )
        self.selectors = resolve_selectors(self.layers, output_selector)
        self.token_mode: TokenMode = token_mode
        self.kinds: dict[str, UnitKind] = dict(kinds or {})

    @classmethod
    def from_names(
        cls,
        model: nn.Module,
        names: Iterable[str],
        output_selector: SelectorSpec = None,
        token_mode: TokenMode = "auto",
        *,
        kinds: Mapping[str, UnitKind] | None = None,
    ) -> LayerTaps:
        """Taps on exactly these module names (e.g. a recording's layers); a glob selector key may match none.

        Raises:
            KeyError: If a name is not a module of the model.
        """
        modules = dict(model.named_modules(remove_duplicate=False))
        wanted = list(dict.fromkeys(names))
        unknown = [name for name in wanted if name not in modules]
        if unknown:
            raise KeyError(f"layers {unknown} are not modules of the model")
        if isinstance(output_selector, Mapping):  # keys may name layers of another stage: keep the matching ones
            output_selector = {
                k: v for k, v in output_selector.items() if any(fnmatch.fnmatchcase(n, k) for n in wanted)
            }
        return cls(model, {name: modules[name] for name in wanted}, output_selector, token_mode, kinds=kinds)

    # ------------------------------------------------------------------ per layer
    def selector_for(self, name: str) -> OutputSelector | None:
        """The output selector of one layer (``None``: the output is the tensor)."""
        return self.selectors.get(name)

    def select(self, name: str, output: Any) -> Tensor:
        """The tensor holding the units of layer ``name`` in a module output (see ``select_output``)."""
        return select_output(output, self.selectors.get(name), name)

    def kind_of(self, name: str, selected: Tensor) -> UnitKind:
        """The unit kind of a layer: known, else inferred (and remembered) from its selected output."""
        kind = self.kinds.get(name)
        if kind is None:
            kind = self.kinds[name] = infer_kind(selected, name)
        return kind

    def unit_maps(self, name: str, selected: Tensor) -> Tensor:
        """Per-unit maps ``[B, U, h, w]`` of a selected output (same conversion everywhere)."""
        return unit_maps(selected, self.kind_of(name, selected), self.token_mode, name)

    # ------------------------------------------------------------------ hooks
    def attach(self, fn: TapFn, layers: Iterable[str] | None = None, runner: TapRunner | None = None) -> TapHandle:
        """Register the hooks without a ``with`` block (the recorder's ``attach``/``detach``); see :meth:`hooks`."""
        names = list(self.layers) if layers is None else list(layers)
        unknown = [name for name in names if name not in self.layers]
        if unknown:
            raise KeyError(f"layers {unknown} are not tapped (tapped: {list(self.layers)})")
        return TapHandle(self, fn, names, runner)

    @contextmanager
    def hooks(
        self,
        fn: TapFn,
        *,
        layers: Iterable[str] | None = None,
        eval_mode: bool = True,
        no_grad: bool = True,
        forward_fn: ForwardFn | None = None,
        stop_early: bool = False,
    ) -> Iterator[TapRunner]:
        """Hooks on the layers for the duration of the block; yields a :class:`TapRunner` to forward batches.

        Args:
            fn: Called as ``fn(name, selected_output)`` after each tapped layer's forward; when it returns a tensor,
                that tensor replaces the selected one in the output (e.g. ablation zeroing a unit).
            layers: Names to hook (default: every tapped layer).
            eval_mode: Run the model in ``eval()`` mode; its training mode is restored afterwards.
            no_grad: Run under ``torch.no_grad()``.
            forward_fn: How the runner calls the model (``None``: ``model(inputs)``).
            stop_early: Stop each forward pass once every hooked layer has run (the rest of the network is not
                needed). Leave ``False`` when ``fn`` changes outputs or a hooked module runs twice per forward.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
            >>> taps = LayerTaps(model, "0")
            >>> with taps.hooks(lambda name, out: torch.zeros_like(out)) as run:
            ...     run(torch.ones(1, 2)).tolist()
            [[0.0, 0.0]]
        """
        names = list(self.layers) if layers is None else list(layers)
        runner = TapRunner(self.model, forward_fn, names, stop_early)
        was_training = self.model.training
        attached = self.attach(fn, names, runner)
        try:
            if eval_mode:
                self.model.eval()
            with torch.set_grad_enabled(not no_grad and torch.is_grad_enabled()):
                yield runner
        finally:
            attached.remove()
            self.model.train(was_training)


class TapHandle:
    """Registered hooks plus the eager stance of ``torch.compile``; :meth:`remove` undoes both (idempotent)."""

    def __init__(self, taps: LayerTaps, fn: TapFn, names: list[str], runner: TapRunner | None) -> None:
        self._handles: list[RemovableHandle] = []
        self._stance = _force_eager()
        try:
            for name in names:
                hook = _make_hook(taps, name, fn, runner)
                self._handles.append(taps.layers[name].register_forward_hook(hook))
        except BaseException:
            self.remove()
            raise

    def __len__(self) -> int:
        return len(self._handles)

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()
        if self._stance is not None:
            stance, self._stance = self._stance, None
            stance.__exit__(None, None, None)


#: Attribute marking the forward hooks registered here (a frozen copy of the model leaves them out).
TAP_MARK = "_lightning_neurons_tap"


def _make_hook(taps: LayerTaps, name: str, fn: TapFn, runner: TapRunner | None) -> Callable[[nn.Module, Any, Any], Any]:
    selector = taps.selectors.get(name)

    def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
        selected = select_output(output, selector, name)
        new = fn(name, selected)
        replaced = _put_back(output, selector, selected, new) if isinstance(new, Tensor) else None
        if runner is not None:
            runner._mark(name)  # may stop the forward here (stop_early)
        return replaced

    setattr(hook, TAP_MARK, True)  # background.frozen_copy leaves recording hooks out of the worker's model copy
    return hook


def _force_eager() -> Any:
    """Enter ``torch.compiler.set_stance("force_eager")`` (torch >= 2.6); ``None`` on older torch."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else None  # the constructor sets the stance


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in ``eval()`` mode inside the block and restore its training mode afterwards, also on error.

    Example:
        >>> model = nn.Dropout().train()
        >>> with evaluating(model):
        ...     model.training
        False
        >>> model.training
        True
    """
    was_training = model.training
    try:
        model.eval()
        yield model
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------- set-up checks
def compiled_parts(model: nn.Module) -> list[str]:
    """Names of the parts of ``model`` that ``torch.compile`` wraps (``""`` for the model itself).

    Finds ``torch.compile(module)`` submodules, ``module.compile()`` and a LightningModule compiled with
    ``Trainer.fit(torch.compile(model))`` (its ``_compiler_ctx``).

    Example:
        >>> compiled_parts(nn.Sequential(nn.Linear(2, 2)))
        []
    """
    from torch._dynamo.eval_frame import OptimizedModule

    found = []
    for name, module in model.named_modules():
        if (
            isinstance(module, OptimizedModule)
            or getattr(module, "_compiled_call_impl", None) is not None
            or getattr(module, "_compiler_ctx", None) is not None
        ):
            found.append(name)
    return found


def check_compiled(model: nn.Module) -> None:
    """Refuse a compiled model where its forward cannot be made to see the hooks.

    With torch >= 2.6 hooks force ``torch.compile`` into eager mode while they are registered, so recording a
    compiled model is correct and this check passes. On older torch a graph compiled without the hooks would hide
    them and the recorded top-k would be wrong, silently, so a compiled model is refused.

    Raises:
        RuntimeError: If the model is compiled and this torch cannot run it eagerly on demand.

    Example:
        >>> check_compiled(nn.Linear(2, 2))
    """
    if getattr(torch.compiler, "set_stance", None) is not None:
        return
    parts = compiled_parts(model)
    if parts:
        raise RuntimeError(
            f"the model is compiled with torch.compile ({parts or ['<root>']}), and torch {torch.__version__} "
            "cannot run it eagerly while hooks record it (a compiled graph does not see hooks added later, so "
            "the recorded top-k would be wrong); upgrade to torch >= 2.6 or explain an uncompiled model"
        )


def check_layer_outputs(
    model: nn.Module, taps: LayerTaps, inputs: Tensor, forward_fn: ForwardFn | None = None
) -> dict[str, UnitKind]:
    """Run one batch through the tapped layers and fail with the fix for every output that cannot be recorded.

    Meant for set-up time (the callback's ``setup`` with the first validation batch), so that a bad layer choice
    fails before the first training step. Runs under ``no_grad`` in ``eval()`` mode, restores the training mode
    and removes its hooks. The model runs to the end (so that ``forward_fn`` errors surface as well).

    Args:
        model: The network (``taps.model``).
        taps: The layers, selectors and token mode to check.
        inputs: One batch of model inputs ``[B, ...]``.
        forward_fn: How to run the model (``None``: ``model(inputs)``).

    Returns:
        ``{layer: unit kind}``.

    Raises:
        ValueError: Listing every layer whose output is a tuple/dict without a selector (or a selector that does
            not apply), has an unsupported rank (e.g. 5-D), a token count that is no square grid under
            ``token_mode``, a first dimension that is not the batch, or that did not run at all; or, when the
            forward itself fails, saying how the model was run (and suggesting ``forward_fn``).

    Example:
        >>> import torch
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
        >>> check_layer_outputs(model, LayerTaps(model, ["0", "1"]), torch.zeros(2, 3, 5, 5))
        {'0': 'conv', '1': 'linear'}
    """
    batch = int(inputs.shape[0])
    problems: dict[str, str] = {}
    kinds: dict[str, UnitKind] = {}
    outputs: dict[str, Any] = {}

    def grab(name: str, module: nn.Module) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_m: nn.Module, _a: Any, output: Any) -> None:
            outputs.setdefault(name, output)

        return hook

    # Raw hooks (not taps.hooks): a selector that does not apply must become a listed problem, not an exception.
    handles = [module.register_forward_hook(grab(name, module)) for name, module in taps.layers.items()]
    stance = _force_eager()
    try:
        with evaluating(model), torch.no_grad():
            run_model(model, prepare_inputs(model, inputs), forward_fn)
    except Exception as err:  # noqa: BLE001 - any failure of the user's forward: say how the model is run
        how = "forward_fn(model, images)" if forward_fn is not None else "model(images)"
        hint = (
            ""
            if forward_fn is not None
            else (
                "; if its forward does not take the images, pass forward_fn=lambda module, images: ... "
                "(e.g. module.model(pixel_values=images))"
            )
        )
        raise ValueError(
            f"running {how} on one batch of probe inputs {tuple(inputs.shape)} failed with "
            f"{type(err).__name__}: {err}{hint}"
        ) from err
    finally:
        for handle in handles:
            handle.remove()
        if stance is not None:
            stance.__exit__(None, None, None)

    for name in taps.layers:
        if name not in outputs:
            problems[name] = "did not run in the forward pass (is it used by forward / forward_fn?)"
            continue
        try:
            selected = taps.select(name, outputs[name])
            if selected.dim() >= 1 and selected.shape[0] != batch:
                raise ValueError(
                    f"layer {name!r} output has first dimension {selected.shape[0]} for a batch of {batch}; record "
                    "a layer whose first dimension is the batch (e.g. not a sequence-first [T, B, D] output)"
                )
            kind = infer_kind(selected, name) if name not in taps.kinds else taps.kinds[name]
            unit_maps(selected, kind, taps.token_mode, name)
        except (TypeError, ValueError) as err:
            problems[name] = str(err)
            continue
        kinds[name] = kind
    if problems:
        lines = "\n".join(f"- {name}: {message}" for name, message in problems.items())
        raise ValueError(f"{len(problems)} chosen layer(s) cannot be recorded:\n{lines}")
    return kinds


__all__ = [
    "TAP_MARK",
    "ForwardFn",
    "LayerTaps",
    "SelectorSpec",
    "StopForward",
    "TapFn",
    "TapHandle",
    "TapRunner",
    "check_compiled",
    "check_layer_outputs",
    "compiled_parts",
    "model_device",
    "prepare_inputs",
    "resolve_selectors",
    "run_model",
    "selector_for",
]
