#!/usr/bin/env bash
# One machine, NPROC ranks (one per GPU; on CPU they share the cores over gloo).
#   launch/torchrun.sh 2 configs/demo.toml --data.path=runs/demo/data --logging.dir=runs/demo/logs
# Arguments after CONFIG are config overrides (--section.key=value), passed to distrec.train as they are.
set -euo pipefail

usage="usage: $0 NPROC CONFIG [--section.key=value ...]"
if [[ $# -lt 2 ]]; then
    echo "$usage" >&2
    exit 2
fi
nproc=$1
config=$2
shift 2
if ! [[ $nproc =~ ^[1-9][0-9]*$ ]]; then
    echo "NPROC must be a positive integer, got '$nproc'; $usage" >&2
    exit 2
fi
if ! command -v torchrun >/dev/null; then
    echo "torchrun is not on PATH: activate the environment first (. .venv/bin/activate)" >&2
    exit 2
fi

# --standalone: a private rendezvous on a free local port, so two jobs on one machine cannot collide.
exec torchrun --standalone --nproc_per_node "$nproc" -m distrec.train --config "$config" "$@"
