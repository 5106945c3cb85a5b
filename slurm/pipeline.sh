#!/bin/bash
# Submit a whole stage pipeline as a chain of Slurm jobs (run it on the login node, not with sbatch):
#
#   bash slurm/pipeline.sh [pipeline=default] root=/shared/runs/flowdcn_xl2 [overrides...]
#
# One job per stage of configs/pipeline/<name>.yaml, each `sbatch slurm/<stage>.sh <the same arguments>` with
# --dependency=afterok on the previous one (and --kill-on-invalid-dep=yes: if a stage fails, the rest is
# cancelled instead of pending forever). A requeued stage keeps its job id, so the chain waits through preemptions.
# Finished stages are skipped by the runner, so re-running this script after a failure continues the pipeline.
# Arguments are trainer.stages arguments (root=, only=, <stage>.<key>=..., train overrides for every stage).
#
# Environment:
#   SBATCH_EXTRA  extra sbatch options for every stage job, e.g. "--nodes=8 --partition=big --account=me"
#   AFTER         a job id the first stage waits for (e.g. the encode_latents job)
#   EVAL_ARGS     if set, an evaluation job (slurm/eval_stage.sh -> slurm/eval_fid.sh) is submitted after each
#                 stage in EVAL_STAGES (default: all), with these evaluation overrides, e.g.
#                 EVAL_ARGS="vae=/models/sd-vae-ft-ema metrics.inception_weights=/models/pt_inception.pth reference.npz=/data/VIRTUAL_imagenet256_labeled.npz"
#   EVAL_SBATCH_EXTRA  extra sbatch options for the evaluation jobs
# Prints one line per job: "<stage> <job id>" (and "eval:<stage> <job id>").
set -euo pipefail
cd "${FLOWDCN_HOME:-$(dirname "$0")/..}"
export FLOWDCN_HOME=$PWD
# not slurm/env.sh: its job settings (ranks per node, rendezvous port, threads) must be computed inside each job,
# and sbatch would export values computed here into the jobs
export FLOWDCN_LOGS=${FLOWDCN_LOGS:-$FLOWDCN_HOME/logs}
mkdir -p "$FLOWDCN_LOGS"
venv=${FLOWDCN_VENV:-$FLOWDCN_HOME/.venv}
py=python3; [ -x "$venv/bin/python" ] && py=$venv/bin/python

stages=$("$py" -m trainer.stages list "$@")
read -r -a extra <<<"${SBATCH_EXTRA:-}"
dep=${AFTER:-}
for stage in $stages; do
  script=slurm/$stage.sh
  [ -f "$script" ] || { echo "pipeline.sh: no job script $script for stage $stage" >&2; exit 1; }
  opts=(--parsable --output="$FLOWDCN_LOGS/%x-%j.out")
  [ -n "$dep" ] && opts+=(--dependency="afterok:$dep" --kill-on-invalid-dep=yes)
  jid=$(sbatch "${opts[@]}" ${extra[@]+"${extra[@]}"} "$script" "$@")
  jid=${jid%%;*}
  echo "$stage $jid"
  if [ -n "${EVAL_ARGS:-}" ] && { [ -z "${EVAL_STAGES:-}" ] || [[ " $EVAL_STAGES " == *" $stage "* ]]; }; then
    read -r -a eval_extra <<<"${EVAL_SBATCH_EXTRA:-}"
    eid=$(sbatch --parsable --output="$FLOWDCN_LOGS/%x-%j.out" --dependency="afterok:$jid" --kill-on-invalid-dep=yes \
      --job-name="eval-$stage" ${eval_extra[@]+"${eval_extra[@]}"} slurm/eval_stage.sh "$stage" "$@")
    echo "eval:$stage ${eid%%;*}"
  fi
  dep=$jid
done
