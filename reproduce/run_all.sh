#!/usr/bin/env bash
# The whole study, arm by arm, in the background; rerun to resume (finished commands are skipped).
#   reproduce/run_all.sh [cpu|paper]      -> log appended to runs/study/<scale>.log
set -euo pipefail
cd "$(dirname "$0")/.."
scale="${1:-cpu}"
mkdir -p runs/study
nohup nice sh -c "python reproduce/study.py cmgems --scale=$scale && \
  python reproduce/study.py barcode --scale=$scale" >> "runs/study/$scale.log" 2>&1 &
echo "study ($scale) started as pid $!; log: runs/study/$scale.log"
