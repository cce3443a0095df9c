#!/usr/bin/env bash
# N training processes on this machine, each with its own CPU devices: simulated hosts that
# take the same multi-host code path as a pod (jax.distributed over a localhost coordinator).
#
# Run from anywhere, with mtp_jax installed:
#   launch/multiprocess_local.sh N CONFIG WORKDIR [--config.KEY=VALUE ...] [--dry-run]
# e.g.
#   launch/multiprocess_local.sh 2 configs/smoke.py runs/smoke_2proc --config.train.steps=50
# Process i runs
#   mtp-train --config CONFIG --workdir WORKDIR --coordinator_address=127.0.0.1:PORT
#             --num_processes=N --process_id=i [overrides]
# with JAX_PLATFORMS=cpu and XLA_FLAGS=--xla_force_host_platform_device_count=DEVICES_PER_PROCESS,
# so the run has N x DEVICES_PER_PROCESS devices. Process 0's output is shown; every process
# logs to LOG_DIR/process_<i>.log. The script waits for all of them, and if one fails it stops
# the others and exits with that process's status.
# --dry-run prints the N commands (one port) instead of running them.
# Environment: DEVICES_PER_PROCESS (default 2), MTP_PORT (default: a free port),
#   LOG_DIR (default WORKDIR/logs), MTP_TRAIN (default `mtp-train`).
set -euo pipefail

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }

# shellcheck source=launch/_args.sh
source "$(dirname "${BASH_SOURCE[0]}")/_args.sh"
parse_launch_args 3 "$@"
num=${args[0]}
config=${args[1]}
workdir=${args[2]}
overrides=("${args[@]:3}")
if ! [[ "$num" =~ ^[1-9][0-9]*$ ]]; then
  echo "multiprocess_local.sh: N must be a positive integer, got '$num'" >&2
  exit 2
fi

free_port() {
  local py
  py=$(command -v python3 || command -v python)
  "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
port=${MTP_PORT:-$(free_port)}
devices=${DEVICES_PER_PROCESS:-2}
log_dir=${LOG_DIR:-$workdir/logs}
read -r -a train_cmd <<< "${MTP_TRAIN:-mtp-train}"
env_vars=(JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=$devices")

command_for() {  # command_for I: the command line of process I
  cmd=(env "${env_vars[@]}" "${train_cmd[@]}" --config "$config" --workdir "$workdir"
       "--coordinator_address=127.0.0.1:$port" "--num_processes=$num" "--process_id=$1"
       "${overrides[@]}")
}

if [ "$dry_run" = 1 ]; then
  for ((i = 0; i < num; i++)); do
    command_for "$i"
    printf '%q ' "${cmd[@]}"
    printf '> %q 2>&1 &\n' "$log_dir/process_$i.log"
  done
  printf 'wait\n'
  exit 0
fi

[ -f "$config" ] || { echo "multiprocess_local.sh: no config file $config" >&2; exit 2; }
mkdir -p "$log_dir"
pids=()
stop_all() {
  local pid
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
}
trap 'stop_all; exit 130' INT TERM

echo "multiprocess_local.sh: $num processes x $devices CPU devices, coordinator" \
  "127.0.0.1:$port, logs in $log_dir/" >&2
for ((i = 0; i < num; i++)); do
  command_for "$i"
  log="$log_dir/process_$i.log"
  if [ "$i" = 0 ]; then
    "${cmd[@]}" > >(tee "$log") 2>&1 &
  else
    "${cmd[@]}" > "$log" 2>&1 &
  fi
  pids+=("$!")
done

# Poll: the first process to fail stops the others.
status=0
remaining=$num
declare -A done_pids=()
while [ "$remaining" -gt 0 ]; do
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    [ -n "${done_pids[$pid]:-}" ] && continue
    if ! kill -0 "$pid" 2>/dev/null; then
      rc=0
      wait "$pid" || rc=$?
      done_pids[$pid]=1
      remaining=$((remaining - 1))
      if [ "$rc" != 0 ] && [ "$status" = 0 ]; then
        status=$rc
        echo "multiprocess_local.sh: process $i failed (exit $rc); stopping the others." \
          "Last lines of $log_dir/process_$i.log:" >&2
        tail -n 20 "$log_dir/process_$i.log" >&2 || true
        stop_all
      fi
    fi
  done
  [ "$remaining" -gt 0 ] && sleep 0.5
done
trap - INT TERM
if [ "$status" = 0 ]; then
  echo "multiprocess_local.sh: all $num processes finished" >&2
fi
exit "$status"
