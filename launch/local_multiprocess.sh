#!/usr/bin/env bash
# Several JAX processes on this one machine, talking over localhost (CPU collectives via gloo):
# the same code path as a multi-host pod, for trying it out without one.
#
#   launch/local_multiprocess.sh 2 --config=configs/lra_listops.py:smoke --workdir=/tmp/mp_run
set -euo pipefail
n=${1:?number of processes}
shift
port=${EFFJAX_PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < n; i++)); do
  python -m effjax.main --coordinator_address="localhost:$port" --num_processes="$n" --process_id="$i" \
    --cpu_devices="${EFFJAX_CPU_DEVICES:-2}" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
