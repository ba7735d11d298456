"""Two CPU processes (ddp_spawn, gloo) record exactly the top-k of one process."""

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_neurons import NeuronExplainer
from lightning_neurons.evaluation import held_out_probe
from lightning_neurons.recording.recorder import collect_top_k
from lightning_neurons.recording.types import Recording
from lightning_neurons.results import ExplanationRound
from lightning_neurons.session import ExplanationSession

LAYERS = ["features.0", "features.2", "head"]
N_VAL = 37  # odd: the DistributedSampler pads rank 1 with a duplicate that must not count


class FileSession(ExplanationSession):
    """Rank 0's explanation half: writes the recording it is given to the history dir."""

    def __init__(self, explainer):
        super().__init__(explainer)

    def setup(self, trainer, pl_module):
        assert trainer.is_global_zero

    def run(self, trainer, pl_module, recording, source):
        assert trainer.is_global_zero and trainer.world_size == 2
        ids = recording.unique_sample_ids().tolist()
        inputs, _ = source.fetch(ids)
        assert torch.equal(inputs, val_data().tensors[0][ids])
        torch.save(recording.to_state(), Path(self.explainer.history_dir) / f"rank{trainer.global_rank}.pt")
        # evaluate=True's held-out probe: global ids fetched from the dataset, not rank 0's shard of the loader
        inputs, labels = held_out_probe(source, set(ids))
        torch.save({"ids": ids, "inputs": inputs, "labels": labels}, Path(self.explainer.history_dir) / "probe.pt")
        return ExplanationRound(epoch=recording.epoch)

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def teardown(self):
        pass


class Explainer(NeuronExplainer):
    session_class = FileSession


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.features(x).amax(dim=(2, 3)))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)  # weights stay put: compare with one process


def val_data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N_VAL, 3, 10, 10, generator=g).round(decimals=1)  # coarse values: ties across ranks
    return TensorDataset(x, torch.randint(0, 3, (N_VAL,), generator=g))


@pytest.mark.slow  # ~30 s: two spawned processes import Lightning; still runs by default
def test_ddp_spawn_two_processes_equal_one(tmp_path):
    train = DataLoader(val_data(), batch_size=8)
    val = DataLoader(val_data(), batch_size=5)
    cb = Explainer(layers=LAYERS, top_k=6, reservoir_size=10, history_dir=str(tmp_path))
    trainer = pl.Trainer(
        strategy="ddp_spawn",
        accelerator="cpu",
        devices=2,
        max_epochs=1,
        limit_train_batches=1,
        num_sanity_val_steps=0,
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Tiny(), train, val)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe.pt", "rank0.pt"]  # only rank 0 explains
    ddp = Recording.from_state(torch.load(tmp_path / "rank0.pt", weights_only=False))
    model = Tiny()
    one = collect_top_k(
        model, DataLoader(val_data(), batch_size=5), LAYERS, top_k=6, reservoir_size=10, show_progress=False
    )
    assert ddp.num_samples == N_VAL
    for name in LAYERS:
        assert torch.equal(ddp.layers[name].sample_ids, one.layers[name].sample_ids), name
        assert torch.equal(ddp.layers[name].values, one.layers[name].values)
        assert torch.equal(ddp.layers[name].peaks, one.layers[name].peaks)
    assert torch.equal(ddp.reservoir_ids, one.reservoir_ids)
    assert ddp.labels == one.labels
    probe = torch.load(tmp_path / "probe.pt", weights_only=False)
    held_out = [i for i in range(N_VAL) if i not in set(probe["ids"])]
    assert torch.equal(probe["inputs"], val_data().tensors[0][held_out])
    assert torch.equal(probe["labels"], val_data().tensors[1][held_out])
