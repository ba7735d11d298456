"""Scale: a ViT-L-sized target (24 blocks x 4,096 MLP units = 98,304 units) recorded at top_k=16 and explained.

Prints ONE JSON object on stdout (progress on stderr) with ``units``, ``recorder_bytes``, ``round_s``,
``peak_mem_bytes``, ``history_bytes_per_round`` (the round store: one Parquet file per round), ``history_open_s``
(``load_history``, lazy), ``history_to_pandas_s``, ``history_load_s_100_rounds`` (every record as Python objects,
what ``RunHistory``'s own queries need; the dashboard reads the files instead, see ``benchmarks/dashboard.py``),
``device``, the per-stage timings,
TensorBoard event bytes per round, the HTML report's size and render time, and ``per_unit`` costs with their
``extrapolated_100k`` values (linear in units; the note says which costs are not linear).

The target is torchvision's ``VisionTransformer`` with ViT-L/16's widths (hidden 1024, 16 heads, MLP 4096) and
random weights; the units are the GELU outputs ``encoder.layers.encoder_layer_<i>.mlp.1`` (token maps). A full run
(``--blocks 24 --image-size 224``) needs a GPU; on a CPU the default is a scaled-down run (2 blocks = 8,192 units,
112 px inputs, 256 probe images) whose per-unit costs are stated and extrapolated to 98,304 units.

The image encoder is per crop, not per unit, and a GPU changes its speed by orders of magnitude, so it is measured
apart: ``--encoder embedded`` explains with the offline pack (MobileNetV2 ConSE + MiniLM) at ``--crop-size``;
``--encoder pooled`` (CPU default) explains with :class:`PooledEncoder` (MiniLM texts, images as a projected 4 x 4
colour grid: a real encoder that costs next to nothing) so that the round time is the pipeline's own, and the
embedded encoder's crops/s is timed on its own (``encoder_crops_per_s``) and used for the extrapolation.

Examples:
    python benchmarks/scale.py                          # CPU, scaled down (about 3 minutes on 2 cores)
    python benchmarks/scale.py --device cuda --blocks 24 --image-size 224 --probe 2048 --batch 128
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torchvision
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from explain_throughput import IMAGENET_MEAN, IMAGENET_STD, TensorSource, synthetic_probe  # noqa: E402

from lightning_neurons.backends.base import Backend  # noqa: E402
from lightning_neurons.drift.history import STORE_DIRNAME, RunHistory, load_history  # noqa: E402
from lightning_neurons.explanation.pipeline import ExplainConfig, explain_recording  # noqa: E402
from lightning_neurons.recording.recorder import ActivationRecorder  # noqa: E402
from lightning_neurons.results import ExplanationRound  # noqa: E402

FULL_UNITS = 24 * 4096


def log(message: str) -> None:
    sys.stderr.write(f"[scale] {message}\n")
    sys.stderr.flush()


class PooledEncoder:
    """A cheap image-text encoder: images as a fixed random projection of their 4 x 4 mean-colour grid, texts by
    another encoder (MiniLM). Deterministic and real (scores are computed as usual), it costs about nothing.

    The projection has the text encoder's width, measured on one text: both sides of a similarity must live in one
    space (the embedded backend's own image-text space is ConSE's class space, 1,011 wide, not MiniLM's 384).
    """

    def __init__(self, text_encoder: Any, seed: int = 0) -> None:
        self.name = "pooled-colour-4x4"
        self.text_encoder = text_encoder
        dim = int(text_encoder.encode_texts(["a photo"]).shape[-1])
        gen = torch.Generator().manual_seed(seed)
        self.proj = torch.randn(48, dim, generator=gen)

    def encode_images(self, images: Tensor) -> Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(images.float(), 4).flatten(1).cpu()
        return torch.nn.functional.normalize(pooled @ self.proj, dim=1)

    def encode_texts(self, texts: Any) -> Tensor:
        return self.text_encoder.encode_texts(texts)


def encoder_rate(encoder: Any, crop_size: int, device: torch.device, n: int = 512) -> float:
    """Crops per second of an encoder on random crops of ``crop_size`` (after a warm-up call)."""
    images = torch.rand(n, 3, crop_size, crop_size, device=device)
    with torch.no_grad():
        encoder.encode_images(images[:8])
        sync(device)
        t0 = time.perf_counter()
        for start in range(0, n, 256):
            encoder.encode_images(images[start : start + 256])
        sync(device)
    return n / (time.perf_counter() - t0)


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator peak, else the process RSS sampled every 5 ms."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            import psutil

            proc = psutil.Process()
            self._base = proc.memory_info().rss
            self.peak = self._base

            def sample() -> None:
                while not self._stop.wait(0.005):
                    self.peak = max(self.peak, proc.memory_info().rss)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()

    @property
    def above_entry(self) -> int:
        return int(self.peak - self._base)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_target(blocks: int, width: int, hidden: int, heads: int, image_size: int) -> nn.Module:
    """ViT-L/16 widths with ``blocks`` encoder blocks and random weights."""
    return torchvision.models.VisionTransformer(
        image_size=image_size, patch_size=16, num_layers=blocks, num_heads=heads, hidden_dim=hidden, mlp_dim=width
    ).eval()


def validation_pass(
    model: nn.Module, probe: Tensor, batch: int, recorder: ActivationRecorder | None, device: torch.device
) -> float:
    """One pass over the probe set, driven like the callback drives the recorder; returns seconds."""
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in range(0, probe.shape[0], batch):
            x = probe[start : start + batch]
            if recorder is not None:
                recorder.begin_batch(x.shape[0])
            model(x)
    if recorder is not None:
        recorder.sync(lambda t: t)
    sync(device)
    return time.perf_counter() - t0


def recorder_bound(units_per_layer: list[int], k: int, merge_rows: int, batch: int, reservoir: int) -> int:
    """The recorder's documented memory bound (recording/topk.py), buffers plus pending candidate chunks; the
    pending rows of a layer are capped by ``DEFAULT_MAX_PENDING_BYTES``."""
    from lightning_neurons.recording.topk import DEFAULT_MAX_PENDING_BYTES

    total = 28 * reservoir
    for u in units_per_layer:
        rows = min(merge_rows, max(1, DEFAULT_MAX_PENDING_BYTES // (12 * u)))
        total += u * k * 28 + (rows + batch) * (u * 12 + 16)
    return total


def store_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("round-*.parquet"))


def event_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("events.out.tfevents.*"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--blocks", type=int, default=None, help="encoder blocks recorded (cpu 2, cuda 24)")
    parser.add_argument("--width", type=int, default=4096, help="MLP units per block")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=None, help="input side (cpu 112, cuda 224)")
    parser.add_argument("--probe", type=int, default=None, help="probe images (cpu 256, cuda 2048)")
    parser.add_argument("--batch", type=int, default=None, help="validation batch (cpu 32, cuda 128)")
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--reservoir", type=int, default=64)
    parser.add_argument("--merge-rows", type=int, default=2048, help="ActivationRecorder merge_rows")
    parser.add_argument("--encoder", default=None, choices=["embedded", "pooled"], help="cpu pooled, cuda embedded")
    parser.add_argument("--crop-size", type=int, default=None, help="encoder crop side (cpu 64, cuda 224)")
    parser.add_argument("--concepts", type=int, default=1000, help="concepts of the general vocabulary used")
    parser.add_argument("--history-rounds", type=int, default=100, help="rounds written for the history figures")
    parser.add_argument("--log-units", type=int, default=8, help="NeuronTensorBoardLogger log_units")
    parser.add_argument("--table-rows", type=int, default=512, help="NeuronTensorBoardLogger table_rows")
    parser.add_argument("--skip-report", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    blocks = args.blocks or (24 if cuda else 2)
    image_size = args.image_size or (224 if cuda else 112)
    probe_n = args.probe or (2048 if cuda else 256)
    batch = args.batch or (128 if cuda else 32)
    crop_size = args.crop_size or (224 if cuda else 64)
    encoder_name = args.encoder or ("embedded" if cuda else "pooled")
    torch.manual_seed(0)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True

    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "target": f"VisionTransformer(patch 16, hidden {args.hidden}, heads {args.heads}, mlp {args.width}), "
        f"{blocks} blocks recorded, random weights",
        "image_size": image_size,
        "probe_images": probe_n,
        "batch": batch,
        "top_k": args.top_k,
        "crop_size": crop_size,
        "encoder": encoder_name,
    }
    model = build_target(blocks, args.width, args.hidden, args.heads, image_size).to(device)
    layers = [f"encoder.layers.encoder_layer_{i}.mlp.1" for i in range(blocks)]
    probe = synthetic_probe(probe_n, image_size, device)
    units = blocks * args.width
    result["units"] = units
    log(f"{units} units, {probe_n} probe images of {image_size} px on {result['device']}")

    # 1. recording: plain validation vs validation with the recorder, interleaved (noisy machines)
    validation_pass(model, probe[: batch * 2], batch, None, device)  # warm-up
    plain, recorded = [], []
    recorder = ActivationRecorder(model, layers, args.top_k, reservoir_size=args.reservoir, merge_rows=args.merge_rows)
    for _ in range(2):
        plain.append(validation_pass(model, probe, batch, None, device))
        recorder.reset()
        with recorder:
            with PeakMemory(device) as rec_mem:
                recorded.append(validation_pass(model, probe, batch, recorder, device))
    recording = recorder.result(epoch=0)
    result["record"] = {
        "plain_validation_s": round(min(plain), 3),
        "recorded_validation_s": round(min(recorded), 3),
        "overhead_ratio": round(min(recorded) / min(plain), 3),
        "peak_mem_above_model_bytes": rec_mem.above_entry,
    }
    result["recorder_bytes"] = recorder.nbytes
    result["recorder_bound_bytes"] = recorder_bound(
        [args.width] * blocks, args.top_k, args.merge_rows, batch, args.reservoir
    )
    log(f"recorded: {result['record']}, buffers {recorder.nbytes} B")

    # 2. one explanation round (model loading excluded)
    from lightning_neurons.backends import load_backend
    from lightning_neurons.concepts.vocabulary import general_concepts

    t0 = time.perf_counter()
    backend = load_backend("embedded", device=device, generator=False, image_size=crop_size, batch_size=256)
    result["backend_load_s_excluded"] = round(time.perf_counter() - t0, 3)
    result["encoder_crops_per_s"] = round(encoder_rate(backend.encoder, crop_size, device), 1)
    if encoder_name == "pooled":
        # Texts by the text encoder (MiniLM), never by the ConSE encoder, whose text space is its class space.
        text_encoder = backend.text_encoder or backend.encoder
        backend = Backend("pooled", PooledEncoder(text_encoder), text_encoder=backend.text_encoder)
    vocab = list(dict.fromkeys(general_concepts()))[: args.concepts]
    texts = (vocab, backend.encoder.encode_texts(vocab))  # concept embeddings are cached across rounds in a run
    cfg = ExplainConfig(
        crop_size=crop_size,
        batch_size=batch,
        encoder_batch_size=256,
        region_chunk=4096,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        device=args.device,
        show_progress=False,
        preview_units={name: list(range(args.log_units)) for name in layers},
        truncate_forward=True,
    )
    with torch.no_grad():
        backend.encoder.encode_images(torch.rand(2, 3, crop_size, crop_size, device=device))  # warm-up
    sync(device)
    with PeakMemory(device) as round_mem:
        t0 = time.perf_counter()
        rnd = explain_recording(model, recording, TensorSource(probe), backend, texts, cfg, epoch=0)
        sync(device)
        round_s = time.perf_counter() - t0
    timings = {k: round(v, 3) for k, v in rnd.meta["timings"].items()}
    result["round_s"] = round(round_s, 3)
    result["timings_s"] = timings
    result["build_units_s"] = round(round_s - sum(rnd.meta["timings"].values()), 3)
    result["peak_mem_bytes"] = round_mem.above_entry
    embedded = rnd.meta["unique_crops"] + rnd.meta["control_crops"]
    result["crops"] = {
        "pairs": rnd.meta["crops"],
        "unique": rnd.meta["unique_crops"],
        "control": rnd.meta["control_crops"],
        "unique_fraction": round(rnd.meta["unique_crops"] / max(1, rnd.meta["crops"]), 4),
    }
    result["round_encoder_crops_per_s"] = round(embedded / max(1e-9, rnd.meta["timings"]["embed_crops"]), 1)
    log(f"round: {round_s:.2f} s {timings}, peak +{round_mem.above_entry / 2**20:.0f} MiB")

    # 3. history: bytes per round and load time of N rounds, through the public API only (the round store)
    tmp = Path(tempfile.mkdtemp(prefix="ln_scale_"))
    hist_path = tmp / STORE_DIRNAME
    history = RunHistory()
    history.attach(hist_path)
    embed = backend.encode_descriptions
    add_s = []
    sizes = [0]
    for epoch in range(args.history_rounds):
        r = ExplanationRound(epoch=epoch, units=[copy.copy(u) for u in rnd.units], meta=rnd.meta)
        if epoch % 3 == 1:  # some units change meaning: exercises the embedder and the 'changed' path
            for u in r.units[::7]:
                u.description = vocab[(vocab.index(u.description) + 1) % len(vocab)] if u.description else ""
        t0 = time.perf_counter()
        drift = history.add_round(r, embed)
        add_s.append(time.perf_counter() - t0)
        sizes.append(store_bytes(hist_path))
        if epoch == 0:
            first_drift = drift
    per_round = [b - a for a, b in zip(sizes, sizes[1:])]
    t0 = time.perf_counter()
    loaded = load_history(hist_path)
    result["history_open_s"] = round(time.perf_counter() - t0, 4)  # lazy: the listing and one footer
    t0 = time.perf_counter()
    frame = loaded.to_pandas()
    result["history_to_pandas_s"] = round(time.perf_counter() - t0, 3)
    assert len(frame) == len(history)
    t0 = time.perf_counter()
    assert len(loaded) == len(history)  # every record as Python objects (what RunHistory's queries need)
    load_s = time.perf_counter() - t0
    n_rounds = args.history_rounds
    result["history_rounds"] = n_rounds
    result["history_bytes_per_round"] = int(sum(per_round) / max(1, len(per_round)))
    result["history_bytes_per_unit_round"] = round(result["history_bytes_per_round"] / units, 1)
    result["history_add_round_s"] = {"first": round(add_s[0], 3), "last": round(add_s[-1], 3)}
    t0 = time.perf_counter()
    summary_last = history.summary(n_rounds - 1)
    result["history_summary_epoch_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    history.summary()
    result["history_summary_all_s"] = round(time.perf_counter() - t0, 3)
    state = history.checkpoint_state()
    result["checkpoint_state_bytes"] = len(json.dumps(state))
    result["state_dict_bytes"] = len(json.dumps(history.state_dict()))
    assert summary_last and "store" in state
    result["history_load_s"] = round(load_s, 3)
    result["history_load_s_100_rounds"] = round(load_s * 100 / max(1, n_rounds), 3)
    log(f"history: {result['history_bytes_per_round']} B/round, load of {n_rounds} rounds {load_s:.2f} s")

    # 4. TensorBoard: event bytes of one round (table + scalars + log_units unit cards)
    from torch.utils.tensorboard import SummaryWriter

    from lightning_neurons.logging.tensorboard import NeuronTensorBoardLogger

    # (default table_rows, then every unit in the table as before the cap, for comparison)
    for name, rows in (("", args.table_rows), ("_full_table", None)):
        tb_dir = tmp / f"tb{name}"
        with SummaryWriter(tb_dir) as writer:
            tb = NeuronTensorBoardLogger(writer, log_units=args.log_units, table_rows=rows)
            tb.write_layout(rnd.layers)
            before = event_bytes(tb_dir)
            t0 = time.perf_counter()
            tb.log_round(rnd, first_drift, history.summary(0), epoch=0)
            result[f"tensorboard_log_s{name}"] = round(time.perf_counter() - t0, 3)
            result[f"tensorboard_bytes_per_round{name}"] = event_bytes(tb_dir) - before
    result["tensorboard_table_rows"] = args.table_rows

    # 5. HTML report of the N-round history
    if not args.skip_report:
        from lightning_neurons.logging.report import render_report

        t0 = time.perf_counter()
        page = render_report(loaded)
        result["report_render_s"] = round(time.perf_counter() - t0, 3)
        result["report_bytes"] = len(page.encode("utf-8"))

    # per-unit costs and their linear extrapolation to 24 x 4096 units. Peak memory is not linear: the region,
    # crop and encoder chunks are bounded by their chunk sizes; what grows with units is the explanation state held
    # per unit (top maps [k, h, w] and control values [R, h, w] in float32), at ViT-L/16's 14 x 14 grid on 224 px.
    state_bytes = 4 * (args.top_k + args.reservoir) * 14 * 14
    scale = FULL_UNITS / units
    non_encoder_s = round_s - rnd.meta["timings"]["embed_crops"]
    per_unit = {
        "recorder_bytes": recorder.nbytes / units,
        "recorder_bound_bytes": (result["recorder_bound_bytes"] - 28 * args.reservoir) / units,
        "round_s_without_encoder": non_encoder_s / units,
        "crops_embedded": embedded / units,
        "history_bytes_per_round": result["history_bytes_per_round"] / units,
        "history_load_s_per_round": load_s / n_rounds / units,
        "tensorboard_bytes_per_round": result["tensorboard_bytes_per_round"] / units,
        "peak_mem_bytes": result["peak_mem_bytes"] / units,
        "explain_state_bytes": state_bytes,
    }
    result["per_unit"] = {k: float(f"{v:.4g}") for k, v in per_unit.items()}
    result["extrapolated_100k"] = {
        "units": FULL_UNITS,
        "recorder_bytes": int(per_unit["recorder_bytes"] * FULL_UNITS),
        "recorder_bound_bytes": int(per_unit["recorder_bound_bytes"] * FULL_UNITS),
        "round_s_without_encoder": round(non_encoder_s * scale, 1),
        "round_s_with_embedded_encoder": round(
            non_encoder_s * scale + embedded * scale / result["encoder_crops_per_s"], 1
        ),
        "crops_to_embed": int(embedded * scale),
        "encoder_s_at_measured_rate": round(embedded * scale / max(1e-9, result["encoder_crops_per_s"]), 1),
        "history_bytes_per_round": int(per_unit["history_bytes_per_round"] * FULL_UNITS),
        "history_load_s_100_rounds": round(load_s * 100 / n_rounds * scale, 1),
        "history_to_pandas_s_100_rounds": round(result["history_to_pandas_s"] * 100 / n_rounds * scale, 1),
        "tensorboard_bytes_per_round": int(per_unit["tensorboard_bytes_per_round"] * FULL_UNITS),
        "peak_mem_bytes": int(result["peak_mem_bytes"] + (FULL_UNITS - units) * state_bytes),
        "note": "linear in units; the forward stage also grows with the model depth recorded; add_round and "
        "summary(epoch) cost one round's units, the history load is linear in records (see history_add_round_s "
        "first/last)",
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
