#!/bin/bash
# Evaluate a finished stage: resolves the stage's final checkpoint (its DONE.json) and runs slurm/eval_fid.sh on it.
# Submitted by slurm/pipeline.sh after each stage when EVAL_ARGS is set; by hand:
#   EVAL_ARGS="vae=... reference.npz=..." sbatch slurm/eval_stage.sh finetune_512 root=/shared/runs/flowdcn_xl2
# Arguments: the stage, then the pipeline's trainer.stages arguments (root=, pipeline=, overrides).
#SBATCH --job-name=eval-stage
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@180
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
cd "${FLOWDCN_HOME:-${SLURM_SUBMIT_DIR:-.}}" || exit 1
source slurm/env.sh
stage=$1; shift
ckpt=$(python -m trainer.stages final only="$stage" "$@") || exit 1
echo "[$(date +%T)] [slurm ${SLURM_JOB_ID:-?}] evaluating $stage: $ckpt"
# shellcheck disable=SC2086  # EVAL_ARGS is a space-separated list of Hydra overrides
exec bash slurm/eval_fid.sh model.ckpt="$ckpt" ${EVAL_ARGS:-}
