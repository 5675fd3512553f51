#!/usr/bin/env bash
# A real two-node SLURM cluster on this one machine (Debian/Ubuntu, root, no systemd needed):
# slurmctld plus one slurmd per simulated node (node1, node2, both 127.0.0.1), with munge.
#
#   launch/slurm/local_cluster.sh up      # installs slurm + munge if missing, starts the daemons
#   export SLURM_CONF=/tmp/moesaic-slurm/slurm.conf
#   sbatch --nodes 2 --ntasks-per-node 1 launch/slurm/train.sbatch experiment=smoke
#   launch/slurm/local_cluster.sh down    # stops every daemon it started (by PID)
#
# Options (environment): MOESAIC_SLURM_DIR (default /tmp/moesaic-slurm), SLURM_NODES (2),
# SLURM_CPUS_PER_NODE (2). Job ids restart at 1 after each `up`.
set -euo pipefail
DIR=${MOESAIC_SLURM_DIR:-/tmp/moesaic-slurm}
NODES=${SLURM_NODES:-2}
CPUS=${SLURM_CPUS_PER_NODE:-2}
CONF=$DIR/slurm.conf

log() { echo "local_cluster: $*" >&2; }

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null && command -v munged >/dev/null; then
    return
  fi
  [ "$(id -u)" = 0 ] || { log "slurm is not installed and this is not root: cannot install it"; exit 3; }
  command -v apt-get >/dev/null || { log "slurm is not installed and there is no apt-get"; exit 3; }
  log "installing slurmctld slurmd slurm-client munge (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

write_conf() {
  mkdir -p "$DIR"/{state,spool,log,run}
  local last=$((17000 + NODES))
  cat > "$CONF" <<CONF
ClusterName=moesaic-local
SlurmctldHost=localhost
SlurmctldPort=16817
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=15
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SlurmdParameters=config_overrides
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
NodeName=node[1-$NODES] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[17001-$last] CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=node[1-$NODES] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
}

resolve_nodes() {  # node1..N must resolve (to 127.0.0.1) for srun and scontrol
  local names=""
  for i in $(seq 1 "$NODES"); do
    getent hosts "node$i" >/dev/null || names="$names node$i"
  done
  if [ -n "$names" ]; then
    echo "127.0.0.1$names  # moesaic local SLURM cluster" >> /etc/hosts
  fi
}

up() {
  install
  down quiet || true
  write_conf
  resolve_nodes
  mkdir -p /run/munge && chown munge:munge /run/munge
  if ! { pgrep -x munged >/dev/null && [ -S /run/munge/munge.socket.2 ]; }; then
    setpriv --reuid=munge --regid=munge --clear-groups munged -F >"$DIR/log/munged.log" 2>&1 &
    echo $! > "$DIR/run/munged.pid.started"
    for _ in $(seq 1 50); do [ -S /run/munge/munge.socket.2 ] && break; sleep 0.1; done
  fi
  rm -rf "$DIR/state"/* "$DIR/spool"/*
  slurmctld -D -i -f "$CONF" >"$DIR/log/slurmctld.out" 2>&1 &
  echo $! > "$DIR/run/slurmctld.pid.started"
  for i in $(seq 1 "$NODES"); do
    mkdir -p "$DIR/spool/node$i"
    slurmd -D -N "node$i" -f "$CONF" >"$DIR/log/slurmd-node$i.out" 2>&1 &
    echo $! > "$DIR/run/slurmd-node$i.pid.started"
  done
  export SLURM_CONF=$CONF
  for _ in $(seq 1 60); do
    if [ "$(sinfo -h -o '%t' 2>/dev/null | grep -cE '^(idle|mix|alloc)')" -ge 1 ] && \
       [ "$(sinfo -h -N -o '%t' 2>/dev/null | grep -c idle)" -eq "$NODES" ]; then
      log "up: $NODES nodes idle; export SLURM_CONF=$CONF"
      echo "$CONF"
      return 0
    fi
    sleep 0.5
  done
  log "the cluster did not come up; logs in $DIR/log"
  sinfo -N 2>&1 | head -5 >&2 || true
  return 1
}

down() {
  local quiet=${1:-} pids=""
  for f in "$DIR"/run/slurmd-*.pid.started "$DIR"/run/slurmctld.pid.started "$DIR"/run/munged.pid.started; do
    [ -f "$f" ] || continue
    pids="$pids $(cat "$f")"
    kill "$(cat "$f")" 2>/dev/null || true
    rm -f "$f"
  done
  for _ in $(seq 1 50); do  # wait until every daemon we started has exited
    local alive=""
    for p in $pids; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ -z "$alive" ] && break
    sleep 0.1
  done
  [ -n "$quiet" ] || log "down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
