"""The code the README and the docstrings show runs as written (with the offline default backend, small data)."""

import functools
import re
import warnings
from pathlib import Path

import lightning
import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_neurons import ExplanationRound, collect_top_k, explain, load_history

README = Path(__file__).resolve().parents[1] / "README.md"
CLASSES = ["red", "green", "blue"]


class ResNetish(pl.LightningModule):
    """An unmodified-looking LightningModule with ResNet's layer names."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer3 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.layer4 = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2), nn.ReLU())
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.layer4(self.layer3(x)).amax(dim=(2, 3)))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class ColourData(pl.LightningDataModule):
    classes = CLASSES

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        labels = torch.arange(36) % 3
        x = torch.rand(36, 3, 24, 24, generator=g) * 0.3
        x[torch.arange(36), labels] += 0.7
        self.data = TensorDataset(x, labels)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=12)

    def val_dataloader(self):
        return DataLoader(self.data, batch_size=12)


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.slow  # loads the offline pack once per block that fits
def test_every_python_block_of_the_readme_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 2
    small = functools.partial(
        lightning.Trainer,
        max_epochs=1,
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    for block in blocks:
        namespace = {
            "lightning": type("lightning", (), {"Trainer": small}),
            "model": ResNetish(),
            "datamodule": ColourData(),
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
        trainer = namespace.get("trainer")
        if trainer is not None and trainer.state.finished:
            explainer = next(cb for cb in trainer.callbacks if type(cb).__name__ == "NeuronExplainer")
            assert explainer.rounds and all(u.description or u.kind == "dead" for u in explainer.rounds[-1])


def test_posthoc_calls_as_documented(tmp_path, monkeypatch):
    """explain(model, val_loader, layers, top_k=16, output_dir="neurons") — posthoc.py's docstring — and the rest."""
    monkeypatch.chdir(tmp_path)
    model, val_loader = ResNetish(), ColourData().val_dataloader()
    rnd = explain(model, val_loader, ["layer4"], top_k=16, output_dir="neurons", show_progress=False)
    assert isinstance(rnd, ExplanationRound) and rnd.get("layer4", 0).description
    history = load_history("neurons")
    assert history.epochs == [0] and len(history) == 8  # a one-off round is filed as epoch 0
    assert (tmp_path / "neurons" / "report.html").is_file() and list((tmp_path / "neurons").glob("events.out.*"))
    # Into a folder that holds rounds, the documented call names the epoch of the weights (a one-off round would
    # silently replace the folder's own epoch 0, so explain() refuses it without epoch=).
    with pytest.raises(ValueError, match="pass epoch="):
        explain(model, val_loader, ["layer4"], top_k=16, output_dir="neurons", show_progress=False)
    assert len(load_history("neurons")) == 8  # the refused call wrote nothing
    again = explain(model, val_loader, ["layer4"], top_k=16, epoch=0, output_dir="neurons", show_progress=False)
    assert len(load_history("neurons")) == 8  # a rerun replaces its epoch, never duplicates it
    assert [u.description for u in again] == [u.description for u in rnd]
    recording = collect_top_k(model, val_loader, ["layer3", "layer4"], top_k=4, show_progress=False)
    assert recording.layers["layer4"].sample_ids.shape == (8, 4)
