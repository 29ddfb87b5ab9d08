#!/usr/bin/env bash
# Stop the single-node test cluster started by .ci/slurm-up.sh.
# Only daemons recorded in the pid files written by slurm-up.sh are stopped
# (by pid, never by name); a cluster this script did not configure is left
# alone. The accounting database and state stay on disk, so a later
# slurm-up.sh keeps the job history (`sacct`). Pass --purge to also delete the
# state directory and the accounting database.
set -uo pipefail
STATE=${LOKI_SLURM_STATE:-/var/lib/loki-slurm}
MARKER="# managed-by: loki .ci/slurm-up.sh"
log() { printf '[slurm-down] %s\n' "$*"; }

if [ -f /etc/slurm/slurm.conf ] && ! grep -qF "$MARKER" /etc/slurm/slurm.conf; then
  log "/etc/slurm/slurm.conf was not written by slurm-up.sh: nothing to stop"
  exit 0
fi

stop() {  # stop NAME PIDFILE -- only if the pid file still names that daemon
  local name=$1 pidfile=$2 pid
  [ -f "$pidfile" ] || { log "$name: not running (no $pidfile)"; return 0; }
  pid=$(cat "$pidfile" 2>/dev/null)
  if [ -n "$pid" ] && [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$name" ]; then
    kill "$pid"
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
    log "$name: stopped (pid $pid)"
  else
    log "$name: not running (stale pid file)"
  fi
  rm -f "$pidfile"
}

if command -v scancel >/dev/null && scontrol ping 2>/dev/null | grep -q UP; then
  scancel --user="$(id -un)" 2>/dev/null || true
fi
stop slurmd /run/slurm/slurmd.pid
stop slurmctld /run/slurm/slurmctld.pid
stop slurmdbd /run/slurm/slurmdbd.pid
if [ "${1:-}" = --purge ] && mysqladmin ping >/dev/null 2>&1; then
  mysql -u root -e 'DROP DATABASE IF EXISTS slurm_acct_db' && log "dropped the slurm accounting database"
fi
stop mariadbd /run/mysqld/mysqld.pid
# munged: its pid file lives in /run/munge
stop munged /run/munge/munged.pid

if [ "${1:-}" = --purge ]; then
  rm -rf "$STATE"
  log "purged $STATE"
fi
