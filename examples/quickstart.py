"""Example 1: train a small CNN from scratch on offline photos and watch its units acquire meaning.

The same job as `lightning-neurons fit --config configs/quickstart.yaml`, written as a plain script.

    python examples/quickstart.py            # about 5 minutes on 2 CPU cores
"""

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_neurons import NeuronExplainer, load_history
from lightning_neurons.demo import PhotoPatchesDataModule, SmallCNN
from lightning_neurons.demo.data import IMAGE_MEAN, IMAGE_STD
from lightning_neurons.logging.tensorboard import TENSORBOARD_SAMPLES_FLAG


def main() -> None:
    pl.seed_everything(0)
    explainer = NeuronExplainer(
        layers=["features.block3", "features.block4"],
        top_k=12,
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
    )
    logger = TensorBoardLogger("runs", name="quickstart_example")
    trainer = pl.Trainer(max_epochs=4, accelerator="cpu", logger=logger, callbacks=[explainer])
    trainer.fit(SmallCNN(num_classes=12), PhotoPatchesDataModule(train_per_class=96, val_per_class=24))

    history = load_history(explainer.outputs()["History"])
    first, last = history.epochs[0], history.epochs[-1]
    print(f"\nHow the first units of features.block4 changed from epoch {first} to epoch {last}:")
    for unit in history.units("features.block4")[:8]:
        before, after = history.get("features.block4", unit, first), history.get("features.block4", unit, last)
        print(
            f"  unit {unit:3d}: {before.explanation.description!r:>24} -> {after.explanation.description!r} "
            f"(score {after.explanation.score:.2f})"
        )
    for summary in history.summary(last):
        print(f"{summary.layer}: mean score {summary.mean_score:.2f}, {summary.fraction_changed:.0%} changed meaning")
    print(f"\ntensorboard --logdir {trainer.log_dir} {TENSORBOARD_SAMPLES_FLAG}")
    print(f"report: {explainer.outputs()['HTML report']}")


if __name__ == "__main__":
    main()
