#!/usr/bin/env bash
# Train on one machine with all of its local devices (CPU cores, every GPU, or a single-host
# TPU VM): a thin wrapper around `mtp-train`.
#
# Run from anywhere, with mtp_jax installed (pip install -e '.[gpu]' / '.[tpu]' / '.'):
#   launch/local.sh CONFIG WORKDIR [--config.KEY=VALUE ...] [--dry-run]
# e.g.
#   launch/local.sh configs/smoke.py runs/smoke --config.train.steps=100
#   launch/local.sh configs/gpu_125m.py runs/125m --compile_only
# Any other mtp-train flag (--compile_only, --no_sample, ...) is passed through.
# --dry-run prints the command instead of running it.
# Environment: MTP_TRAIN (default `mtp-train`; e.g. "python -m mtp_jax.cli.train").
set -euo pipefail

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }

# shellcheck source=launch/_args.sh
source "$(dirname "${BASH_SOURCE[0]}")/_args.sh"
parse_launch_args 2 "$@"
config=${args[0]}
workdir=${args[1]}
overrides=("${args[@]:2}")

read -r -a train_cmd <<< "${MTP_TRAIN:-mtp-train}"
cmd=("${train_cmd[@]}" --config "$config" --workdir "$workdir" "${overrides[@]}")

if [ "$dry_run" = 1 ]; then
  printf '%q ' "${cmd[@]}"
  printf '\n'
  exit 0
fi
[ -f "$config" ] || { echo "local.sh: no config file $config" >&2; exit 2; }
exec "${cmd[@]}"
