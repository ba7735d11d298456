"""Dashboard and history-store figures on a synthetic ViT-L-sized history (100 rounds x 98,304 units by default).

Prints ONE JSON object on stdout (progress on stderr):

- ``write_round_s``: one round of ``--units`` records written through ``RunHistory``'s store (records -> Arrow ->
  Parquet, atomic rename), pinned to one CPU core, the fastest of three (``write_round_encode_s``: records -> Arrow
  alone); ``bytes_per_unit_round``: the store's bytes over all rounds;
- the Neurons tab's queries (:mod:`lightning_neurons.dashboard.queries`) on a fresh store object (as after a
  TensorBoard start: no footer read yet): ``first_view_s`` (a layer's grid at the latest epoch), ``charts_s`` (its
  charts over all rounds, which the tab loads with the grid), ``search_s`` (every unit of the latest round),
  ``timeline_cold_s`` (one unit across all rounds as the very first query);
- ``timeline_s``: a unit's timeline as the tab asks for it, after the layer's grid and charts on the same store object
  (the tab keeps it across requests; the charts have read every round's footer), and ``timeline_warm_s`` another
  unit's;
- ``open_s`` (``load_history``, lazy) and ``to_pandas_s`` (every record of every round as a DataFrame) on one core,
  and ``to_pandas_all_cores_s`` with the cores the process started with (Arrow decodes columns in parallel).

The rounds after the first are the first round's table with the epoch, some descriptions and the drift columns
changed per round (vectorised, so that writing 100 rounds takes minutes, not hours); the write figure is for real
records. Everything but ``to_pandas_all_cores_s`` runs on one core (``os.sched_setaffinity``, Arrow's CPU and IO
pools at 1 thread); ``cpu_s`` gives each figure's CPU time (on a shared machine wall time includes waiting).

Examples:
    python benchmarks/dashboard.py                              # the full size: ~1.7 GB in a temporary folder
    python benchmarks/dashboard.py --units 4096 --rounds 10     # a quick look
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from lightning_neurons.dashboard.queries import HistoryTables, layer_charts, layer_view, search, unit_timeline
from lightning_neurons.drift.columns import records_to_table
from lightning_neurons.drift.history import load_history
from lightning_neurons.drift.metrics import UnitDrift
from lightning_neurons.drift.records import HistoryRecord
from lightning_neurons.drift.round_store import RoundStore
from lightning_neurons.results import Alternative, UnitExplanation

KINDS = ["concept", "concept", "concept", "unclear", "low_level", "dead"]


def log(message: str) -> None:
    sys.stderr.write(f"[dashboard] {message}\n")
    sys.stderr.flush()


def synthetic_records(units: int, per_layer: int, vocab: list[str], top_k: int, seed: int = 0) -> list[HistoryRecord]:
    """One round of records shaped like a real one: descriptions from a vocabulary, 3 alternatives, top-k ids,
    the shared-contract fields (kind, p, q, ...) and drift against a previous epoch."""
    rng = random.Random(seed)
    out = []
    for i in range(units):
        layer, unit = f"encoder.layers.encoder_layer_{i // per_layer}.mlp.1", i % per_layer
        text = vocab[rng.randrange(len(vocab))]
        kind = KINDS[rng.randrange(len(KINDS))]
        e = UnitExplanation(
            layer,
            unit,
            1,
            text,
            rng.random(),
            margin=rng.random(),
            concept_score=rng.random(),
            alternatives=[Alternative(vocab[rng.randrange(len(vocab))], rng.random()) for _ in range(3)],
            top_sample_ids=rng.sample(range(2048), top_k),
            confidence=rng.random(),
            kind=kind,
            p_value=rng.random() / 10,
            q_value=rng.random() / 5,
            low_level="brightness" if kind == "low_level" else None,
            concept_gain=rng.random() / 10,
            auc=rng.random(),
        )
        similarity = rng.random()
        d = UnitDrift(layer, unit, 1, text, e.score, 0, vocab[rng.randrange(len(vocab))], similarity, similarity < 0.3)
        d.jaccard, d.score_delta = rng.random(), rng.random() - 0.5
        out.append(HistoryRecord(e, d))
    return out


def round_table(base: pa.Table, epoch: int, vocab: pa.Array, rng: np.random.Generator) -> pa.Table:
    """The base round moved to ``epoch``: a seventh of the units take another concept, drift columns to match."""
    n = base.num_rows
    moved = rng.random(n) < 1 / 7
    desc = base.column("description").combine_chunks().dictionary_decode()
    new = pa.array(np.asarray(vocab)[rng.integers(0, len(vocab), n)])
    description = pa.array(np.where(moved, new.to_numpy(zero_copy_only=False), desc.to_numpy(zero_copy_only=False)))
    similarity = np.where(moved, rng.random(n) * 0.7, 1.0)
    columns = {
        "epoch": pa.array(np.full(n, epoch, dtype=np.int32)),
        "description": description.dictionary_encode(),
        "shown": description.dictionary_encode(),
        "previous_epoch": pa.array(np.full(n, epoch - 1, dtype=np.int32), mask=np.full(n, epoch == 0)),
        "similarity": pa.array(similarity, mask=np.full(n, epoch == 0)),
        "changed": pa.array(moved & (epoch > 0)),
        "score": pa.array(rng.random(n)),
    }
    table = base
    for name, values in columns.items():
        table = table.set_column(table.schema.get_field_index(name), name, values)
    return table


CPU: dict[str, float] = {}  # CPU seconds of the process per figure: on a shared machine, wall time includes waiting
LAST_CPU = [0.0]  # the CPU seconds of the latest `timed` call


def timed(fn: Any, repeat: int = 1, name: str | None = None) -> tuple[float, Any]:
    best, best_cpu, out = float("inf"), float("inf"), None
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    if name:
        CPU[name] = round(best_cpu, 4)
    LAST_CPU[0] = best_cpu
    return best, out


def best_of(repeat: int, setup: Any, fn: Any, name: str) -> tuple[float, Any]:
    """:func:`timed` of ``fn(*setup())``, a new ``setup()`` (not timed) for every repeat: the fastest wall and CPU."""
    best, best_cpu, out = float("inf"), float("inf"), None
    for _ in range(repeat):
        wall, out = timed(functools.partial(fn, *setup()))
        best, best_cpu = min(best, wall), min(best_cpu, LAST_CPU[0])
    CPU[name] = round(best_cpu, 4)
    return best, out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--units", type=int, default=98304, help="units per round (24 x 4096 = ViT-L MLP units)")
    parser.add_argument("--per-layer", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--concepts", type=int, default=1500, help="vocabulary size")
    parser.add_argument("--dir", default=None, help="folder for the store (default: a temporary one, removed)")
    args = parser.parse_args(argv)

    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cores[0]})
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    vocab = [f"concept {i}" for i in range(args.concepts)]
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="ln_dashboard_"))
    url = root / "history"
    result: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), measured on 1 core "
        f"(to_pandas_all_cores_s on {len(cores)})",
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "pyarrow": pa.__version__,
        "units": args.units,
        "rounds": args.rounds,
        "top_k": args.top_k,
    }
    try:
        t0 = time.perf_counter()
        records = synthetic_records(args.units, args.per_layer, vocab, args.top_k)
        log(f"{args.units} synthetic records in {time.perf_counter() - t0:.1f} s")
        RoundStore(root / "warm-up").write_round(records[:16])  # imports and codec set-up, once per process
        scratch = RoundStore(root / "write")  # three writes of the round, the fastest kept
        write_s, _ = timed(lambda: scratch.write_round(records), repeat=3, name="write_round_s")
        result["write_round_s"] = round(write_s, 3)
        result["write_round_bytes_per_unit"] = round(scratch.size_bytes() / 3 / args.units, 1)
        result["write_round_encode_s"], _ = timed(lambda: records_to_table(records), name="write_round_encode_s")
        log(f"write: {write_s:.2f} s for one round ({result['write_round_bytes_per_unit']} B/unit)")
        base = scratch.read(scratch.files()[0])
        scratch.close()
        shutil.rmtree(root / "write")

        store = RoundStore(url)
        rng = np.random.default_rng(0)
        vocab_arr = pa.array(vocab)
        t0 = time.perf_counter()
        for epoch in range(args.rounds):
            store.publish(round_table(base, epoch, vocab_arr, rng), epoch)
        log(f"{args.rounds} rounds written in {time.perf_counter() - t0:.0f} s")
        store.close()
        total = store.size_bytes()
        result["store_bytes"] = total
        result["bytes_per_unit_round"] = round(total / (args.units * args.rounds), 1)

        last_layer = f"encoder.layers.encoder_layer_{(args.units - 1) // args.per_layer}.mlp.1"

        def fresh() -> HistoryTables:
            return HistoryTables(store=RoundStore(url))

        result["first_view_s"], view = timed(
            lambda: layer_view(fresh(), last_layer, sort="drift", limit=200), name="first_view_s"
        )
        assert view["total"] == args.per_layer and len(view["units"]) == min(200, args.per_layer)
        result["charts_s"], charts = timed(lambda: layer_charts(fresh(), last_layer), name="charts_s")
        assert len(charts["epochs"]) == args.rounds
        result["search_s"], found = timed(lambda: search(fresh(), "concept 42"), name="search_s")
        result["search_matched"] = found["matched"]
        # Each timeline scenario three times from its start (a fresh store object), the fastest kept (as `timed`).
        result["timeline_cold_s"], timeline = best_of(
            3, lambda: (fresh(),), lambda t: unit_timeline(t, last_layer, 123 % args.per_layer), "timeline_cold_s"
        )
        assert len(timeline["epochs"]) == args.rounds

        def tab_sequence() -> tuple[HistoryTables]:
            tab = fresh()  # the tab's requests: the layer's grid and charts, then the unit the user clicks
            layer_view(tab, last_layer, sort="drift", limit=200)
            layer_charts(tab, last_layer)
            return (tab,)

        result["timeline_s"], _ = best_of(3, tab_sequence, lambda t: unit_timeline(t, last_layer, 7), "timeline_s")
        (tab,) = tab_sequence()
        result["timeline_warm_s"], _ = timed(
            lambda: unit_timeline(tab, last_layer, args.per_layer - 1), repeat=3, name="timeline_warm_s"
        )
        result["search_warm_s"], _ = timed(lambda: search(tab, "concept 42"), repeat=3, name="search_warm_s")
        result["open_s"], history = timed(lambda: load_history(url), name="open_s")
        result["to_pandas_s"], frame = timed(lambda: history.to_pandas(), name="to_pandas_s")
        result["to_pandas_rows"] = len(frame)
        assert len(frame) == args.units * args.rounds
        result["to_pandas_columns"] = len(frame.columns)
        del frame
        if hasattr(os, "sched_setaffinity") and len(cores) > 1:
            os.sched_setaffinity(0, set(cores))
            pa.set_cpu_count(len(cores))
            pa.set_io_thread_count(len(cores))
        result["to_pandas_all_cores_s"], _ = timed(lambda: load_history(url).to_pandas(), name="to_pandas_all_cores_s")
        result["to_pandas_all_cores"] = len(cores)
        targets = {
            "bytes_per_unit_round": 200,
            "write_round_s": 2,
            "first_view_s": 2,
            "timeline_s": 0.2,
            "timeline_cold_s": 0.2,
            "search_s": 1,
            "to_pandas_s": 10,
            "to_pandas_all_cores_s": 10,
        }
        result["targets"] = {k: {"target": v, "met": bool(result[k] < v)} for k, v in targets.items()}
        for k in (
            "write_round_encode_s",
            "first_view_s",
            "charts_s",
            "timeline_s",
            "timeline_cold_s",
            "timeline_warm_s",
            "search_s",
            "search_warm_s",
            "open_s",
        ):
            result[k] = round(result[k], 4)
        result["to_pandas_s"] = round(result["to_pandas_s"], 3)
        result["to_pandas_all_cores_s"] = round(result["to_pandas_all_cores_s"], 3)
        result["cpu_s"] = dict(CPU)
        result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
