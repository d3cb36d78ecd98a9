#!/usr/bin/env bash
# Install and start a single-node SLURM on this machine (CPU only, localhost) so that
# launch/slurm/pretrain.sbatch can be tested for real: Debian's slurm-wlm + munge, slurmctld and slurmd
# started directly as background daemons (no systemd: CI containers and VMs often have none).
#
#   sudo bash launch/slurm/install_local_slurm.sh     # ~10 s on a fresh Debian 12, <1 s when already up
#
# Idempotent: when the node is already up with this script's config it only says so.
# Exit codes: 0 ready; 3 cannot install here (no apt-get, no root, no network: callers may skip);
#             1 anything else (a real failure: the daemons did not come up; logs are printed).
# Env: SIFT_SLURM_FORCE=1 overwrites an /etc/slurm/slurm.conf this script did not write;
#      SIFT_SLURM_WAIT_S (default 60) how long to wait for the node to become idle.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
MARKER="# Written by sift-megatron launch/slurm/install_local_slurm.sh (single-node test cluster)."
RUN_DIR=/run/slurm
LOG_DIR=/var/log/slurm
STATE_DIR=/var/lib/slurm
WAIT_S="${SIFT_SLURM_WAIT_S:-60}"

say() { echo "[install_local_slurm] $*" >&2; }
# Exit 3 = "this machine cannot get SLURM" (the test suite turns it into a skip), with one line saying why.
cannot() { echo "install_local_slurm: cannot install SLURM here: $*" >&2; exit 3; }
fail() {
  echo "install_local_slurm: error: $*" >&2
  for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" /var/log/munge/munged.log; do
    if [ -s "$f" ]; then echo "--- tail $f" >&2; tail -n 15 "$f" >&2; fi
  done
  exit 1
}

# Root is needed for apt-get, the munge key and slurmd; use passwordless sudo when it is there.
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    exec sudo -n -E bash "$0" "$@"
  fi
  cannot "not root and no passwordless sudo (apt-get and slurmd need root)"
fi
command -v apt-get >/dev/null 2>&1 || cannot "apt-get not found (this script installs Debian's slurm-wlm and munge)"

# Two callers at once (parallel CI jobs, a test and a developer) must not both restart the daemons.
mkdir -p /run/lock
exec 9>/run/lock/sift-local-slurm.lock
flock -w 300 9 || fail "another install_local_slurm.sh is still running (lock /run/lock/sift-local-slurm.lock)"

# ---------------------------------------------------------------------------------------------- packages
if ! command -v slurmctld >/dev/null 2>&1 || ! command -v slurmd >/dev/null 2>&1 \
   || ! command -v sbatch >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
  say "installing slurm-wlm and munge with apt-get"
  # Keep the packages' maintainer scripts from starting the daemons (there may be no init system, and
  # slurmctld cannot start before slurm.conf exists); we start them ourselves below. Only our own
  # temporary policy file is removed again.
  POLICY=/usr/sbin/policy-rc.d
  if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$POLICY" && chmod 755 "$POLICY"
    trap 'rm -f "$POLICY"' EXIT
  fi
  APT_LOG="$(mktemp)"
  export DEBIAN_FRONTEND=noninteractive
  # Timeouts: an offline machine must give a reason in seconds, not hang CI; the dpkg lock timeout lets a
  # concurrent apt-get (another engineer, unattended-upgrades) finish first.
  if ! timeout 180 apt-get -q -o DPkg::Lock::Timeout=120 -o Acquire::http::Timeout=20 update >"$APT_LOG" 2>&1; then
    cannot "apt-get update failed: $(grep -E '^(E|W|Err):' "$APT_LOG" | tail -n 1 || tail -n 1 "$APT_LOG")"
  fi
  if ! timeout 300 apt-get -q -y -o DPkg::Lock::Timeout=120 install --no-install-recommends \
       slurm-wlm munge >>"$APT_LOG" 2>&1; then
    cannot "apt-get install slurm-wlm munge failed: $(grep -E '^(E|Err):' "$APT_LOG" | tail -n 1 || tail -n 1 "$APT_LOG")"
  fi
  rm -f "$APT_LOG"
  say "installed $(dpkg-query -W -f='slurm-wlm ${Version}' slurm-wlm), $(dpkg-query -W -f='munge ${Version}' munge)"
fi

# ---------------------------------------------------------------------------------------------- slurm.conf
# The node line comes from `slurmd -C` (what slurmd itself will detect), so CPUs/RealMemory always match the
# machine and the node is never drained for "Low RealMemory" or a socket/core mismatch.
NODE_LINE="$(slurmd -C | head -n 1)"
NODE="$(sed -E 's/^NodeName=([^ ]+).*/\1/' <<<"$NODE_LINE")"
[ -n "$NODE" ] || fail "could not read the node name from 'slurmd -C': $NODE_LINE"
NEW_CONF="$(cat <<EOF
$MARKER
# CPU only, no accounting, no cgroups (works in containers without systemd); re-run the script to refresh.
ClusterName=sift-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=$STATE_DIR/slurmctld
SlurmdSpoolDir=$STATE_DIR/slurmd
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
# Process tracking from /proc parentage instead of cgroups: no cgroup mounts or delegation needed.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# A node that was down (daemons restarted, machine rebooted) comes back by itself once slurmd registers.
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=30
# Finished jobs stay visible to 'scontrol show job' for 5 minutes (tests poll it instead of sacct).
MinJobAge=300
$NODE_LINE NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
)"
CONF_CHANGED=0
if [ -f "$CONF" ] && ! grep -qxF "$MARKER" "$CONF" && [ "${SIFT_SLURM_FORCE:-0}" != 1 ]; then
  fail "$CONF exists and was not written by this script; not touching a real cluster's config (SIFT_SLURM_FORCE=1 overrides)"
fi
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$NEW_CONF" ]; then
  mkdir -p "$CONF_DIR"
  printf '%s\n' "$NEW_CONF" > "$CONF"
  chmod 644 "$CONF"
  CONF_CHANGED=1
  say "wrote $CONF ($NODE_LINE)"
fi

# ---------------------------------------------------------------------------------------------- munge
# Debian's postinst creates the key; create it when that did not happen (image built without postinst).
if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  mungekey --create --keyfile=/etc/munge/munge.key
fi
chown -R munge:munge /etc/munge
chmod 700 /etc/munge
chmod 400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  say "starting munged"
  # munged refuses to run as root. Daemons get stdio on /dev/null (a caller capturing our output must not
  # be held open) and not the lock's fd 9 (they would hold the lock for their whole life).
  runuser -u munge -- /usr/sbin/munged </dev/null >/dev/null 2>&1 9>&- || fail "munged did not start"
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null || fail "munged started but credentials do not verify"
fi

# ---------------------------------------------------------------------------------------------- daemons
install -d -o slurm -g slurm -m 0755 "$RUN_DIR" "$LOG_DIR" "$STATE_DIR" "$STATE_DIR/slurmctld"
install -d -m 0755 "$STATE_DIR/slurmd"

# The pid of a daemon we started (from its pid file), only if that process really is that daemon.
daemon_pid() {
  local pidfile="$RUN_DIR/$1.pid" pid
  [ -s "$pidfile" ] || return 1
  pid="$(cat "$pidfile")"
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ] || return 1
  echo "$pid"
}
stop_daemon() {
  local pid
  pid="$(daemon_pid "$1")" || return 0
  say "stopping $1 (pid $pid)"
  kill "$pid"
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}
node_state() { sinfo -h -n "$NODE" -o %t 2>/dev/null | head -n 1 | tr -d '*~#!%$@^-'; }
ctld_up() { scontrol ping 2>/dev/null | grep -q 'is UP'; }

if [ "$CONF_CHANGED" = 1 ]; then
  stop_daemon slurmd
  stop_daemon slurmctld
fi
if ! daemon_pid slurmctld >/dev/null || ! ctld_up; then
  stop_daemon slurmctld
  say "starting slurmctld"
  slurmctld </dev/null >/dev/null 2>&1 9>&- || fail "slurmctld did not start"
fi
if ! daemon_pid slurmd >/dev/null; then
  say "starting slurmd"
  slurmd </dev/null >/dev/null 2>&1 9>&- || fail "slurmd did not start"
fi

# ---------------------------------------------------------------------------------------------- ready?
deadline=$(( SECONDS + WAIT_S ))
resumed=0
while :; do
  state="$(node_state || true)"
  case "$state" in
    idle|alloc|mix|comp) break ;;
    # Left down/drained by an earlier run (e.g. the machine changed under a kept state dir): resume once.
    down|drain|drng|fail)
      if [ "$resumed" = 0 ]; then scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true; resumed=1; fi ;;
  esac
  if [ "$SECONDS" -ge "$deadline" ]; then
    fail "node $NODE not idle after ${WAIT_S}s (state '${state:-unknown}'; $(sinfo -h -R -o '%E' 2>/dev/null | head -n 1))"
  fi
  sleep 0.5
done
echo "install_local_slurm: SLURM up: node $NODE $state, $(sed -E 's/.*(CPUs=[0-9]+).*(RealMemory=[0-9]+).*/\1 \2/' <<<"$NODE_LINE")MB, partition debug"
