#!/usr/bin/env bash
# Slurm batch script for GPU nodes: one task per node, all GPUs of a node in that task.
#   sbatch --nodes=2 --gpus-per-node=8 launch/gpu_slurm.sh --config=configs/cm_gems.py:paper --workdir=runs/x
#SBATCH --ntasks-per-node=1
#SBATCH --job-name=gemsjax
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
export GEMSJAX_DISTRIBUTED=1   # jax.distributed.initialize() reads the Slurm environment
srun python -m gemsjax.main "$@"
