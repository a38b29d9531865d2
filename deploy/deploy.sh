#!/usr/bin/env bash
# Deploy bbam's attribution scale-out on Prefect (docs/scale_out.md). One step per command;
# the Makefile's deploy-* targets call these.
#
#   deploy/deploy.sh image              docker build + push of the worker image ($BBAM_IMAGE)
#   deploy/deploy.sh pools              work pools bbam-process + bbam-gpu (from
#                                       deploy/k8s-gpu-job-template.json) and the `gpu` limit
#   deploy/deploy.sh deployments [ARGS] `prefect deploy --all` (or ARGS) from prefect.yaml
#   deploy/deploy.sh process-workers    one process worker per local GPU, pinned to it
#   deploy/deploy.sh k8s-worker         a Kubernetes worker for bbam-gpu (cluster credentials)
#
# Environment: PREFECT_API_URL (every step but `image`), BBAM_IMAGE (image, deployments),
# BBAM_CHECKOUT (process-workers, and where each flow run starts: the shared checkout, same
# path everywhere; prefect.yaml's pull step resolves it there, not at `deployments`),
# BBAM_GPU_LIMIT (pools: GPUs in the cluster, default 8), BBAM_GPUS (process-workers:
# GPU indices, default: all of `nvidia-smi -L`), PREFECT (the prefect CLI, default `prefect`).
set -euo pipefail
cd "$(dirname "$0")/.."

PREFECT=${PREFECT:-prefect}
PROCESS_POOL=bbam-process   # the names prefect.yaml's deployments use
GPU_POOL=bbam-gpu
TEMPLATE=deploy/k8s-gpu-job-template.json

need() {
    for name in "$@"; do
        if [ -z "${!name:-}" ]; then
            echo "deploy.sh: set $name (see docs/scale_out.md)" >&2
            exit 2
        fi
    done
}

case "${1:-}" in
image)
    need BBAM_IMAGE
    docker build -t "$BBAM_IMAGE" .
    docker push "$BBAM_IMAGE"
    ;;
pools)
    need PREFECT_API_URL
    "$PREFECT" work-pool create "$PROCESS_POOL" --type process --overwrite
    # The Kubernetes pool type needs prefect-kubernetes where this runs.
    "$PREFECT" work-pool create "$GPU_POOL" --type kubernetes \
        --base-job-template "$TEMPLATE" --overwrite
    limit=${BBAM_GPU_LIMIT:-8}
    if "$PREFECT" gcl inspect gpu >/dev/null 2>&1; then
        "$PREFECT" gcl update gpu --limit "$limit"
    else
        "$PREFECT" gcl create gpu --limit "$limit"
    fi
    ;;
deployments)
    need PREFECT_API_URL BBAM_IMAGE
    shift
    [ $# -gt 0 ] || set -- --all   # or e.g. `--name attribute-shard-gpu`
    log=$(mktemp)
    trap 'rm -f "$log"' EXIT
    # Prefect 3.8.8 creates each deployment, then exits 1 listing the pool's workers
    # (`422 ... /work_pools/<pool>/workers/filter`): that closing hint alone is tolerated.
    if ! "$PREFECT" deploy --no-prompt "$@" 2>&1 | tee "$log"; then
        if grep -q "workers/filter" "$log" && grep -q "422" "$log"; then
            echo "deploy.sh: ignoring prefect 3.8.8's workers/filter 422 after creating the deployments"
        else
            exit 1
        fi
    fi
    # (`prefect deployment ls` fails the same way in 3.8.8; inspect one by name instead.)
    echo "deploy.sh: check with: $PREFECT deployment inspect attribute-shard/attribute-shard-gpu"
    ;;
process-workers)
    need PREFECT_API_URL BBAM_CHECKOUT
    gpus=${BBAM_GPUS:-$(nvidia-smi -L | awk '{sub(":", "", $2); print $2}' | paste -sd' ')}
    pids=()
    for gpu in $gpus; do
        CUDA_VISIBLE_DEVICES=$gpu "$PREFECT" worker start --pool "$PROCESS_POOL" \
            --name "$(hostname)-gpu$gpu" --limit 1 &
        pids+=($!)
    done
    trap 'kill "${pids[@]}" 2>/dev/null' INT TERM
    wait
    ;;
k8s-worker)
    need PREFECT_API_URL
    exec "$PREFECT" worker start --pool "$GPU_POOL" --type kubernetes
    ;;
*)
    sed -n '2,16p' "$0" >&2
    exit 2
    ;;
esac
