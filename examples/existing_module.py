"""Example 3: add the callback to an existing LightningModule in three lines.

Nothing in the model changes. The three lines marked below are all it takes; the rest is an ordinary training
script (here a torchvision ResNet-18 on the offline photo dataset).

    python examples/existing_module.py
"""

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchvision

from lightning_neurons import NeuronExplainer  # (1) import
from lightning_neurons.demo import PhotoPatchesDataModule


class ResNetClassifier(pl.LightningModule):
    """An existing, unmodified LightningModule."""

    def __init__(self, num_classes: int = 12) -> None:
        super().__init__()
        self.net = torchvision.models.resnet18(num_classes=num_classes)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return F.cross_entropy(self(images), labels)

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        self.log("val_acc", (self(images).argmax(1) == labels).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


if __name__ == "__main__":
    explainer = NeuronExplainer(layers=["net.layer4"], top_k=8)  # (2) configure: layers by module name
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", callbacks=[explainer])  # (3) add it to the Trainer
    trainer.fit(ResNetClassifier(), PhotoPatchesDataModule(train_per_class=48, val_per_class=12))
    for unit in explainer.rounds[-1].layer("net.layer4")[:10]:
        print(f"net.layer4[{unit.unit}]: {unit.description} (score {unit.score:.2f})")
