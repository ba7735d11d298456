"""Convolutions fused with their activations by oneDNN: the same outputs as eager PyTorch, or no fusion at all."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_neurons.backends import fused_conv
from lightning_neurons.backends.fused_conv import FusedConv2d, fuse_conv_activations

needs_kernel = pytest.mark.skipif(fused_conv._fused_kernel() is None, reason="this PyTorch has no oneDNN kernel")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Identity(), nn.ReLU6()),  # a folded conv-BN-act
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU()),  # depthwise
        nn.Conv2d(8, 16, 1),  # no activation after it
        nn.Conv2d(16, 16, 3, padding=1, padding_mode="reflect"),  # oneDNN pads with zeros only: left as it is
        nn.Conv2d(16, 8, 3, padding="same"),  # padding given by name: left as it is
        nn.Hardswish(),  # not a post-op oneDNN is asked for: stays after its conv
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    ).eval()


def _layers(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model``'s Sequential tree in order (a FusedConv2d is one layer)."""
    if isinstance(model, nn.Sequential):
        return [layer for child in model.children() for layer in _layers(child)]
    return [model]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_convs_give_the_eager_outputs_and_leave_the_original_alone(dtype: torch.dtype) -> None:
    net = _net().to(dtype)
    fused = fuse_conv_activations(net)
    kinds = [type(m).__name__ for m in _layers(fused)]
    assert kinds == [
        "FusedConv2d", "Identity", "Identity", "FusedConv2d", "Identity", "FusedConv2d",
        "Conv2d", "Conv2d", "Hardswish", "AdaptiveAvgPool2d", "Flatten",
    ]  # fmt: skip
    assert [m.post_op for m in fused.modules() if isinstance(m, FusedConv2d)] == ["hardtanh", "relu", "none"]
    assert [type(m.activation).__name__ for m in fused.modules() if isinstance(m, FusedConv2d)] == [
        "ReLU6", "ReLU", "Identity",
    ]  # fmt: skip  # kept for inputs the kernel refuses
    assert type(net[0][2]) is nn.ReLU6 and type(net[0][0]) is nn.Conv2d  # the original keeps its modules
    assert fused[0][0].conv.weight is net[0][0].weight  # and shares its weights with the copy
    assert [name for name, _ in fused[0].named_parameters()] == ["0.conv.weight", "0.conv.bias"]
    x = (torch.randn(4, 3, 20, 20) * 3).to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), net(x), atol=1e-2 if dtype == torch.bfloat16 else 1e-5, rtol=1e-2)


@needs_kernel
def test_a_fused_copy_that_disagrees_with_the_model_is_never_used(monkeypatch: pytest.MonkeyPatch) -> None:
    net = _net().to(torch.bfloat16)
    monkeypatch.setattr(FusedConv2d, "forward", lambda self, x: self.conv(x))  # drops the activation, as a changed
    # private operator might
    assert fuse_conv_activations(net) is net


def test_without_the_kernel_or_anything_to_fuse_the_model_comes_back(monkeypatch: pytest.MonkeyPatch) -> None:
    plain = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    assert fuse_conv_activations(plain) is plain  # nothing to fuse
    net = _net()
    monkeypatch.setattr(fused_conv, "_fused_kernel", lambda: None)
    assert fuse_conv_activations(net) is net  # a PyTorch built without oneDNN's kernel


def test_an_input_the_kernel_refuses_runs_as_the_eager_conv_and_activation() -> None:
    net = _net().double()  # oneDNN has no float64 convolution
    fused = nn.Sequential(*[FusedConv2d(m[0], m[-1]) if isinstance(m, nn.Sequential) else m for m in net])
    x = torch.randn(2, 3, 20, 20, dtype=torch.float64)
    with torch.inference_mode():
        assert torch.equal(fused(x), net(x))
