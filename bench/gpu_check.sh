#!/usr/bin/env bash
# GPU check (bench/gpu_check.py): bf16 OTIS-base StenCE pretraining through Ray Train (one worker, NCCL backend),
# frame-feature extraction on a GPU actor, and the CPU data path that feeds them. Prints samples/s, achieved
# TFLOP/s and MFU against the GPU's bf16 peak, and the data path's samples/s per CPU core. The whole check ends
# within 8 minutes: the Python part runs under `timeout 480` (its timed windows are sized by --minutes, default 6).
#
# Usage (from any directory; it changes to the repository root):
#   bash bench/gpu_check.sh [bench.gpu_check options]      e.g.  bash bench/gpu_check.sh --minutes 4 --batch 256
# Environment:
#   PYTHON          interpreter with the CUDA torch and the project installed (default .venv/bin/python, else python3)
#   GPU_CHECK_JSON  result file (default bench/results/gpu_check.json); set this rather than passing --out
#   OUT             when set (the GPU machine's output folder): the JSON and the log are copied there
#
# Set-up on the GPU machine, in a fresh checkout (the check needs the project's dependencies: ray, pandas, ...):
#   python3 -m venv .venv
#   .venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/<cuda tag, e.g. cu128>
#   .venv/bin/pip install -e .            # keeps the CUDA torch: its 2.13.0+cuXXX satisfies torch==2.13.0
# `make install` is for the CPU machines (dev, CI): it installs the CPU build of torch (Makefile TORCH_SPEC /
# TORCH_INDEX), with which the check refuses (exit code 2) unless given --cpu-smoke.
# Without network on the GPU machine, bring the project's dependencies as wheels and point PYTHON at the
# interpreter that holds the CUDA torch.
#
# Exit code: that of bench.gpu_check (0 all parts ran, 1 a part failed, 2 no GPU visible), 124 on the timeout.
set -euo pipefail

cd "$(dirname "$0")/.."

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
JSON="${GPU_CHECK_JSON:-bench/results/gpu_check.json}"
LOG="$(mktemp -t gpu_check.XXXXXX.log)"
mkdir -p "$(dirname "$JSON")"

copy_out() {
  if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    if [[ -f "$JSON" ]]; then cp "$JSON" "$OUT/gpu_check.json"; fi
    cp "$LOG" "$OUT/gpu_check.log" || true
  fi
}
trap copy_out EXIT

{
  echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) $(hostname) $(nproc) cores, python $PYTHON"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=index,name,driver_version,memory.total,memory.used,utilization.gpu,clocks.max.sm,power.limit \
      --format=csv || true
  else
    echo "nvidia-smi: not found"
  fi
} 2>&1 | tee "$LOG"

export PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true
export STENCE_SALT="${STENCE_SALT:-gpu-check-synthetic-secret}"  # the check ingests a synthetic export only

rc=0
timeout --kill-after=20 480 "$PYTHON" -m bench.gpu_check --out "$JSON" "$@" 2>&1 | tee -a "$LOG" || rc=$?
if [[ $rc -eq 124 || $rc -eq 137 ]]; then
  echo "gpu_check: stopped by the 480 s timeout (exit $rc); $JSON holds the parts that finished" | tee -a "$LOG"
fi
exit "$rc"
