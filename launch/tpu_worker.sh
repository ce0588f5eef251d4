#!/usr/bin/env bash
# The worker side of launch/tpu_vm.sh: runs on each TPU VM worker, inside the copied checkout.
#
#   launch/tpu_worker.sh setup                 Python 3.11 (uv-managed) + .venv + '.[tpu,gcs]'; skipped
#                                              while pyproject.toml is unchanged since the last setup
#   launch/tpu_worker.sh start ARGS...         python -m gemsjax.main ARGS, detached (own session,
#                                              survives the SSH connection), appending to the log
#   launch/tpu_worker.sh status                running / exited rc / not started, and the last log line
#   launch/tpu_worker.sh logs [LINES]          the log's last LINES lines (default 50)
#   launch/tpu_worker.sh stop [GRACE_SECONDS]  SIGTERM to this run only (gemsjax saves a checkpoint and
#                                              exits), SIGKILL to its process group after GRACE (120 s)
#
# State lives in logs/ of the checkout ($GEMSJAX_LOG_DIR when set): gemsjax-<host>.log, run.pid
# (the run's process group), run.rc (its exit status). Only that process group is ever signalled.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
logs=${GEMSJAX_LOG_DIR:-$root/logs}
host=$(hostname)
log=$logs/gemsjax-$host.log
pidfile=$logs/run.pid
rcfile=$logs/run.rc
python=${GEMSJAX_PYTHON:-$root/.venv/bin/python}
export PATH=$HOME/.local/bin:$PATH

running_pid() {  # the run's pid (= its process group) when it is alive, else nothing
  local pid
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then echo "$pid"; fi
}

cmd=${1:?usage: tpu_worker.sh setup|start|status|logs|stop ...}
shift
case "$cmd" in
  setup)
    stamp=$root/.venv/gemsjax-pyproject.sha256
    want=$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
      echo "$host: already set up ($("$root/.venv/bin/python" --version))"; exit 0
    fi
    # The images' python3 is 3.10 (Ubuntu 22.04); the pins need 3.11, so uv brings its own.
    command -v uv >/dev/null || python3 -m pip install -q --user uv \
      || curl -LsSf https://astral.sh/uv/install.sh | sh
    uv python install 3.11
    uv venv --allow-existing --python 3.11 "$root/.venv"
    uv pip install -q --python "$root/.venv/bin/python" -e "${root}[tpu,gcs]"
    echo "$want" > "$stamp"
    echo "$host: set up ($("$root/.venv/bin/python" --version))" ;;
  start)
    pid=$(running_pid)
    if [ -n "$pid" ]; then
      echo "$host: a run is already going (pid $pid); launch/tpu_vm.sh kill stops it" >&2; exit 1
    fi
    mkdir -p "$logs"
    rm -f "$rcfile"
    printf '=== %s start: python -m gemsjax.main%s\n' "$(date -u +%FT%TZ)" "$(printf ' %q' "$@")" >> "$log"
    # setsid: a new session and process group, so a dropped SSH sends no SIGHUP and `stop`
    # can signal exactly this group. _supervise records the group and the exit status.
    cd "$root"
    setsid nohup bash "$root/launch/tpu_worker.sh" _supervise "$@" >> "$log" 2>&1 < /dev/null &
    for _ in $(seq 50); do [ -n "$(running_pid)" ] && break; sleep 0.1; done
    echo "$host: started (pid $(running_pid)), log $log" ;;
  _supervise)
    echo $$ > "$pidfile"
    export PYTHONUNBUFFERED=1  # the log follows the run line by line
    "$python" -m gemsjax.main "$@" &
    child=$!
    trap 'kill -TERM "$child" 2>/dev/null' TERM
    rc=0
    wait "$child" || rc=$?
    if kill -0 "$child" 2>/dev/null; then rc=0; wait "$child" || rc=$?; fi  # woken by the trap
    echo "$rc" > "$rcfile"
    printf '=== %s exit %s\n' "$(date -u +%FT%TZ)" "$rc" ;;
  status)
    pid=$(running_pid)
    last=$( [ -f "$log" ] && tail -n 1 "$log" || true)
    if [ -n "$pid" ]; then echo "$host: running (pid $pid) | $last"
    elif [ -f "$rcfile" ]; then echo "$host: exited $(cat "$rcfile") | $last"
    elif [ -f "$log" ]; then echo "$host: not running (killed without an exit status) | $last"
    else echo "$host: not started"; fi ;;
  logs)
    lines=${1:-50}
    if [ -f "$log" ]; then tail -n "$lines" "$log" | sed "s/^/[$host] /"
    else echo "[$host] no log yet ($log)"; fi ;;
  stop)
    grace=${1:-120}
    pid=$(running_pid)
    if [ -z "$pid" ]; then echo "$host: nothing running"; exit 0; fi
    kill -TERM "$pid"
    for _ in $(seq "$grace"); do [ -z "$(running_pid)" ] && break; sleep 1; done
    if [ -n "$(running_pid)" ]; then
      kill -KILL -- "-$pid" 2>/dev/null || true
      echo "$host: killed process group $pid after ${grace}s"
    else
      echo "$host: stopped (exit $(cat "$rcfile" 2>/dev/null || echo '?'))"
    fi ;;
  *) echo "tpu_worker.sh: unknown command $cmd" >&2; exit 2 ;;
esac
