#!/usr/bin/env bash
# Asynchronous parameter-server training (CPU, torch.distributed.rpc).
#
# One machine, one command (the coordinator spawns the servers and workers):
#   launch/ps.sh local 2 1 configs/demo.toml --data.path=runs/demo/data --logging.dir=runs/ps/logs
#       (WORKERS=2, SERVERS=1)
#
# Several machines: start one process per role, each with the same config, the same data path
# (shared storage or a copy at the same path), the same WORKERS/SERVERS and the coordinator's address.
# RPC ranks are fixed by role: coordinator 0, server s = 1 + s, worker w = 1 + SERVERS + w.
#   MASTER_ADDR=10.0.0.1 MASTER_PORT=29600 launch/ps.sh coordinator 2 1 configs/demo.toml ...   # on 10.0.0.1
#   MASTER_ADDR=10.0.0.1 MASTER_PORT=29600 INDEX=0 launch/ps.sh server 2 1 configs/demo.toml ...
#   MASTER_ADDR=10.0.0.1 MASTER_PORT=29600 INDEX=0 launch/ps.sh worker 2 1 configs/demo.toml ...
#   MASTER_ADDR=10.0.0.1 MASTER_PORT=29600 INDEX=1 launch/ps.sh worker 2 1 configs/demo.toml ...
# The coordinator pings every process; one that dies or stops answering for --ps.timeout_s (default
# 60) ends the run with "distrec ps: error: worker 1 (pid N) ...", and the others exit non-zero when
# they lose the coordinator.
set -euo pipefail

usage="usage: [MASTER_ADDR=HOST MASTER_PORT=PORT INDEX=I] $0 local|coordinator|server|worker WORKERS SERVERS CONFIG [--section.key=value ...]"
if [[ $# -lt 4 ]]; then
    echo "$usage" >&2
    exit 2
fi
role=$1 workers=$2 servers=$3 config=$4
shift 4
if ! [[ $workers =~ ^[1-9][0-9]*$ && $servers =~ ^[1-9][0-9]*$ ]]; then
    echo "WORKERS and SERVERS must be positive integers; $usage" >&2
    exit 2
fi
if ! command -v distrec >/dev/null; then
    echo "distrec is not on PATH: activate the environment first (. .venv/bin/activate)" >&2
    exit 2
fi
common=(ps --workers "$workers" --servers "$servers" --config "$config")
case $role in
    local)
        exec distrec "${common[@]}" "$@" ;;
    coordinator|server|worker)
        if [[ -z ${MASTER_ADDR:-} || -z ${MASTER_PORT:-} ]]; then
            echo "MASTER_ADDR and MASTER_PORT must be set for role $role; $usage" >&2
            exit 2
        fi
        exec distrec "${common[@]}" --role "$role" --index "${INDEX:-0}" \
            "--ps.master_addr=$MASTER_ADDR" "--ps.master_port=$MASTER_PORT" "$@" ;;
    *)
        echo "unknown role '$role'; $usage" >&2
        exit 2 ;;
esac
