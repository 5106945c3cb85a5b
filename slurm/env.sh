# Shared environment of every job script in slurm/ (sourced inside a job, not run; not on the login node, where the
# job settings below would be computed for the wrong machine and exported into the jobs by sbatch). Edit this file for your site, or put the
# site part in slurm/site.sh (sourced at the end, not tracked by git), and keep the job scripts untouched.
#
# Variables (all overridable from the submitting shell: sbatch exports its environment by default):
#   FLOWDCN_HOME     repository checkout the jobs run in          (default: the directory sbatch was called from)
#   FLOWDCN_VENV     virtual environment to activate               (default: $FLOWDCN_HOME/.venv if it exists)
#   FLOWDCN_LOGS     job logs: <logs>/<job name>-<job id>/...      (default: $FLOWDCN_HOME/logs)
#   NPROC_PER_NODE   processes per node (one per GPU)              (default: the job's GPUs per node, else 1)
#   MASTER_PORT      c10d rendezvous port on the first node        (default: 20000 + job id mod 20000)
#   FLOWDCN_LAUNCHER torchrun (one srun task per node, torchrun spawns the ranks, c10d rendezvous)
#                    | srun (one srun task per rank; RANK/LOCAL_RANK/WORLD_SIZE from SLURM_*)   (default: torchrun)
#   SHUTDOWN_TIMEOUT seconds torchrun lets ranks finish a checkpoint after SIGTERM before SIGKILL (default 480:
#                    below the stage scripts' 600 s --signal lead, so the requeue still happens before the limit)
#   OMP_NUM_THREADS  CPU threads per rank                          (default: cpus per task / ranks per node)
export FLOWDCN_HOME=${FLOWDCN_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
export FLOWDCN_LOGS=${FLOWDCN_LOGS:-$FLOWDCN_HOME/logs}
export FLOWDCN_LAUNCHER=${FLOWDCN_LAUNCHER:-torchrun}
export SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-480}

_gpus=${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
_gpus=${_gpus##*:}                                   # "h100:8" -> "8"
[ -z "$_gpus" ] || [ "$_gpus" = 0 ] && _gpus=1        # CPU jobs: one rank per node unless NPROC_PER_NODE says so
export NPROC_PER_NODE=${NPROC_PER_NODE:-$_gpus}
unset _gpus

export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n 1)}
export MASTER_ADDR=${MASTER_ADDR:-localhost}
export MASTER_PORT=${MASTER_PORT:-$(( 20000 + ${SLURM_JOB_ID:-0} % 20000 ))}
if [ -z "${OMP_NUM_THREADS:-}" ]; then
  export OMP_NUM_THREADS=$(( ${SLURM_CPUS_PER_TASK:-$NPROC_PER_NODE} / NPROC_PER_NODE ))
  [ "$OMP_NUM_THREADS" -ge 1 ] || export OMP_NUM_THREADS=1
fi

# Offline by default: nothing is downloaded at run time; wandb syncs later (`wandb sync`).
export WANDB_MODE=${WANDB_MODE:-offline} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} PYTHONUNBUFFERED=1
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# NCCL_SOCKET_IFNAME / NCCL_IB_HCA / NCCL_DEBUG are site specific: set them in slurm/site.sh.
command -v nvidia-smi >/dev/null 2>&1 || export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}

if [ -n "${FLOWDCN_VENV:-}" ]; then
  source "$FLOWDCN_VENV/bin/activate"
elif [ -f "$FLOWDCN_HOME/.venv/bin/activate" ]; then
  source "$FLOWDCN_HOME/.venv/bin/activate"
fi
[ -f "$FLOWDCN_HOME/slurm/site.sh" ] && source "$FLOWDCN_HOME/slurm/site.sh"
true
