#!/usr/bin/env bash
# The GPU measurements, as one command for a lent GPU machine (torch/torchvision/lightning/transformers there;
# open_clip comes as wheels in .whl/, see benchmarks/README.md). Writes the JSON results into $OUT (or ./gpu_out).
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:src
else
  export PYTHONPATH=src
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" | tee -a "$OUT/gpu.txt"
timeout 200 python3 benchmarks/recording_overhead.py --device cuda --runs 5 > "$OUT/recording_overhead.json" 2> "$OUT/recording_overhead.err"
echo "recording_overhead rc=$?"; cat "$OUT/recording_overhead.json"; tail -5 "$OUT/recording_overhead.err"
timeout 280 python3 benchmarks/explain_throughput.py --device cuda --max-seconds 230 > "$OUT/explain_throughput.json" 2> "$OUT/explain_throughput.err"
echo "explain_throughput rc=$?"; cat "$OUT/explain_throughput.json"; tail -15 "$OUT/explain_throughput.err"
