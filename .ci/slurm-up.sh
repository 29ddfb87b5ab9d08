#!/usr/bin/env bash
# Start a real single-node SLURM cluster on this machine (localhost), for the
# cluster tests (tests/slurm) and for trying the SLURM profiles by hand.
#
#   bash .ci/slurm-up.sh          # install if missing, configure, start, wait
#   bash .ci/slurm-down.sh        # stop what this script started
#
# What it does (idempotent: a second call with the cluster up only checks it):
#   1. apt-installs slurm-wlm, munge, slurmdbd and mariadb-server if missing;
#   2. writes /etc/slurm/slurm.conf + slurmdbd.conf for ONE node, this machine
#      (its CPUs and memory from `slurmd -C`), no cgroups (proctrack/linuxproc,
#      task/none: works in containers and gVisor without systemd);
#   3. starts munged, mariadbd (job accounting database), slurmdbd, slurmctld
#      and slurmd as background daemons (no systemd needed);
#   4. registers cluster, account and user in the accounting database so that
#      `sacct` (used by the Snakemake SLURM executor and by submitit to follow
#      jobs) lists every job;
#   5. waits until `sinfo` shows the node idle.
#
# Why a database: since Slurm 15.08 `sacct` only reads slurmdbd; without it it
# answers "Slurm accounting storage is disabled" and both Snakemake's executor
# and submitit lose track of finished jobs.
#
# Exit codes: 0 cluster up; 2 not root; 3 packages missing and apt failed;
# 4 a daemon did not come up (see the logs under $LOKI_SLURM_STATE).
# A /etc/slurm/slurm.conf that this script did not write is never touched: on
# a machine that is already part of a real cluster it only reports `sinfo`.
#
# Environment:
#   LOKI_SLURM_STATE   state/log dir (default /var/lib/loki-slurm)
#   LOKI_SLURM_CLUSTER cluster name (default loki-local)
#   LOKI_SLURM_ACCOUNT account registered for the user (default loki)
#   LOKI_SLURM_NO_INSTALL=1  never call apt-get (exit 3 if packages missing)
set -u  # no pipefail: `cmd | grep -q` would fail on SIGPIPE

STATE=${LOKI_SLURM_STATE:-/var/lib/loki-slurm}
CLUSTER=${LOKI_SLURM_CLUSTER:-loki-local}
ACCOUNT=${LOKI_SLURM_ACCOUNT:-loki}
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
DBD_CONF=$CONF_DIR/slurmdbd.conf
MARKER="# managed-by: loki .ci/slurm-up.sh"
PARTITION=${LOKI_SLURM_PARTITION:-debug}

log() { printf '[slurm-up] %s\n' "$*"; }
die() { local code=$1; shift; printf '[slurm-up] ERROR: %s\n' "$*" >&2; exit "$code"; }

wait_for() {  # wait_for SECONDS DESCRIPTION CMD...
  local secs=$1 what=$2; shift 2
  local t=0
  until "$@" >/dev/null 2>&1; do
    t=$((t + 1))
    if [ "$t" -ge $((secs * 2)) ]; then return 1; fi
    sleep 0.5
  done
  log "$what: ok"
}

# pid from a pid file, only if that process is still the named daemon (a stale
# file may name a pid reused by something else: never signal that)
daemon_pid() {  # daemon_pid PIDFILE NAME
  local pid
  [ -f "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null)
  [ -n "$pid" ] && [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$2" ] && echo "$pid"
}
stop_pid() {  # stop_pid PIDFILE NAME
  local pid
  if pid=$(daemon_pid "$1" "$2"); then
    kill "$pid" 2>/dev/null
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  fi
  rm -f "$1"
  return 0
}

node_state() { sinfo -h -N -o '%t' 2>/dev/null | head -1; }
node_ready() { case "$(node_state)" in idle|mix|alloc|comp) return 0;; *) return 1;; esac; }

[ "$(id -u)" = 0 ] || die 2 "must run as root (installs packages, starts daemons as root)"

# --- 1. packages --------------------------------------------------------------
need_pkgs=()
command -v slurmctld >/dev/null || need_pkgs+=(slurmctld)
command -v slurmd >/dev/null || need_pkgs+=(slurmd)
command -v sbatch >/dev/null || need_pkgs+=(slurm-client)
command -v slurmdbd >/dev/null || need_pkgs+=(slurmdbd)
command -v munged >/dev/null || need_pkgs+=(munge)
command -v mariadbd >/dev/null || need_pkgs+=(mariadb-server)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  [ "${LOKI_SLURM_NO_INSTALL:-0}" = 1 ] && die 3 "missing packages ${need_pkgs[*]} and LOKI_SLURM_NO_INSTALL=1"
  command -v apt-get >/dev/null || die 3 "missing packages ${need_pkgs[*]} and no apt-get"
  log "installing ${need_pkgs[*]} (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null 2>&1 || log "apt-get update failed, trying install anyway"
  # Debian's maintainer scripts try to start services; without systemd they
  # only warn (policy-rc.d), which is fine: we start the daemons ourselves.
  apt-get install -y -qq --no-install-recommends \
      slurm-wlm slurm-client slurmctld slurmd slurmdbd munge mariadb-server mariadb-client \
      >/tmp/loki-slurm-apt.log 2>&1 \
    || { tail -20 /tmp/loki-slurm-apt.log >&2; die 3 "apt-get install failed (log /tmp/loki-slurm-apt.log)"; }
fi

mkdir -p "$STATE" "$CONF_DIR"

# --- foreign configuration: leave it alone -----------------------------------
if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
  log "$CONF was not written by this script: not touching it"
  if node_ready; then log "existing cluster answers: $(sinfo -h -o '%P %t %D' | tr '\n' ' ')"; exit 0; fi
  die 4 "existing $CONF but no ready node in sinfo"
fi

# --- 2. configuration -----------------------------------------------------------
NODE=$(hostname -s)
read_hw() { slurmd -C 2>/dev/null | sed -n "s/.*\b$1=\([0-9]*\).*/\1/p" | head -1; }
CPUS=$(read_hw CPUs); CPUS=${CPUS:-$(nproc)}
MEM=$(read_hw RealMemory)
[ -n "$MEM" ] || MEM=$(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo)
# leave some memory for the daemons; slurmd drains a node that claims more
# memory than it has
MEM=$((MEM * 9 / 10))

mkdir -p "$STATE"/{ctld,spool,log} /run/slurm /run/munge /run/mysqld
NEW_CONF=$STATE/slurm.conf.new
cat >"$NEW_CONF" <<EOF
$MARKER
# Single-node test cluster on $NODE; regenerate with .ci/slurm-up.sh.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
# no cgroups: containers/gVisor without systemd
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=5
ReturnToService=2
# accounting: slurmdbd (MariaDB) so that sacct works
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
AccountingStorageTRES=gres/gpu
# keep sbatch --comment (Snakemake writes rule_<name>_wildcards_<...>) in sacct
AccountingStoreFlags=job_comment
JobCompType=jobcomp/none
# short timers: this is a test cluster
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
CONF_CHANGED=0
if ! cmp -s "$NEW_CONF" "$CONF"; then
  mv "$NEW_CONF" "$CONF"; CONF_CHANGED=1
  log "wrote $CONF (node $NODE: CPUs=$CPUS RealMemory=${MEM}MB, partition $PARTITION)"
else
  rm -f "$NEW_CONF"
fi

# --- already up with this configuration? ----------------------------------------
if [ "$CONF_CHANGED" = 0 ] && node_ready && sacct -n -X -S now-1minutes >/dev/null 2>&1; then
  log "cluster '$CLUSTER' already up: node $NODE $(node_state), sacct ok"
  exit 0
fi

cat >"$DBD_CONF" <<EOF
$MARKER
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
LogFile=$STATE/log/slurmdbd.log
PidFile=/run/slurm/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
chmod 600 "$DBD_CONF"

# --- 3. daemons ----------------------------------------------------------------
# munge
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
    || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key /run/munge; chmod 400 /etc/munge/munge.key
mkdir -p /var/lib/munge /var/log/munge; chown munge:munge /var/lib/munge /var/log/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  log "starting munged"
  runuser -u munge -- munged 2>/dev/null || munged --force || die 4 "munged failed to start"
  wait_for 20 "munge" sh -c 'munge -n | unmunge' || die 4 "munge does not answer"
else
  log "munged already running"
fi

# mariadb (accounting database)
if ! mysqladmin ping >/dev/null 2>&1; then
  log "starting mariadbd"
  chown mysql:mysql /run/mysqld
  if [ ! -d /var/lib/mysql/mysql ]; then
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql >"$STATE/log/mariadb-install.log" 2>&1 \
      || die 4 "mariadb-install-db failed ($STATE/log/mariadb-install.log)"
  fi
  # small footprint: this database only holds the test cluster's job records
  setsid mariadbd --user=mysql --datadir=/var/lib/mysql --socket=/run/mysqld/mysqld.sock \
      --bind-address=127.0.0.1 --innodb-buffer-pool-size=64M --performance-schema=OFF \
      --log-error="$STATE/log/mariadb.log" --pid-file=/run/mysqld/mysqld.pid \
      </dev/null >/dev/null 2>&1 &
  wait_for 60 "mariadb" mysqladmin ping || die 4 "mariadbd did not start ($STATE/log/mariadb.log)"
else
  log "mariadb already running"
fi
mysql -u root <<'EOF' || die 4 "could not create the slurm database user"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF

# slurmdbd
if ! sacctmgr -n show cluster >/dev/null 2>&1; then
  stop_pid /run/slurm/slurmdbd.pid slurmdbd
  log "starting slurmdbd"
  slurmdbd || die 4 "slurmdbd failed ($STATE/log/slurmdbd.log)"
  wait_for 60 "slurmdbd" sacctmgr -n show cluster || die 4 "slurmdbd does not answer ($STATE/log/slurmdbd.log)"
else
  log "slurmdbd already running"
fi

# --- 4. accounting entities -------------------------------------------------------
USER_NAME=${SUDO_USER:-$(id -un)}
sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER" \
  || sacctmgr -i add cluster "$CLUSTER" >/dev/null || die 4 "sacctmgr add cluster failed"
sacctmgr -n -P show account format=account | grep -qx "$ACCOUNT" \
  || sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER" description="loki test" organization=loki >/dev/null
for u in root "$USER_NAME"; do
  sacctmgr -n -P show assoc where user="$u" account="$ACCOUNT" format=user | grep -q . \
    || sacctmgr -i add user "$u" account="$ACCOUNT" defaultaccount="$ACCOUNT" cluster="$CLUSTER" >/dev/null
done
log "accounting: cluster $CLUSTER, account $ACCOUNT, users root $USER_NAME"

# slurmctld + slurmd: (re)start so they read the configuration written above
if [ "$CONF_CHANGED" = 1 ] && { [ -f /run/slurm/slurmctld.pid ] || [ -f /run/slurm/slurmd.pid ]; }; then
  log "configuration changed: restarting slurmctld and slurmd"
  stop_pid /run/slurm/slurmd.pid slurmd; stop_pid /run/slurm/slurmctld.pid slurmctld
fi
if ! scontrol ping 2>/dev/null | grep -q UP; then
  stop_pid /run/slurm/slurmctld.pid slurmctld
  log "starting slurmctld"
  slurmctld || die 4 "slurmctld failed ($STATE/log/slurmctld.log)"
  wait_for 60 "slurmctld" sh -c 'scontrol ping | grep -q UP' || die 4 "slurmctld does not answer ($STATE/log/slurmctld.log)"
else
  log "slurmctld already running"
fi
if ! daemon_pid /run/slurm/slurmd.pid slurmd >/dev/null; then
  log "starting slurmd"
  slurmd || die 4 "slurmd failed ($STATE/log/slurmd.log)"
else
  log "slurmd already running"
fi

# --- 5. wait for the node -------------------------------------------------------------
for i in $(seq 1 60); do
  st=$(node_state)
  case "$st" in
    idle|mix|alloc|comp) break;;
    down*|drain*|drng*|inval*|fail*)
      scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true;;
  esac
  sleep 1
done
node_ready || { tail -20 "$STATE/log/slurmd.log" >&2; die 4 "node $NODE not ready (state '$(node_state)'), see $STATE/log"; }
sacct -n -X -S now-1minutes >/dev/null 2>&1 || die 4 "sacct does not work"
log "cluster '$CLUSTER' up: $(sinfo -h -o 'partition=%P nodes=%D state=%t cpus=%c mem=%mMB')"
log "logs: $STATE/log; stop with .ci/slurm-down.sh"
