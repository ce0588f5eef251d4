#!/usr/bin/env bash
# Run gemsjax on a Cloud TPU VM slice from your machine (gcloud); README "Running on a TPU pod".
#
#   launch/tpu_vm.sh [--dry-run] COMMAND NAME ZONE [ARGS...]
#
#   create NAME ZONE ACCELERATOR [FLAGS]  e.g. v5p-64 --spot; the runtime image follows the chip
#   copy   NAME ZONE              this checkout's code -> ~/gemsjax on every worker
#   setup  NAME ZONE              on every worker: Python 3.11 (uv), ~/gemsjax/.venv, '.[tpu,gcs]';
#                                 done once, redone only when pyproject.toml changed
#   data   NAME ZONE SOURCE...    -> ~/gemsjax-data/ on every worker's local disk: local files are
#                                 copied from here (scp), gs:// objects are fetched by each worker
#   run    NAME ZONE -- ARGS...   python -m gemsjax.main ARGS on every worker, detached (survives a
#                                 dropped SSH), one log per worker in ~/gemsjax/logs/
#   status NAME ZONE              running / exited rc on each worker, with its last log line
#   logs   NAME ZONE [LINES]      the last LINES (50) log lines of each worker, prefixed by host
#   kill   NAME ZONE [GRACE]      stops this launcher's run only: SIGTERM (gemsjax saves and exits),
#                                 SIGKILL to its process group after GRACE seconds (120)
#   delete NAME ZONE
#
# --dry-run prints each gcloud command instead of running it. Every host runs the same program
# (`--worker=all`): running on one worker only deadlocks jax.distributed.initialize();
# GEMSJAX_DISTRIBUTED=1 makes gemsjax call it. The worker side is launch/tpu_worker.sh.
set -euo pipefail
dry_run=0
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; shift; fi
usage="usage: tpu_vm.sh [--dry-run] create|copy|setup|data|run|status|logs|kill|delete NAME ZONE ..."
cmd=${1:?$usage}; name=${2:?$usage}; zone=${3:?$usage}
shift 3
need_count() {  # $1 goes into a remote command line: a whole number only
  [[ $1 =~ ^[0-9]+$ ]] || { echo "tpu_vm.sh $cmd: expected a number, got '$1'" >&2; exit 2; }
}
worker="bash gemsjax/launch/tpu_worker.sh"  # remote commands start in the worker's home folder

quote() {  # a word as a shell would read it back: bare when safe, else single-quoted
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
gc() {  # gcloud ARGS, or print it under --dry-run
  if [ "$dry_run" = 1 ]; then
    local line="gcloud" arg
    for arg in "$@"; do line+=" $(quote "$arg")"; done
    echo "$line"
  else
    gcloud "$@"
  fi
}
ssh_all() { gc compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "$1"; }
scp_all() { gc compute tpus tpu-vm scp --recurse "$@" --zone "$zone" --worker=all; }
runtime_for() {
  case "$1" in
    v6e*) echo v2-alpha-tpuv6e ;;
    v5p*) echo v2-alpha-tpuv5 ;;
    v5litepod*|v5e*) echo v2-alpha-tpuv5-lite ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}

case "$cmd" in
  create)
    accel=${1:?ACCELERATOR, e.g. v5p-64}; shift
    gc compute tpus tpu-vm create "$name" --zone "$zone" --accelerator-type "$accel" \
      --version "$(runtime_for "$accel")" "$@" ;;
  copy)
    root=$(cd "$(dirname "$0")/.." && pwd)
    ssh_all "mkdir -p gemsjax"
    scp_all "$root"/{gemsjax,configs,launch,pyproject.toml,README.md,LICENSE} "$name:gemsjax/" ;;
  setup)
    ssh_all "$worker setup" ;;
  data)
    [ $# -gt 0 ] || { echo "data: name local files or gs:// objects to copy" >&2; exit 2; }
    local_files=() bucket_objects=()
    for src in "$@"; do
      if [[ $src == gs://* ]]; then bucket_objects+=("$src"); else local_files+=("$src"); fi
    done
    if [ ${#bucket_objects[@]} -gt 0 ]; then
      ssh_all "mkdir -p gemsjax-data && gcloud storage cp -r$(printf ' %q' "${bucket_objects[@]}") gemsjax-data/"
    fi
    if [ ${#local_files[@]} -gt 0 ]; then
      ssh_all "mkdir -p gemsjax-data"
      scp_all "${local_files[@]}" "$name:gemsjax-data/"
    fi ;;
  run)
    [ "${1:-}" = "--" ] && shift
    ssh_all "GEMSJAX_DISTRIBUTED=1 JAX_COMPILATION_CACHE_DIR=\$HOME/.cache/gemsjax-xla $worker start$(printf ' %q' "$@")" ;;
  status)
    ssh_all "$worker status" ;;
  logs)
    lines=${1:-50}; need_count "$lines"; ssh_all "$worker logs $lines" ;;
  kill)
    grace=${1:-120}; need_count "$grace"; ssh_all "$worker stop $grace" ;;
  delete)
    gc compute tpus tpu-vm delete "$name" --zone "$zone" --quiet ;;
  *) echo "tpu_vm.sh: unknown command $cmd; $usage" >&2; exit 2 ;;
esac
