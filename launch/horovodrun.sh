#!/usr/bin/env bash
# Horovod with its Gloo controller (the Docker image builds Horovod without MPI).
#   launch/horovodrun.sh 4 configs/demo.toml --data.path=runs/demo/data
#   HOSTS=node1:4,node2:4 launch/horovodrun.sh 8 configs/demo.toml
# Arguments after CONFIG are config overrides (--section.key=value), passed to distrec.train as they are.
#
# NOTE: --train.dense_parallel does not exist yet; it lands with the Horovod support issue. Until then
# the config loader rejects it and this script fails at start-up with a ConfigError naming the key.
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
    echo "horovodrun is not on PATH: Horovod is installed in the Docker image (see Dockerfile)" >&2
    exit 2
fi

hosts=()
[[ -z ${HOSTS:-} ]] || hosts=(-H "$HOSTS")
exec horovodrun -np "$np" ${hosts[@]+"${hosts[@]}"} --gloo \
    "${PYTHON:-python}" -m distrec.train --config "$config" --train.dense_parallel=horovod "$@"
