#!/usr/bin/env bash
# The GPU check: device tests (pytest -m cuda, tests/test_gpu_check.py) and probes (scripts/gpu_probes.py:
# fused attention, CUDA-graph capture of a decode step, decode steps with host syncs and ops counted).
#   bash scripts/gpu_check.sh          # on a GPU machine, after scripts/install.sh (under 8 minutes)
#   bash scripts/gpu_check.sh --cpu    # the same checks on the CPU, GPU-only probes "skipped: no GPU" (CI runs it)
# Exit status: 0 when every check passed; the probes report what they find and fail only when they cannot run.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
[ "${1:-}" = "--cpu" ] && DEVICE=cpu
export SKIPRAY_CHECK_DEVICE=$DEVICE HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=${PY:-.venv/bin/python}
status=0
echo "== gpu_check on $DEVICE: device tests"
timeout 300 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_gpu_check.py || status=1
echo "== gpu_check on $DEVICE: probes"
timeout 300 "$PY" scripts/gpu_probes.py --device "$DEVICE" --out "${GPU_CHECK_OUT:-bench/results/gpu_check_$DEVICE.json}" || status=1
echo "== gpu_check on $DEVICE: $([ $status = 0 ] && echo passed || echo FAILED)"
exit $status
