#!/usr/bin/env bash
# Creates ./.venv with CPU PyTorch and c2r (editable, with test extras). Safe to re-run.
# On a GPU machine, install the CUDA build of torch into .venv first (https://pytorch.org), then re-run this.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# Pin torch before anything else: a bare "torch" requirement would download several GB of CUDA wheels.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[dev]'
