#!/usr/bin/env bash
# Several machines: run this on every node with the same environment except NODE_RANK.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NPROC_PER_NODE=8 \
#       launch/multinode.sh configs/demo.toml --data.path=/shared/criteo
# Arguments after CONFIG are config overrides (--section.key=value), passed to distrec.train as they are.
set -euo pipefail
. "$(dirname "$0")/common.sh"

usage="usage: NNODES=N NODE_RANK=R MASTER_ADDR=HOST MASTER_PORT=PORT NPROC_PER_NODE=P $0 CONFIG [--section.key=value ...]"
missing=()
for var in NNODES NODE_RANK MASTER_ADDR MASTER_PORT NPROC_PER_NODE; do
    [[ -n ${!var:-} ]] || missing+=("$var")
done
if [[ $# -lt 1 || ${#missing[@]} -gt 0 ]]; then
    [[ ${#missing[@]} -eq 0 ]] || echo "not set: ${missing[*]}" >&2
    echo "$usage" >&2
    exit 2
fi
config=$1
shift
need_command torchrun "activate the environment first (. .venv/bin/activate)"

# c10d rendezvous is hosted by the agent on MASTER_ADDR (it needs no separate store); with it the
# global ranks follow the rendezvous order, and NODE_RANK only labels this node. RDZV_ID keeps two
# jobs that share a master apart.
exec torchrun \
    --nnodes "$NNODES" \
    --node_rank "$NODE_RANK" \
    --nproc_per_node "$NPROC_PER_NODE" \
    --rdzv_backend c10d \
    --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" \
    --rdzv_id "${RDZV_ID:-distrec}" \
    -m distrec.train --config "$config" "$@"
