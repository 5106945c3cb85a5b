#!/bin/bash
# One srun task of a training job (started by slurm/common.sh, not by hand): torchrun for this node
# (FLOWDCN_LAUNCHER=torchrun) or this one rank (FLOWDCN_LAUNCHER=srun). Arguments go to `trainer.stages run`.
if [ "$FLOWDCN_LAUNCHER" = torchrun ]; then
  # c10d rendezvous on the first node; per-rank stdout/stderr under $FLOWDCN_JOB_LOGDIR/restart<k>/node<n>/,
  # local rank 0 also on the console. --shutdown-timeout: how long a SIGTERM'd rank may take to save.
  exec torchrun --nnodes "${SLURM_NNODES:-1}" --nproc_per_node "$NPROC_PER_NODE" \
    --rdzv_id "${SLURM_JOB_ID:-0}" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" \
    --max-restarts 0 --shutdown-timeout "$SHUTDOWN_TIMEOUT" \
    --log-dir "$FLOWDCN_JOB_LOGDIR/restart${SLURM_RESTART_COUNT:-0}/node${SLURM_NODEID:-0}" --tee 3 \
    --local-ranks-filter 0 \
    -m trainer.stages run "$@"
fi
export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS LOCAL_WORLD_SIZE=$NPROC_PER_NODE
# each rank's output in $FLOWDCN_JOB_LOGDIR/rank<r>.log (appended across restarts); rank 0 also in the job log
log="$FLOWDCN_JOB_LOGDIR/rank$SLURM_PROCID.log"
if [ "$SLURM_PROCID" = 0 ]; then
  # tee ignores SIGTERM: the step's SIGTERM must not close the pipe while rank 0 is still writing its checkpoint
  exec python -u -m trainer.stages run "$@" > >(trap '' TERM INT; exec tee -a "$log") 2>&1
fi
exec python -u -m trainer.stages run "$@" >>"$log" 2>&1
