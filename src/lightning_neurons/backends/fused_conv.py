"""Convolutions fused with the activation after them, by oneDNN, for a classifier that runs in bfloat16 on a CPU.

In eager PyTorch every ``Conv2d -> ReLU6`` pair is two passes over the activations, and in bfloat16 on a CPU the
activation pass (``hardtanh_``) costs about a third of MobileNetV2's time. oneDNN computes the activation inside
the convolution (a post-op) without the second pass; PyTorch exposes that kernel as
``torch.ops.mkldnn._convolution_pointwise``, the one its inductor compiler calls for the same pattern, so the fused
classifier needs no compilation. Measured on 2 cores of a Xeon with AMX (the embedded backend's MobileNetV2, crops
of 224 px in batches of 8, ``benchmarks/encoder_speed.py``): 1.60-1.85 against 2.17-2.68 ms per crop, 1.35-1.45x
in two runs, and the same logits bit for bit. In float32 it was no faster (1.31 against 1.22 s for 256 crops), so
the backend fuses only its bfloat16 classifier.

The kernel is a private operator of PyTorch: :func:`fuse_conv_activations` checks the fused copy against the
original on a small input and hands back the original where the operator is missing, fails or disagrees, so a
PyTorch that changes it makes the encoder slower, never wrong.

Example:
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Identity(), nn.ReLU6()).eval().to(torch.bfloat16)
    >>> fused = fuse_conv_activations(net)
    >>> x = torch.rand(2, 3, 16, 16, dtype=torch.bfloat16)
    >>> with torch.inference_mode():
    ...     bool((fused(x) == net(x)).all())
    True
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

#: The dtypes oneDNN's fused convolution takes on a CPU; other inputs (float64, say) run the eager conv.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: The activations oneDNN can apply inside a convolution: module type -> (post-op name, its scalars).
POST_OPS: dict[type[nn.Module], tuple[str, list[float]]] = {nn.ReLU6: ("hardtanh", [0.0, 6.0]), nn.ReLU: ("relu", [])}


def _fused_kernel() -> object | None:
    """PyTorch's oneDNN convolution with a post-op, or ``None`` where this build lacks it."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._convolution_pointwise.default
    except (AttributeError, RuntimeError):
        return None


class FusedConv2d(nn.Module):
    """A ``Conv2d`` and the activation after it as one oneDNN call (inference only, CPU).

    An input the kernel does not take (on another device, or not in :data:`KERNEL_DTYPES`) runs the conv and the
    activation as they would have.

    Args:
        conv: The convolution (zero padding given as numbers; kept as it is, its weights shared, not copied).
        activation: The activation that followed it (a key of :data:`POST_OPS`), or ``None`` for none.

    Example:
        >>> conv = nn.Conv2d(3, 4, 3).eval()
        >>> fused = FusedConv2d(conv, nn.ReLU())
        >>> x = torch.rand(1, 3, 8, 8)
        >>> with torch.inference_mode():
        ...     torch.allclose(fused(x), conv(x).relu(), atol=1e-6)
        True
    """

    def __init__(self, conv: nn.Conv2d, activation: nn.Module | None) -> None:
        super().__init__()
        self.conv = conv
        self.activation = activation if activation is not None else nn.Identity()
        self.padding = list(conv.padding)  # type: ignore[arg-type]  # checked by fusable()
        self.stride = list(conv.stride)
        self.dilation = list(conv.dilation)
        self.post_op, self.scalars = POST_OPS[type(activation)] if activation is not None else ("none", [])

    @staticmethod
    def fusable(conv: nn.Module) -> bool:
        """Whether oneDNN's kernel computes ``conv`` as it is (2-D, zero padding given as numbers)."""
        return type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or x.dtype not in KERNEL_DTYPES:  # an input the kernel does not take
            return self.activation(self.conv(x))
        return torch.ops.mkldnn._convolution_pointwise(
            x,
            self.conv.weight,
            self.conv.bias,
            self.padding,
            self.stride,
            self.dilation,
            self.conv.groups,
            self.post_op,
            self.scalars,
            "",
        )


def _fuse_in_place(model: nn.Module) -> int:
    """Replace each fusable conv of ``model``'s ``nn.Sequential`` modules by a :class:`FusedConv2d`; count them.

    The activation after a conv (past any ``Identity`` left by folded batch norms) moves into it.
    """
    replaced = 0
    for module in list(model.modules()):
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for index, name in enumerate(names):
            conv = module._modules[name]
            if conv is None or not FusedConv2d.fusable(conv):
                continue
            following = index + 1
            while following < len(names) and isinstance(module._modules[names[following]], nn.Identity):
                following += 1
            after = module._modules[names[following]] if following < len(names) else None
            activation = after if type(after) in POST_OPS else None
            module._modules[name] = FusedConv2d(conv, activation)  # type: ignore[arg-type]
            if activation is not None:
                module._modules[names[following]] = nn.Identity()
            replaced += 1
    return replaced


def fuse_conv_activations(model: nn.Module, check_size: int = 32) -> nn.Module:
    """A copy of an eval-mode CPU ``model`` whose convolutions run fused with their activations, or ``model`` itself.

    The copy shares ``model``'s weights. It is handed back only where oneDNN's fused kernel exists and the copy gives
    ``model``'s outputs on a random ``[2, 3, check_size, check_size]`` input (in ``model``'s dtype, ``channels_last``)
    up to float rounding; otherwise, or where nothing can be fused, ``model`` is returned unchanged.

    Args:
        model: An eval-mode image model on the CPU (the copy is for inference only).
        check_size: Side in pixels of the input the copy is checked on.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
        >>> type(fuse_conv_activations(net)[0]).__name__ in ("FusedConv2d", "Conv2d")
        True
    """
    parameter = next(model.parameters(), None)
    if parameter is None or parameter.device.type != "cpu" or _fused_kernel() is None:
        return model
    fused = _shallow_module_copy(model)  # the modules are replaced below; the weights stay shared
    if _fuse_in_place(fused) == 0:
        return model
    probe = torch.rand(2, 3, check_size, check_size, generator=torch.Generator().manual_seed(0))
    probe = probe.to(parameter.dtype).contiguous(memory_format=torch.channels_last)
    try:
        with torch.inference_mode():
            expected, got = model(probe).float(), fused(probe).float()
    except RuntimeError:  # the private kernel refused the probe (or the model a 3-channel input): keep the model
        return model
    tolerance = 1e-2 * float(expected.abs().max()) + 1e-3
    return fused if got.shape == expected.shape and float((got - expected).abs().max()) <= tolerance else model


def _shallow_module_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree whose parameters and buffers are ``model``'s own tensors."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)
