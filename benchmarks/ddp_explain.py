"""Wall time of one explanation round with 1 and with 2 DDP processes on the same job (CPU, gloo).

Under DDP every rank explains its share of the round (the crop embedding is split, see
``lightning_neurons/sharing.py``). This runs the same fit (weights frozen, one explained epoch) with ``devices=1``
and with ``devices=2`` (``ddp_spawn``) and reads the round's own timing from the ``round_epoch=0.json`` that rank 0
wrote. Prints one JSON object: ``round_s_1proc``, ``round_s_2proc``, ``units``, ``crops``, ``torch_threads``.

    python benchmarks/ddp_explain.py [--backend embedded|stats] [--width 32] [--val 240]

On a 2-core CPU the two processes share the same two cores that torch's intra-op threads use in one process, so
expect little gain there; the split pays where each rank has its own accelerator.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from lightning_neurons import NeuronExplainer  # noqa: E402
from lightning_neurons.demo import PhotoPatches, SmallCNN  # noqa: E402


class Frozen(SmallCNN):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def run(devices: int, args: argparse.Namespace, root: Path) -> dict:
    if args.backend == "stats":
        from _cheap import cheap_backend

        backend: object = cheap_backend()
        kwargs: dict = {}
    else:
        backend, kwargs = "embedded", {"image_size": 128}
    cb = NeuronExplainer(
        layers=["features.block3", "features.block4"],
        top_k=args.top_k,
        backend=backend,  # type: ignore[arg-type]
        backend_kwargs=kwargs,
        vocabulary=["general", "classes"],
        show_progress=False,
        history_dir=str(root / f"p{devices}"),
        log_units=0,
    )
    data = PhotoPatches(samples_per_class=max(1, args.val // 12), image_size=64)
    pl.seed_everything(0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        max_epochs=1,
        limit_train_batches=1,
        num_sanity_val_steps=0,
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(
        Frozen(num_classes=12, width=args.width), DataLoader(data, batch_size=32), DataLoader(data, batch_size=32)
    )
    rnd = json.loads((root / f"p{devices}" / "round_epoch=0.json").read_text())
    return {"seconds": rnd["meta"]["timings"]["total_s"], "units": len(rnd["units"]), "crops": rnd["meta"].get("crops")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["embedded", "stats"], default="embedded")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--val", type=int, default=240)
    parser.add_argument("--top-k", type=int, default=12)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one = run(1, args, Path(tmp))
        two = run(2, args, Path(tmp))
    print(
        json.dumps(
            {
                "round_s_1proc": one["seconds"],
                "round_s_2proc": two["seconds"],
                "speedup": round(one["seconds"] / two["seconds"], 3) if two["seconds"] else None,
                "units": one["units"],
                "crops": one["crops"],
                "backend": args.backend,
                "torch_threads": torch.get_num_threads(),
                "device": "cpu",
            }
        )
    )


if __name__ == "__main__":
    _ = nn  # the model classes come from the demo package
    main()
