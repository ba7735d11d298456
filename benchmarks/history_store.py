"""History store: the crash-safe JSON Lines file against one Parquet file per round (pyarrow), measured.

Writes ``--rounds`` rounds of ``--units`` realistic records (description, 5 alternatives, 16 top sample ids, drift
fields) both ways, then reads everything back, and prints one JSON object: bytes per record, write and read time
per record, and the extrapolation to 100k units x 100 rounds. Parquet is measured only when pyarrow is installed.

    python benchmarks/history_store.py --units 20000 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from lightning_neurons.drift.history import HISTORY_FILENAME, RunHistory, _read_jsonl
from lightning_neurons.drift.metrics import UnitDrift
from lightning_neurons.results import Alternative, UnitExplanation

WORDS = "red striped dotted furry metal wooden grass sky brick wall cat ear wheel leaf water coin rocket".split()


def _records(units: int, epoch: int, rng: random.Random):
    from lightning_neurons.drift.history import HistoryRecord

    out = []
    for u in range(units):
        text = " ".join(rng.sample(WORDS, 2))
        e = UnitExplanation(
            "features.block4",
            u,
            epoch,
            text,
            rng.random(),
            margin=rng.random(),
            concept_score=rng.random(),
            alternatives=[Alternative(" ".join(rng.sample(WORDS, 2)), rng.random()) for _ in range(5)],
            top_sample_ids=rng.sample(range(50_000), 16),
        )
        d = UnitDrift(
            "features.block4",
            u,
            epoch,
            text,
            e.score,
            epoch - 1 if epoch else None,
            text if epoch else None,
            rng.random() if epoch else None,
            False,
            rng.random() if epoch else None,
            rng.random() - 0.5 if epoch else None,
            0.75,
        )
        out.append(HistoryRecord(e, d))
    return out


def _parquet_write(directory: Path, records, epoch: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [r.to_dict() for r in records]
    columns = {k: [row[k] for row in rows] for k in rows[0]}
    tmp = directory / f".round_{epoch}.parquet.tmp"
    pq.write_table(pa.table(columns), tmp, compression="zstd")
    tmp.replace(directory / f"round_{epoch}.parquet")  # file per round: visible complete or not at all


def _parquet_read(directory: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.read_table(p).num_rows for p in sorted(directory.glob("round_*.parquet")))


def _parquet_records(directory: Path) -> int:
    # What RunHistory would need: every row back as a HistoryRecord.
    import pyarrow.parquet as pq

    from lightning_neurons.drift.history import HistoryRecord

    n = 0
    for p in sorted(directory.glob("round_*.parquet")):
        n += len([HistoryRecord.from_dict(row) for row in pq.read_table(p).to_pylist()])
    return n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--units", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rng = random.Random(0)
    rounds = [_records(args.units, e, rng) for e in range(args.rounds)]
    n = args.units * args.rounds
    result: dict[str, object] = {"units": args.units, "rounds": args.rounds, "records": n}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = root / HISTORY_FILENAME
        history = RunHistory(path=path)
        start = time.perf_counter()
        for records in rounds:
            history._append(records)  # the store's write: one fsynced write per round
        write = time.perf_counter() - start
        history.close()
        start = time.perf_counter()
        loaded = _read_jsonl(path)
        read = time.perf_counter() - start
        assert len(loaded) == n
        size = path.stat().st_size
        loaded.path = path  # as the run that writes the file holds it
        result["checkpoint_bytes"] = {
            "state_dict (every record)": len(json.dumps(loaded.state_dict())),
            "checkpoint_state (file path, round ids, latest record per unit)": len(
                json.dumps(loaded.checkpoint_state())
            ),
        }
        result["jsonl"] = {
            "bytes_per_record": round(size / n, 1),
            "write_us_per_record": round(write / n * 1e6, 2),
            "read_us_per_record": round(read / n * 1e6, 2),
            "size_gb_100k_units_x_100_rounds": round(size / n * 1e7 / 1e9, 2),
            "read_s_100k_units_x_100_rounds": round(read / n * 1e7, 1),
        }
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            result["parquet"] = "pyarrow not installed"
        else:
            directory = root / "parquet"
            directory.mkdir()
            start = time.perf_counter()
            for e, records in enumerate(rounds):
                _parquet_write(directory, records, e)
            write = time.perf_counter() - start
            start = time.perf_counter()
            assert _parquet_read(directory) == n
            read = time.perf_counter() - start
            start = time.perf_counter()
            assert _parquet_records(directory) == n
            records = time.perf_counter() - start
            size = sum(p.stat().st_size for p in directory.iterdir())
            result["parquet"] = {
                "bytes_per_record": round(size / n, 1),
                "write_us_per_record": round(write / n * 1e6, 2),
                "read_us_per_record (columns only, no RunHistory objects)": round(read / n * 1e6, 2),
                "read_us_per_record (to HistoryRecord objects)": round(records / n * 1e6, 2),
                "size_gb_100k_units_x_100_rounds": round(size / n * 1e7 / 1e9, 2),
                "read_s_100k_units_x_100_rounds": round(read / n * 1e7, 1),
                "read_s_100k_units_x_100_rounds (to HistoryRecord objects)": round(records / n * 1e7, 1),
            }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
