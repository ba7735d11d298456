"""Small classifiers (a CNN and a ViT) for the quickstart, the configs and the tests, and a MobileNetV2 to fine-tune.

Example:
    >>> model = SmallCNN(num_classes=12)
    >>> [name for name, _ in model.named_modules() if name.startswith("features.block")][:2]
    ['features.block1', 'features.block1.conv']
"""

from __future__ import annotations

from collections import OrderedDict

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            bn=nn.BatchNorm2d(out_channels),
            relu=nn.ReLU(inplace=True),
            pool=nn.MaxPool2d(2),
        )
    )


class ImageClassifier(pl.LightningModule):
    """Cross-entropy training, accuracy logging and Adam, shared by the demo classifiers."""

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.argmax(1) == labels).float().mean()
        # Epoch-level validation figures are averaged over the ranks under DDP (a no-op in one process).
        self.log_dict({f"{stage}/loss": loss, f"{stage}/acc": accuracy}, prog_bar=True, sync_dist=stage != "train")
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams["lr"])


class SmallCNN(ImageClassifier):
    """Four conv blocks and a linear head; units worth explaining live in ``features.block3`` and ``block4``.

    Args:
        num_classes: Output classes.
        width: Channels of the first block (doubled at each block).
        lr: Adam learning rate.
    """

    def __init__(self, num_classes: int = 12, width: int = 16, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        widths = [3, width, width * 2, width * 4, width * 8]
        self.features = nn.Sequential(
            OrderedDict((f"block{i + 1}", _block(widths[i], widths[i + 1])) for i in range(4))
        )
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class TinyViT(ImageClassifier):
    """A small torchvision Vision Transformer; its blocks are ``backbone.encoder.layers.encoder_layer_<i>``.

    Args:
        num_classes: Output classes.
        image_size: Input side.
        patch_size: Patch side (the unit maps are ``image_size / patch_size`` square).
        hidden_dim: Token width (= units per block output).
        num_layers: Encoder blocks.
        num_heads: Attention heads.
        lr: Adam learning rate.
    """

    def __init__(
        self,
        num_classes: int = 12,
        image_size: int = 64,
        patch_size: int = 8,
        hidden_dim: int = 64,
        num_layers: int = 3,
        num_heads: int = 4,
        lr: float = 1e-3,
    ) -> None:
        super().__init__()
        from torchvision.models.vision_transformer import VisionTransformer

        self.save_hyperparameters()
        self.backbone = VisionTransformer(
            image_size=image_size,
            patch_size=patch_size,
            num_layers=num_layers,
            num_heads=num_heads,
            hidden_dim=hidden_dim,
            mlp_dim=hidden_dim * 2,
            num_classes=num_classes,
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)


class FineTunedMobileNetV2(ImageClassifier):
    """torchvision's ImageNet MobileNetV2 (weights from the offline pack) with a new head: a model to fine-tune.

    Its units worth explaining live in ``net.features.<i>`` (``net.features.14``: 160 channels in the last stage but
    one). ``examples/finetune_mobilenet.py`` and ``benchmarks/train_overhead.py`` fine-tune it.

    Args:
        num_classes: Outputs of the new head.
        lr: Adam learning rate.

    Example:
        >>> model = FineTunedMobileNetV2(num_classes=12)
        >>> model(torch.rand(2, 3, 96, 96)).shape, model.net.features[14].out_channels
        (torch.Size([2, 12]), 160)
    """

    def __init__(self, num_classes: int = 12, lr: float = 1e-3) -> None:
        super().__init__()
        from lightning_neurons.backends.embedded import mobilenet_from_pack

        self.save_hyperparameters()
        self.net = mobilenet_from_pack()
        self.net.classifier[-1] = nn.Linear(self.net.last_channel, num_classes)  # the new head

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
