#!/usr/bin/env bash
# Per-node part of launch/slurm/pretrain.sbatch (one srun task per node): PYTHON [torchrun args...]
# Runs `PYTHON -m torch.distributed.run ARGS` and gets SIGUSR1 ("checkpoint and stop", from
# `#SBATCH --signal`) to the training processes without killing torchrun on the way:
#   * torchrun does not handle SIGUSR1, and its default action would kill it, leaving the ranks to be
#     killed mid-checkpoint when the step ends. So torchrun starts with SIGUSR1 ignored (kept across exec).
#     Its ranks inherit "ignored", but the trainer installs its own SIGUSR1/SIGTERM handler.
#   * Slurm usually signals every process of the step (proctrack/cgroup or linuxproc), but torchrun starts
#     its ranks in new sessions, so where that is not so (proctrack/pgid, a manual `kill`) this wrapper
#     relays SIGUSR1 to torchrun's children itself. A rank that gets it twice just sets its flag twice.
#   * SIGTERM (time limit, scancel, preemption) reaches torchrun and the ranks from Slurm. This wrapper must
#     outlive them: if it exited first, the step would end and Slurm would kill the ranks mid-checkpoint.
set -euo pipefail
PY="$1"
shift

(trap '' USR1; exec "$PY" -m torch.distributed.run "$@") &
TORCHRUN=$!

# Direct children of $1, from /proc (no procps needed; /proc/PID/task/*/children is often not built).
children_of() {
  local stat pid ppid rest
  for stat in /proc/[0-9]*/stat; do
    { read -r rest < "$stat"; } 2>/dev/null || continue  # the process may be gone by now
    rest="${rest##*) }"  # past "PID (COMM) ", COMM may hold spaces: "STATE PPID ..."
    read -r _ ppid _ <<<"$rest"
    if [ "$ppid" = "$1" ]; then pid="${stat#/proc/}"; echo "${pid%/stat}"; fi
  done
}
relay_usr1() {
  local pid
  for pid in $(children_of "$TORCHRUN"); do kill -USR1 "$pid" 2>/dev/null || true; done
}
trap relay_usr1 USR1
trap ':' TERM

# `wait` returns early whenever a trapped signal arrives; keep waiting until torchrun is gone, then take
# its exit status (bash keeps it for a reaped child).
while kill -0 "$TORCHRUN" 2>/dev/null; do wait "$TORCHRUN" || true; done
rc=0
wait "$TORCHRUN" || rc=$?
exit "$rc"
