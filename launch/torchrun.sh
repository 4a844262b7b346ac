#!/usr/bin/env bash
# One machine, NPROC ranks (one per GPU; on CPU they share the cores over gloo).
#   launch/torchrun.sh 2 configs/demo.toml --data.path=runs/demo/data --logging.dir=runs/demo/logs
# Arguments after CONFIG are config overrides (--section.key=value), passed to distrec.train as they are.
set -euo pipefail
. "$(dirname "$0")/common.sh"

usage="usage: $0 NPROC CONFIG [--section.key=value ...]"
count_and_config NPROC "$usage" "$@"
need_command torchrun "activate the environment first (. .venv/bin/activate)"

# --standalone: a private rendezvous on a free local port, so two jobs on one machine cannot collide.
exec torchrun --standalone --nproc_per_node "$count" -m distrec.train --config "$config" "${overrides[@]}"
