#!/bin/bash
# Stage 1: 256 px pretraining (configs/stage/pretrain_256.yaml: FlowDCN-XL/2, global batch 256, FSDP, bf16).
#
#   mkdir -p logs && sbatch slurm/pretrain_256.sh root=/shared/runs/flowdcn_xl2 [hydra overrides...]
#
# Arguments go to `python -m trainer.stages run only=pretrain_256 ...` on every rank (see trainer/stages.py): root= is the
# pipeline's run root (this stage trains in <root>/pretrain_256), anything else is a train override of this stage, e.g.
# train.global_batch=512 strategy=zero2, or experiment=tiny for a CPU smoke run. Re-submitting the same command
# resumes; a finished stage exits at once. Sizing: --nodes, --gpus-per-node (and NPROC_PER_NODE for CPU runs);
# the global batch stays train.global_batch whatever the GPU count. Set site specifics in slurm/env.sh.
#SBATCH --job-name=pretrain_256
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1          # torchrun launcher: one task per node (FLOWDCN_LAUNCHER=srun splits it per GPU)
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@600          # 10 min before the limit: checkpoint, then requeue (slurm/common.sh)
#SBATCH --requeue
#SBATCH --open-mode=append           # a requeued run appends to the log instead of truncating it
#SBATCH --output=logs/%x-%j.out

source "${FLOWDCN_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
flowdcn_train only=pretrain_256 "$@"
