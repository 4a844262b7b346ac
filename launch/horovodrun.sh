#!/usr/bin/env bash
# distrec.train with Horovod as the engine (--dense.engine horovod: hvd.DistributedOptimizer sums the dense
# gradients, hvd.alltoall carries the embedding exchanges), on Horovod's Gloo controller (no MPI).
#   launch/horovodrun.sh 2 configs/demo.toml --data.path=runs/demo/data
#   HOSTS=node1:4,node2:4 launch/horovodrun.sh 8 configs/demo.toml
# Arguments after CONFIG are config overrides (--section.key=value), passed to distrec.train as they are.
# Install Horovod first: launch/install_horovod.sh (the Docker image has it).
set -euo pipefail
. "$(dirname "$0")/common.sh"

usage="usage: [HOSTS=host1:slots,host2:slots] $0 NP CONFIG [--section.key=value ...]"
count_and_config NP "$usage" "$@"
need_command horovodrun "run launch/install_horovod.sh (or use the Docker image), then activate its venv"

hosts=()
[[ -z ${HOSTS:-} ]] || hosts=(-H "$HOSTS")
# One intra-op thread per rank unless asked otherwise, as torchrun does: ranks share the cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec horovodrun -np "$count" ${hosts[@]+"${hosts[@]}"} --gloo \
    "${PYTHON:-python}" -m distrec.train --config "$config" --dense.engine=horovod "${overrides[@]}"
