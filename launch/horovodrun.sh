#!/usr/bin/env bash
# distrec.train with Horovod as the engine (--dense.engine horovod: hvd.DistributedOptimizer sums the dense
# gradients, hvd.alltoall carries the embedding exchanges), on Horovod's Gloo controller (no MPI).
#   launch/horovodrun.sh 2 configs/demo.toml --data.path=runs/demo/data
#   HOSTS=node1:4,node2:4 launch/horovodrun.sh 8 configs/demo.toml
# Arguments after CONFIG are config overrides (--section.key=value), passed to distrec.train as they are.
# Install Horovod first: launch/install_horovod.sh (the Docker image has it).
set -euo pipefail

usage="usage: [HOSTS=host1:slots,host2:slots] $0 NP CONFIG [--section.key=value ...]"
if [[ $# -lt 2 ]]; then
    echo "$usage" >&2
    exit 2
fi
np=$1
config=$2
shift 2
if ! [[ $np =~ ^[1-9][0-9]*$ ]]; then
    echo "NP must be a positive integer, got '$np'; $usage" >&2
    exit 2
fi
if ! command -v horovodrun >/dev/null; then
    echo "horovodrun is not on PATH: run launch/install_horovod.sh (or use the Docker image), then activate its venv" >&2
    exit 2
fi

hosts=()
[[ -z ${HOSTS:-} ]] || hosts=(-H "$HOSTS")
# One intra-op thread per rank unless asked otherwise, as torchrun does: ranks share the cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec horovodrun -np "$np" ${hosts[@]+"${hosts[@]}"} --gloo \
    "${PYTHON:-python}" -m distrec.train --config "$config" --dense.engine=horovod "$@"
