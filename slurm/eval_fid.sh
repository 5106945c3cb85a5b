#!/bin/bash
# FID / sFID / IS / precision / recall of a checkpoint: distributed sampling with `python -m evaluation.run`.
#
#   sbatch slurm/eval_fid.sh model.ckpt=runs/xl/checkpoints/nimg_000102400000 vae=/data/sd-vae-ft-ema \
#       metrics.inception_weights=/data/pt_inception-2015-12-05-6726825d.pth \
#       reference.npz=/data/VIRTUAL_imagenet256_labeled.npz sampling=sde250 sampling.cfg_scale=1.5 \
#       'resolutions=[[256,256],[320,320],[224,448],[160,480]]' sampling.smax_policy=official
#
# Every argument is a Hydra override of configs/eval/fid50k.yaml. The job is resumable: finished
# chunks are files under <out_dir>/<run_name>/<H>x<W>/chunks, so a requeued (or re-submitted) job
# with the same arguments only generates what is missing, and the numbers do not depend on the
# number of GPUs or nodes. out_dir must be on a filesystem shared by all nodes.
#SBATCH --job-name=eval-fid
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@180
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_PER_NODE:-8}}
GPUS_PER_NODE=${GPUS_PER_NODE##*:}          # "h100:8" -> "8"
HEAD_NODE=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | head -n 1)
export MASTER_ADDR=${MASTER_ADDR:-$HEAD_NODE} MASTER_PORT=${MASTER_PORT:-29517}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export WANDB_MODE=${WANDB_MODE:-offline} HF_HUB_OFFLINE=1 TORCH_NCCL_ASYNC_ERROR_HANDLING=1
[ -f slurm/env.sh ] && source slurm/env.sh   # site-specific modules / venv, if the cluster needs them

# Near the time limit Slurm sends USR1: requeue; the rerun resumes from the finished chunks.
trap 'echo "[eval_fid] time limit near: requeueing ${SLURM_JOB_ID}"; scontrol requeue "${SLURM_JOB_ID}"' USR1

srun --kill-on-bad-exit=1 torchrun \
  --nnodes "${SLURM_NNODES:-1}" --nproc_per_node "$GPUS_PER_NODE" \
  --rdzv_id "${SLURM_JOB_ID:-0}" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" \
  -m evaluation.run "$@" &
wait $!   # wait in the background so the USR1 trap can run while torchrun works
