#!/usr/bin/env bash
# Run gemsjax on a Cloud TPU VM slice: create, copy, run on every worker, tear down.
#
#   launch/tpu_vm.sh create   NAME ZONE ACCELERATOR [--spot]     e.g. v5litepod-16
#   launch/tpu_vm.sh copy     NAME ZONE                          copies this checkout to every worker
#   launch/tpu_vm.sh run      NAME ZONE -- ARGS...               python -m gemsjax.main ARGS on all workers
#   launch/tpu_vm.sh kill     NAME ZONE                          kills stale python processes holding the TPU
#   launch/tpu_vm.sh delete   NAME ZONE
#
# Every host runs the same command (`--worker=all`); running on one worker only deadlocks
# jax.distributed.initialize(). GEMSJAX_DISTRIBUTED=1 makes gemsjax call it.
set -euo pipefail
cmd=${1:?usage: tpu_vm.sh create|copy|run|kill|delete NAME ZONE ...}; name=${2:?NAME}; zone=${3:?ZONE}
shift 3
runtime_for() {
  case "$1" in
    v6e*) echo v2-alpha-tpuv6e ;;
    v5p*) echo v2-alpha-tpuv5 ;;
    v5litepod*|v5e*) echo v2-alpha-tpuv5-lite ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}
ssh_all() { gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "$1"; }
case "$cmd" in
  create)
    accel=${1:?ACCELERATOR, e.g. v5litepod-16}; shift
    gcloud compute tpus tpu-vm create "$name" --zone "$zone" --accelerator-type "$accel" \
      --version "$(runtime_for "$accel")" "$@" ;;
  copy)
    root=$(cd "$(dirname "$0")/.." && pwd)
    ssh_all "mkdir -p ~/gemsjax"
    gcloud compute tpus tpu-vm scp --recurse "$root"/{gemsjax,configs,launch,pyproject.toml,README.md,LICENSE} \
      "$name":~/gemsjax/ --zone "$zone" --worker=all ;;
  run)
    [ "${1:-}" = "--" ] && shift
    args=$(printf ' %q' "$@")
    ssh_all "cd ~/gemsjax && (test -d .venv || python3 -m venv .venv) && . .venv/bin/activate \
      && pip install -q -e '.[tpu]' && GEMSJAX_DISTRIBUTED=1 \
      JAX_COMPILATION_CACHE_DIR=\$HOME/.cache/gemsjax-xla python -m gemsjax.main$args" ;;
  kill)
    ssh_all "pkill -f 'gemsjax.main' || true; sudo lsof -t /dev/accel* 2>/dev/null | xargs -r sudo kill -9 || true" ;;
  delete)
    gcloud compute tpus tpu-vm delete "$name" --zone "$zone" --quiet ;;
  *) echo "unknown command $cmd" >&2; exit 2 ;;
esac
