#!/usr/bin/env bash
# One prepared GPU check (issue 21): benchmarks/gpu_check.py's steps, report in $OUT (or --out DIR).
#   benchmarks/gpu_check.sh              # on the GPU machine, with its own python3 (torch, Triton)
#   benchmarks/gpu_check.sh --dry-run    # on a CPU: the same steps, tiny shapes, Triton interpreted
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py "$@"
