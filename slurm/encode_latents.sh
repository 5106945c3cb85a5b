#!/bin/bash
# Encode images to VAE latent shards with `python -m data_pipeline.encode`, split over GPUs and array tasks.
#
#   sbatch --array=0-7 slurm/encode_latents.sh --input /data/imagenet/train --out /data/latents/in256 \
#       --vae /models/sd-vae-ft-ema --preprocess center_crop --resolution 256 --format wds
#
# Arguments go to data_pipeline.encode unchanged (see its --help); they come after the script's own
# `--device cuda --workers 6`, so e.g. `--device cpu` or `--workers 16` given here win. Work units are split over
# (array task, rank); finished units are recorded under <out>/_progress, so re-submitting the same
# command (or a requeue) only encodes what is missing. The task that finds every unit done writes
# <out>/manifest.json. Bad images make the job exit 1 with their paths (see --allow-failures).
#SBATCH --job-name=encode-latents
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --output=logs/%x-%A_%a.out
set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_PER_NODE:-8}}
GPUS_PER_NODE=${GPUS_PER_NODE##*:}          # "h100:8" -> "8"
HEAD_NODE=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | head -n 1)
export MASTER_ADDR=${MASTER_ADDR:-$HEAD_NODE} MASTER_PORT=${MASTER_PORT:-$((29600 + ${SLURM_ARRAY_TASK_ID:-0} % 100))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export HF_HUB_OFFLINE=1
[ -f slurm/env.sh ] && source slurm/env.sh   # site-specific modules / venv, if the cluster needs them

# Near the time limit: requeue; finished units are skipped on the rerun.
trap 'echo "[encode_latents] time limit near: requeueing ${SLURM_JOB_ID}"; scontrol requeue "${SLURM_JOB_ID}"' USR1

# Array geometry goes in explicitly (SLURM_ARRAY_TASK_* are also read by the script as defaults).
srun --kill-on-bad-exit=1 torchrun \
  --nnodes "${SLURM_NNODES:-1}" --nproc_per_node "$GPUS_PER_NODE" \
  --rdzv_id "${SLURM_JOB_ID:-0}" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" \
  -m data_pipeline.encode --device cuda --workers 6 \
  --num-tasks "${SLURM_ARRAY_TASK_COUNT:-1}" --task-id "$(( ${SLURM_ARRAY_TASK_ID:-0} - ${SLURM_ARRAY_TASK_MIN:-0} ))" \
  "$@" &
wait $!   # wait in the background so the USR1 trap can run
