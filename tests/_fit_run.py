"""A tiny real fit with NeuronExplainer, run as a subprocess by tests/test_safety.py.

``python tests/_fit_run.py ROOT MAX_EPOCHS [--kill-at-epoch E] [--resume CKPT]``: trains SmallCNN on the offline
photo patches with the embedded backend, a checkpoint per epoch, history in ``ROOT/run/version_0/neurons``. With
``--kill-at-epoch`` the process writes half of that epoch's history round file and then SIGKILLs itself, as a crash, an
OOM kill or a pre-empted node would stop it.
"""

from __future__ import annotations

import argparse
import os
import signal


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("max_epochs", type=int)
    parser.add_argument("--kill-at-epoch", type=int, default=None)
    parser.add_argument("--resume", default=None)
    args = parser.parse_args()

    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    import lightning_neurons.drift.round_store as store_module
    from lightning_neurons import NeuronExplainer
    from lightning_neurons.demo import PhotoPatchesDataModule, SmallCNN

    if args.kill_at_epoch is not None:
        import io

        real_write = store_module._write_parquet

        def write_then_die(table, fh) -> None:
            if table.column("epoch")[0].as_py() == args.kill_at_epoch:
                buffer = io.BytesIO()
                real_write(table, buffer)
                fh.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # half the round reaches the disk ...
                fh.flush()
                os.fsync(fh.fileno())
                os.kill(os.getpid(), signal.SIGKILL)  # ... then the process is gone
            real_write(table, fh)

        store_module._write_parquet = write_then_die

    pl.seed_everything(0, verbose=False)
    explainer = NeuronExplainer(
        layers=["head"],
        top_k=2,
        vocabulary=["classes"],
        reservoir_size=4,
        log_units=2,
        show_progress=False,
        on_error="raise",
    )
    trainer = pl.Trainer(
        max_epochs=args.max_epochs,
        accelerator="cpu",
        logger=TensorBoardLogger(args.root, name="run", version=0),
        callbacks=[explainer, ModelCheckpoint(save_top_k=-1, filename="{epoch}")],
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        num_sanity_val_steps=0,
    )
    data = PhotoPatchesDataModule(
        classes=["cat", "grass", "coins"],
        train_per_class=8,
        val_per_class=4,
        image_size=32,
        batch_size=8,
        shuffle=False,
    )
    trainer.fit(SmallCNN(num_classes=3, width=4), data, ckpt_path=args.resume)


if __name__ == "__main__":
    main()
