# The body every training job script in slurm/ shares (sourced after its #SBATCH lines; Python logic lives in
# trainer.stages). `flowdcn_train [runner args]` starts the ranks with srun, keeps the batch shell free to handle
# signals, and requeues the job after the ranks have saved a checkpoint:
#
#   USR1 to the batch shell (#SBATCH --signal=B:USR1@<lead>, or `scancel --signal=USR1 --batch <job>`)
#     -> SIGTERM to every process of the job steps (scancel without --batch): torchrun forwards it to its
#        workers (it does not handle USR1, and NCCL uses USR1 itself, so the ranks never see USR1)
#     -> each rank sets a flag; at the next step boundary all ranks agree, save a complete checkpoint, exit 3
#     -> once srun has returned, `scontrol requeue` (it kills the job at once, so only after the save)
#     -> the requeued job runs the same command and trainer.stages resumes from the newest complete checkpoint.
#   SIGTERM to the batch shell (scancel, or Slurm's own preemption): the ranks save and stop; no requeue here
#     (a cancelled job stays cancelled; PreemptMode=REQUEUE requeues by itself). Give KillWait/GraceTime >= one
#     step + one save.
cd "${FLOWDCN_HOME:-${SLURM_SUBMIT_DIR:-.}}" || exit 1
source slurm/env.sh

_flowdcn_log() { echo "[$(date +%T)] [slurm ${SLURM_JOB_ID:-?}] $*"; }

_flowdcn_on_usr1() {
  _FLOWDCN_REQUEUE=1
  _flowdcn_log "USR1: time limit or preemption notice; asking the ranks to checkpoint and stop (SIGTERM to the job steps)"
  scancel --signal=TERM "$SLURM_JOB_ID" || _flowdcn_log "scancel --signal=TERM failed (rc $?)"
}

_flowdcn_on_term() {
  _FLOWDCN_TERM=1
  _flowdcn_log "SIGTERM: the ranks checkpoint and stop"
}

# flowdcn_train ARGS...: run `python -m trainer.stages run ARGS...` on every rank of the allocation.
flowdcn_train() {
  local logdir="$FLOWDCN_LOGS/${SLURM_JOB_NAME:-job}-${SLURM_JOB_ID:-0}" rc=0 ntasks per_task
  mkdir -p "$logdir"
  _FLOWDCN_REQUEUE=0 _FLOWDCN_TERM=0
  trap _flowdcn_on_usr1 USR1
  trap _flowdcn_on_term TERM
  _flowdcn_log "restart ${SLURM_RESTART_COUNT:-0}: ${SLURM_NNODES:-1} node(s) x $NPROC_PER_NODE rank(s), launcher $FLOWDCN_LAUNCHER," \
               "rendezvous $MASTER_ADDR:$MASTER_PORT, per-rank logs in $logdir; args: $*"
  export FLOWDCN_JOB_LOGDIR=$logdir
  if [ "$FLOWDCN_LAUNCHER" = torchrun ]; then
    # one task per node; torchrun spawns NPROC_PER_NODE ranks and tees each rank's output into $logdir
    srun --ntasks="${SLURM_NNODES:-1}" --ntasks-per-node=1 --kill-on-bad-exit=1 \
      ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK} \
      bash slurm/task.sh "$@" &
  elif [ "$FLOWDCN_LAUNCHER" = srun ]; then
    # one task per rank (lingua style): RANK/LOCAL_RANK/WORLD_SIZE from SLURM_PROCID/LOCALID/NTASKS
    ntasks=$(( ${SLURM_NNODES:-1} * NPROC_PER_NODE ))
    per_task=$(( ${SLURM_CPUS_ON_NODE:-$NPROC_PER_NODE} / NPROC_PER_NODE )); [ "$per_task" -ge 1 ] || per_task=1
    srun --ntasks="$ntasks" --ntasks-per-node="$NPROC_PER_NODE" --cpus-per-task="$per_task" --kill-on-bad-exit=1 \
      bash slurm/task.sh "$@" &
  else
    _flowdcn_log "unknown FLOWDCN_LAUNCHER=$FLOWDCN_LAUNCHER (torchrun | srun)"; return 2
  fi
  local pid=$!
  # bash runs a trap only between commands: `wait` returns early (status > 128) when a signal arrives, so wait
  # again until srun itself has ended (that is when every rank has saved and exited).
  while :; do
    wait "$pid"; rc=$?
    if ! kill -0 "$pid" 2>/dev/null; then
      wait "$pid" 2>/dev/null; local last=$?
      [ "$last" != 127 ] && rc=$last
      break
    fi
  done
  trap '' USR1          # a late notice must not kill the shell before it requeues or exits
  trap - TERM
  _flowdcn_log "srun finished with exit code $rc$( [ "$_FLOWDCN_REQUEUE" = 1 ] && [ "$FLOWDCN_LAUNCHER" = torchrun ] &&
    echo " (torchrun reports the SIGTERM it was sent as a failure, with a traceback: expected here)")"
  if [ "$rc" = 0 ]; then
    return 0
  fi
  if [ "$_FLOWDCN_REQUEUE" = 1 ] || { [ "$rc" = 3 ] && [ "$_FLOWDCN_TERM" = 0 ]; }; then
    _flowdcn_log "checkpoint saved; requeueing job $SLURM_JOB_ID (it resumes from the newest complete checkpoint)"
    if scontrol requeue "$SLURM_JOB_ID"; then
      # Slurm now kills this run; never end it ourselves first (a job that exits 0 would satisfy afterok)
      sleep 600 & wait $!
    fi
    _flowdcn_log "scontrol requeue failed (is the job --no-requeue?); re-submit the same command to resume"
    return 3
  fi
  return "$rc"
}
