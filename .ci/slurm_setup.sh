#!/usr/bin/env bash
# slurm_setup.sh [up|down] - a real one-node Slurm cluster on localhost for tests/slurm (CI and local dev).
#
#   up (default): install Debian's slurmctld/slurmd/slurm-client/munge if sbatch is missing (root + apt-get),
#                 write /etc/slurm/slurm.conf and start munged, slurmctld and slurmd without systemd or
#                 cgroups; waits until the node is idle. Idempotent: running daemons are kept unless the
#                 generated config changed.
#   down:         cancel every job, stop exactly the daemons started here (by their pid files).
#
# Recipe and measurements: ../shared/slurm/README.md (Slurm 22.05 on Debian bookworm). The config is tuned for
# tests: requeued jobs restart after ~10 s (AuthInfo=cred_expire=10, sched_interval=2), jobs depending on a failed
# job are cancelled (kill_invalid_depend), and proctrack/pgid kills a job's orphans when it ends.
# Knobs: SLURM_LOCAL_CPUS (default 8: oversubscribe the cores so a few 2-task test jobs can run at once),
#        SLURM_LOCAL_KEEP_STATE=1 (keep old jobs), SLURM_LOCAL_TIMEOUT (30 s), SLURM_LOCAL_PROCTRACK (proctrack/pgid).
set -euo pipefail
export PATH="/usr/sbin:/usr/bin:/sbin:/bin:$PATH"

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid
STATE_DIR=/var/spool/slurmctld
SPOOL_DIR=/var/spool/slurmd
LOG_DIR=/var/log/slurm
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-30}
PROCTRACK=${SLURM_LOCAL_PROCTRACK:-proctrack/pgid}
LOCAL_CPUS=${SLURM_LOCAL_CPUS:-8}

log() { echo "[slurm_setup] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# live PID -> 0 if PID runs and is not a zombie (PID 1 here may reap orphans late, README §4.3)
live() {
  local st
  st=$(sed 's/^.*) //' /proc/"$1"/stat 2>/dev/null | cut -c1) || return 1
  [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

# alive PIDFILE COMM -> 0 if the pid in PIDFILE is a live process named COMM
alive() {
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$2" ] && live "$pid"
}

# stop_pids PIDFILE:COMM... : SIGTERM them together, wait up to 10 s, SIGKILL what is left
stop_pids() {
  local item pf comm pid pids=() pfs=()
  for item in "$@"; do
    pf=${item%%:*}; comm=${item##*:}
    if alive "$pf" "$comm"; then
      pid=$(cat "$pf"); log "stopping $comm (pid $pid)"
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid"); pfs+=("$pf")
    else
      rm -f "$pf"
    fi
  done
  [ ${#pids[@]} = 0 ] && return 0
  for _ in $(seq 200); do
    local any=0
    for pid in "${pids[@]}"; do live "$pid" && any=1; done
    [ $any = 0 ] && break
    sleep 0.05
  done
  for pid in "${pids[@]}"; do live "$pid" && { log "pid $pid alive after 10 s: SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; }; done
  for pf in "${pfs[@]}"; do rm -f "$pf"; done
}

install_slurm() {
  command -v sbatch >/dev/null 2>&1 && command -v slurmctld >/dev/null 2>&1 && command -v munged >/dev/null 2>&1 && return 0
  [ "$(id -u)" -eq 0 ] || die "Slurm is not installed and this is not root: cannot apt-get install it"
  command -v apt-get >/dev/null 2>&1 || die "Slurm is not installed and there is no apt-get"
  log "installing slurmctld slurmd slurm-client munge (Debian packages, ~10 s)"
  apt-get update -qq
  # the minimal set: the slurm-wlm metapackage would pull ~40 unneeded packages
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

start_munge() {
  mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
  if [ ! -s /etc/munge/munge.key ]; then
    log "creating munge key"
    if command -v mungekey >/dev/null 2>&1; then mungekey --create --keyfile=/etc/munge/munge.key
    else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
  fi
  chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
  chmod 0700 /etc/munge /var/log/munge; chmod 0711 /var/lib/munge; chmod 0755 /run/munge
  chmod 0400 /etc/munge/munge.key
  if alive "$MUNGE_PID" munged && munge -n </dev/null | unmunge >/dev/null 2>&1; then
    return 0
  fi
  stop_pids "$MUNGE_PID:munged"
  rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged --pid-file="$MUNGE_PID"
  for _ in $(seq 50); do munge -n </dev/null | unmunge >/dev/null 2>&1 && return 0; sleep 0.1; done
  die "munged does not answer; see /var/log/munge/munged.log"
}

write_conf() {   # prints 1 if the config changed
  local node hw cpus sock cores threads mem node_hw overrides="" new
  node=$(hostname -s)
  hw=$(slurmd -C | head -1)          # "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ... RealMemory=24105"
  hwval() { sed -n "s/.*[[:space:]]$1=\([0-9]*\).*/\1/p" <<<"$hw"; }
  cpus=$(hwval CPUs); sock=$(hwval SocketsPerBoard); cores=$(hwval CoresPerSocket)
  threads=$(hwval ThreadsPerCore); mem=$(hwval RealMemory)
  [ -n "$cpus" ] && [ -n "$mem" ] || die "could not parse 'slurmd -C': $hw"
  mem=$(( mem * 90 / 100 ))          # below the real memory, so slurmd never drains the node
  if [ -n "$LOCAL_CPUS" ] && [ "$LOCAL_CPUS" != "$cpus" ]; then
    node_hw="CPUs=$LOCAL_CPUS"; overrides="SlurmdParameters=config_overrides"
  else
    node_hw="CPUs=$cpus Boards=1 SocketsPerBoard=$sock CoresPerSocket=$cores ThreadsPerCore=$threads"
  fi
  mkdir -p "$CONF_DIR" "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR"
  new=$(mktemp)
  cat >"$new" <<CONF
# Generated by .ci/slurm_setup.sh: single-node Slurm on localhost, no systemd, no cgroups.
ClusterName=localcluster
SlurmctldHost=${node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire (min 5, default 120) is also the delay before a requeued job may start again
AuthInfo=cred_expire=10
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=${STATE_DIR}
SlurmdSpoolDir=${SPOOL_DIR}
SlurmctldPidFile=${CTLD_PID}
SlurmdPidFile=${SLURMD_PID}
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# pgid: at job/step end every process left in the job's process group is killed (as on a cgroup cluster)
ProctrackType=${PROCTRACK}
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# one line per finished job: there is no sacct without slurmdbd
JobCompType=jobcomp/filetxt
JobCompLoc=${LOG_DIR}/jobcomp.log
SchedulerType=sched/backfill
# main scheduling loop every 2 s (default 60) so requeued and dependent jobs start promptly
SchedulerParameters=sched_interval=2,bf_interval=5
# cancel jobs whose afterok dependency can never be met (22.05 ignores this in SchedulerParameters)
DependencyParameters=kill_invalid_depend
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=30
InactiveLimit=0
SlurmctldTimeout=120
SlurmdTimeout=300
${overrides}
NodeName=${node} NodeAddr=127.0.0.1 ${node_hw} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
  if cmp -s "$new" "$CONF"; then rm -f "$new"; echo 0; else install -m 0644 "$new" "$CONF"; rm -f "$new"; log "wrote $CONF"; echo 1; fi
}

up() {
  install_slurm
  [ "$(id -u)" -eq 0 ] || die "must run as root to start the daemons"
  start_munge
  local changed node state=""
  changed=$(write_conf)
  node=$(hostname -s)
  if [ "$changed" = 1 ] && { alive "$CTLD_PID" slurmctld || alive "$SLURMD_PID" slurmd; }; then
    log "slurm.conf changed: restarting the slurm daemons"
    stop_pids "$SLURMD_PID:slurmd" "$CTLD_PID:slurmctld"
  fi
  if ! alive "$CTLD_PID" slurmctld; then
    rm -f "$CTLD_PID"
    [ "${SLURM_LOCAL_KEEP_STATE:-0}" = 1 ] || find "$STATE_DIR" -mindepth 1 -delete
    log "starting slurmctld"
    /usr/sbin/slurmctld -f "$CONF"
  fi
  if ! alive "$SLURMD_PID" slurmd; then
    rm -f "$SLURMD_PID"
    [ "${SLURM_LOCAL_KEEP_STATE:-0}" = 1 ] || find "$SPOOL_DIR" -mindepth 1 -delete
    log "starting slurmd"
    /usr/sbin/slurmd -f "$CONF"
  fi
  for _ in $(seq $(( TIMEOUT * 10 ))); do
    state=$(sinfo -h -n "$node" -o '%t' 2>/dev/null | head -1 || true)
    case "$state" in
      idle|mix|alloc) log "cluster up: node $node is $state"; return 0 ;;
      down*|drain*|drng*) scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.1
  done
  log "node state '$state' after ${TIMEOUT} s"
  tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
  exit 1
}

down() {
  [ "$(id -u)" -eq 0 ] || die "must run as root"
  if alive "$CTLD_PID" slurmctld; then
    local jobs running
    jobs=$(squeue -h -o '%A' 2>/dev/null | sort -u | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
      log "cancelling jobs: $jobs"
      running=$(squeue -h -t RUNNING,SUSPENDED -o '%A' 2>/dev/null | tr '\n' ' ')
      # shellcheck disable=SC2086
      [ -n "${running// /}" ] && scancel --signal=KILL --full $running 2>/dev/null
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      for _ in $(seq 300); do [ -z "$(squeue -h -o '%A' 2>/dev/null)" ] && break; sleep 0.1; done
    fi
  fi
  stop_pids "$SLURMD_PID:slurmd" "$CTLD_PID:slurmctld"
  [ "${SLURM_LOCAL_KEEP_MUNGE:-0}" = 1 ] || stop_pids "$MUNGE_PID:munged"
  log "cluster down"
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  *) die "usage: $0 [up|down]" ;;
esac
