"""Training time with NeuronExplainer vs without it: ``trainer.fit`` wall time with the callback / the same fit without.

Prints one JSON object. Jobs (all offline, all on real photos of the bundled photo dataset):

- ``quickstart``: ``configs/quickstart.yaml`` (SmallCNN, 64 px crops, 4 epochs, ``features.block3`` + ``block4``,
  top_k 12, the embedded backend at ``image_size=128``).
- ``finetune``: ImageNet MobileNetV2 from the offline pack fine-tuned on 96 px crops (48 + 16 per class, batch
  32, 2 epochs, as ``examples/finetune_mobilenet.py``), two explained layers ``net.features.13`` +
  ``net.features.14`` (96 + 160 = 256 units), the callback's defaults otherwise (``every_n_epochs=1``,
  ``explain_on_fit_end``, top_k 16, embedded backend).

- ``finetune_ddp`` (``--jobs finetune_ddp``): the fine-tune under DDP on the CPU, two processes (``ddp_spawn``,
  gloo, one thread each), to choose between the two ways a DDP run can explain: ``sync_cache`` (every rank takes a
  share of each round, in the validation hook; the default) and ``async_cache`` (``async_explain=True``: rank 0
  explains each round alone in its background worker while both ranks train on). Its fit time is measured inside
  rank 0, from ``on_fit_start`` to the end of ``fit`` (the processes' start and the models' load left out), and the
  rounds' figures are read from the round files rank 0 wrote.

Per job the plain fit runs first and last (the ratio divides by their mean, so that load drift on a shared machine
hits both sides), the variants in between: ``sync`` (every round blocks training, no embedding cache: the code
before issue 24), ``sync_cache``, ``async`` (background explanation, no cache) and ``async_cache``
(the defaults are ``sync_cache`` on the CPU, where ``async_explain="auto"`` keeps rounds in the validation hook, and
``async_cache`` on an accelerator).
On code without ``async_explain``/``embedding_cache`` arguments only the ``default`` variant runs. Each variant
reports its ratio, each round's seconds (``round_s``, measured where the round ran), the first round over the mean
of the later ones and the cache's hits and misses. The foundation models are loaded once before timing
(``backend_load_s``): the ratio is what a run pays per fit, not the one-off load of the weights.

    HF_HUB_OFFLINE=1 python benchmarks/train_overhead.py [--jobs quickstart finetune] [--quick]
        [--encoder-image-size 128] [--encoder-precision float32] [-o out.json]

``--encoder-image-size N`` adds ``sync_cache_encoder<N>``: the CPU default with the embedded encoder resizing crops to
``N`` px instead of 224 (cheaper, and less faithful: see ``benchmarks/results/encoder_image_size.json``).
``--encoder-precision P`` adds ``sync_cache_<P>``: the CPU default with the embedded encoder's classifier in ``P``
(``float32``: the default before ``precision="auto"`` chose bfloat16 on CPUs with native bfloat16).

``--quick`` shrinks both jobs (few samples, 2 epochs, small images) to check that the script runs; its figures
mean nothing.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VARIANTS = {
    "sync": {"async_explain": False, "embedding_cache": False},
    "sync_cache": {"async_explain": False, "embedding_cache": True},
    "async": {"async_explain": True, "embedding_cache": False},
    "async_cache": {"async_explain": True, "embedding_cache": True},
}


#: ``--small``: the jobs on fewer and smaller photos (for machines too busy for the full jobs).
SMALL = {
    "quickstart": dict(train_per_class=32, val_per_class=12, image_size=64, batch_size=64),
    "finetune": dict(train_per_class=16, val_per_class=8, image_size=64, batch_size=32),
}


def _job(name: str, quick: bool, small: bool = False) -> dict[str, Any]:
    spec = _full_job(name, quick)
    if small and not quick:
        spec["data"] = dict(SMALL[name])
        spec["epochs"] = 2
    return spec


def _full_job(name: str, quick: bool) -> dict[str, Any]:
    from lightning_neurons.demo.data import IMAGE_MEAN, IMAGE_STD

    normalisation = {"image_mean": list(IMAGE_MEAN), "image_std": list(IMAGE_STD)}
    if name == "quickstart":
        return {
            "data": dict(train_per_class=8, val_per_class=4, image_size=32, batch_size=32)
            if quick
            else dict(train_per_class=96, val_per_class=24, image_size=64, batch_size=64),
            "epochs": 2 if quick else 4,
            "explainer": dict(
                layers=["features.block3", "features.block4"],
                top_k=4 if quick else 12,
                backend="embedded",
                backend_kwargs={"image_size": 64 if quick else 128},
                vocabulary=["general", "classes"],
                log_units=8,
                **normalisation,
            ),
        }
    if name in ("finetune", "finetune_ddp"):
        return {
            "data": dict(train_per_class=4, val_per_class=2, image_size=32, batch_size=16)
            if quick
            else dict(train_per_class=48, val_per_class=16, image_size=96, batch_size=32),
            "epochs": 2,
            "explainer": dict(
                layers=["net.features.13", "net.features.14"],
                **({"top_k": 2, "backend_kwargs": {"image_size": 64}} if quick else {}),
                **normalisation,
            ),
        }
    raise ValueError(f"unknown job {name!r}")


def _model(job: str) -> Any:
    if job == "quickstart":
        from lightning_neurons.demo import SmallCNN

        return SmallCNN(num_classes=12, width=16)
    return _finetune_model()


def _finetune_model() -> Any:
    from lightning_neurons.demo import FineTunedMobileNetV2

    return FineTunedMobileNetV2(num_classes=12)


def _fit(job: str, spec: dict[str, Any], root: Path, explainer_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """One seeded fit; returns its wall time and, with the callback, each round's figures."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_neurons import NeuronExplainer
    from lightning_neurons.benchmark.common import FitClock, ProcessGroupCloser
    from lightning_neurons.demo import PhotoPatchesDataModule

    pl.seed_everything(0, verbose=False)
    data = PhotoPatchesDataModule(**spec["data"])
    model = _model(job)
    callbacks: list[Any] = []
    explainer = None
    if explainer_kwargs is not None:
        explainer = NeuronExplainer(**_explainer_kwargs(spec, explainer_kwargs), show_progress=False)
        callbacks.append(explainer)
    ddp = job == "finetune_ddp"
    clock = root / "fit_seconds.json"
    if ddp:
        # After the explainer, so that its fit-end work is timed; the closer last: a spawned process that exits with
        # its process group open now and then aborts after the fit succeeded (3 of 12 fits), failing trainer.fit.
        callbacks += [FitClock(clock), ProcessGroupCloser()]
    trainer = pl.Trainer(
        max_epochs=spec["epochs"],
        accelerator="cpu",
        devices=2 if ddp else 1,
        **({"strategy": "ddp_spawn"} if ddp else {}),
        logger=TensorBoardLogger(root, name=job, version=0),  # a ddp_spawn parent would count the children's version_0
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=5,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        trainer.fit(model, data)
        seconds = time.perf_counter() - start
    out: dict[str, Any] = {"fit_s": round(seconds, 2)}
    if ddp:  # the fit inside rank 0; the rounds from the files rank 0 wrote (the callbacks ran in the children)
        out = {"fit_s": round(json.loads(clock.read_text()), 2), "spawned_fit_s": round(seconds, 2)}
    if explainer is not None:
        rounds = _round_files(Path(trainer.log_dir or root) / "neurons") if ddp else explainer.rounds
        out["rounds"] = len(rounds)
        out["round_epochs"] = [r.epoch for r in rounds]
        out["round_s"] = [round(float(r.meta.get("timings", {}).get("total_s", float("nan"))), 2) for r in rounds]
        out["embed_crops_s"] = [round(float(r.meta.get("timings", {}).get("embed_crops", 0.0)), 2) for r in rounds]
        out["stage_s"] = [{k: round(float(v), 2) for k, v in r.meta.get("timings", {}).items()} for r in rounds]
        if len(rounds) > 1:
            later = statistics.mean(out["round_s"][1:])
            out["first_over_later"] = round(out["round_s"][0] / later, 2) if later > 0 else None
        caches = [r.meta.get("embedding_cache") for r in rounds]
        if any(caches):
            out["cache"] = caches
        out["unique_crops"] = [r.meta.get("unique_crops") for r in rounds]
    return out


def _round_files(folder: Path) -> list[Any]:
    from lightning_neurons.results import ExplanationRound

    files = sorted(folder.glob("round_epoch=*.json"), key=lambda f: int(f.stem.split("=")[1]))
    return [ExplanationRound.from_json(f.read_text()) for f in files]


def _explainer_kwargs(spec: dict[str, Any], variant: dict[str, Any]) -> dict[str, Any]:
    """The job's callback arguments with a variant's on top (``backend_kwargs`` merged, not replaced)."""
    backend_kwargs = {**(spec["explainer"].get("backend_kwargs") or {}), **(variant.get("backend_kwargs") or {})}
    return {**spec["explainer"], **variant, **({"backend_kwargs": backend_kwargs} if backend_kwargs else {})}


def encoder_size_variants(sizes: list[int]) -> dict[str, dict[str, Any]]:
    """``--encoder-image-size``: the CPU default (``sync_cache``) with the embedded encoder at other sizes.

    Example:
        >>> encoder_size_variants([128])["sync_cache_encoder128"]["backend_kwargs"]
        {'image_size': 128}
    """
    return {f"sync_cache_encoder{n}": {**VARIANTS["sync_cache"], "backend_kwargs": {"image_size": n}} for n in sizes}


def encoder_precision_variants(precisions: list[str]) -> dict[str, dict[str, Any]]:
    """``--encoder-precision``: the CPU default (``sync_cache``) with the embedded encoder in other number formats.

    Example:
        >>> encoder_precision_variants(["float32"])["sync_cache_float32"]["backend_kwargs"]
        {'precision': 'float32'}
    """
    return {f"sync_cache_{p}": {**VARIANTS["sync_cache"], "backend_kwargs": {"precision": p}} for p in precisions}


def _variants() -> dict[str, dict[str, Any]]:
    from lightning_neurons import NeuronExplainer

    params = inspect.signature(NeuronExplainer.__init__).parameters
    if "async_explain" in params and "embedding_cache" in params:
        return VARIANTS
    return {"default": {}}  # code before issue 24: the callback as it is


def _load_backend(spec: dict[str, Any], variants: dict[str, dict[str, Any]]) -> float:
    """Load (and keep, per process) the foundation models and embed the vocabulary once, outside the timings."""
    from lightning_neurons.backends import load_backend

    start = time.perf_counter()
    for kwargs in {json.dumps(_explainer_kwargs(spec, v).get("backend_kwargs") or {}) for v in variants.values()}:
        backend = load_backend(spec["explainer"].get("backend", "embedded"), **json.loads(kwargs))
        backend.encoder.encode_images(__import__("torch").rand(1, 3, 32, 32))
    return round(time.perf_counter() - start, 2)


def run(
    jobs: list[str],
    quick: bool,
    variants: list[str] | None = None,
    partial: Path | None = None,
    small: bool = False,
    encoder_sizes: list[int] | None = None,
    encoder_precisions: list[str] | None = None,
) -> dict[str, Any]:
    """Run the jobs; with ``partial``, the result so far is written there after every fit (long runs on busy
    machines may be cut short)."""
    import torch

    result: dict[str, Any] = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "load_before": _load(),
        },
        "quick": quick,
        "small": small,
    }
    chosen = _variants()
    if variants:
        chosen = {k: v for k, v in chosen.items() if k in variants}
    chosen.update(encoder_size_variants(encoder_sizes or []))
    chosen.update(encoder_precision_variants(encoder_precisions or []))
    with tempfile.TemporaryDirectory() as tmp:
        for job in jobs:
            spec = _job(job, quick, small)
            out: dict[str, Any] = {"epochs": spec["epochs"], "data": dict(spec["data"])}
            out["backend_load_s"] = _load_backend(spec, chosen)
            root = Path(tmp) / job
            print(f"{job}: plain fit", file=sys.stderr)
            plain = [_fit(job, spec, root / "plain0", None)["fit_s"]]
            result[job] = out
            for name, kwargs in chosen.items():
                print(f"{job}: {name}", file=sys.stderr)
                out[name] = _fit(job, spec, root / name, kwargs)
                out["plain_fit_s"] = plain
                if partial is not None:
                    partial.write_text(json.dumps(result, indent=1))
            plain.append(_fit(job, spec, root / "plain1", None)["fit_s"])
            base = statistics.mean(plain)
            out["plain_fit_s"] = plain
            for name in chosen:
                out[name]["ratio"] = round(out[name]["fit_s"] / base, 2)
            result[job] = out
    result["machine"]["load_after"] = _load()
    return result


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--jobs", nargs="+", choices=["quickstart", "finetune", "finetune_ddp"], default=["quickstart", "finetune"]
    )
    parser.add_argument("--variants", nargs="+", default=None, help="only these variants (default: all)")
    parser.add_argument("--quick", action="store_true", help="a reduced run that checks the script (no figures)")
    parser.add_argument("--small", action="store_true", help="fewer, smaller photos, 2 epochs (busy machines)")
    parser.add_argument(
        "--encoder-image-size",
        type=int,
        nargs="+",
        default=None,
        help="also run sync_cache with the embedded encoder at these sizes (the speed / fidelity trade-off)",
    )
    parser.add_argument(
        "--encoder-precision",
        nargs="+",
        choices=["float32", "bfloat16"],
        default=None,
        help="also run sync_cache with the embedded encoder's classifier in these number formats",
    )
    parser.add_argument("-o", "--output", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    from lightning_neurons.benchmark.common import save_json

    output = Path(args.output) if args.output else None
    result = run(
        args.jobs, args.quick, args.variants, output, args.small, args.encoder_image_size, args.encoder_precision
    )
    print(save_json(result, args.output))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
