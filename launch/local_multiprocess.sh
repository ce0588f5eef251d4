#!/usr/bin/env bash
# Run N local processes that form one JAX job over CPU collectives (a multi-host rehearsal).
#   launch/local_multiprocess.sh 2 --config=configs/cm_gems.py --workdir=runs/mp
set -euo pipefail
n=${1:?number of processes}; shift
port=${GEMSJAX_COORDINATOR_PORT:-12355}
pids=()
for ((i = 0; i < n; i++)); do
  GEMSJAX_DISTRIBUTED=1 GEMSJAX_COORDINATOR="localhost:$port" GEMSJAX_NUM_PROCESSES=$n \
    GEMSJAX_PROCESS_ID=$i JAX_PLATFORMS=cpu python -m gemsjax.main "$@" &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit $status
