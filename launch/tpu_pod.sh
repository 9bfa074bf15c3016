#!/usr/bin/env bash
# Runs effjax on every worker of a Cloud TPU VM pod slice at once.
#
#   launch/tpu_pod.sh TPU_NAME ZONE [PROJECT] -- --config=configs/lra_listops.py --workdir=/mnt/shared/run1
#
# Copies the repo to each worker (scp --worker=all), installs it with the TPU extra and the pinned
# constraints, then starts effjax.main with --distributed on all workers: jax.distributed.initialize()
# finds the coordinator and each worker's process id from the TPU metadata itself.
# The workdir must be a path every worker sees (NFS, Filestore, or a bucket mounted with gcsfuse).
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 TPU_NAME ZONE [PROJECT] -- effjax.main flags" >&2
  exit 2
fi
tpu=$1 zone=$2
shift 2
project_flag=()
if [[ $1 != "--" ]]; then project_flag=(--project="$1"); shift; fi
[[ ${1:-} == "--" ]] && shift
repo=$(cd "$(dirname "$0")/.." && pwd)
gcloud_ssh=(gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" "${project_flag[@]}" --worker=all)

tar -C "$repo" --exclude=.venv --exclude=.git -czf /tmp/effjax.tgz .
gcloud compute tpus tpu-vm scp /tmp/effjax.tgz "$tpu":/tmp/effjax.tgz --zone="$zone" "${project_flag[@]}" --worker=all
"${gcloud_ssh[@]}" --command="mkdir -p ~/effjax && tar -C ~/effjax -xzf /tmp/effjax.tgz && cd ~/effjax && \
  python3 -m venv .venv && . .venv/bin/activate && pip install -q -c constraints.txt -e '.[tpu]'"
# printf %q keeps the user's flags intact through the remote shell.
"${gcloud_ssh[@]}" --command="cd ~/effjax && . .venv/bin/activate && \
  python -m effjax.main --distributed $(printf '%q ' "$@") 2>&1 | tee -a ~/effjax_run.log"
