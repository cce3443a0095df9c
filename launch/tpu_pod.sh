#!/usr/bin/env bash
# Train on every host of a Cloud TPU pod slice (a TPU VM with several workers).
#
# Run from the repository root, on a machine with gcloud authenticated for PROJECT:
#   launch/tpu_pod.sh NAME ZONE PROJECT CONFIG WORKDIR [--config.KEY=VALUE ...] [--dry-run]
# e.g.
#   launch/tpu_pod.sh my-v5p-128 us-east5-a my-project configs/tpu_7b.py gs://my-bucket/runs/7b
# Plan it first, from a laptop (compiles the real step for the slice, prints memory per chip):
#   mtp-train --config configs/tpu_7b.py --workdir /tmp/plan --compile_only --topology v5p:4x4x4
#
# What it does (--dry-run prints these commands instead of running them):
#   1. builds a wheel of this checkout (uncommitted changes included) with `pip wheel`;
#   2. copies the wheel and CONFIG to ~/mtp_jax_run/ on every worker (tpu-vm scp --worker=all);
#   3. on every worker: installs uv (pip --user), makes a Python MTP_PYTHON venv in ~/mtp_venv
#      (TPU VM images ship Python 3.10; uv fetches a standalone 3.11) and installs
#      'mtp_jax-*.whl[tpu]' into it (jax[tpu] with its matching libtpu);
#   4. runs `mtp-train --config CONFIG --workdir WORKDIR [overrides]` on all workers at once
#      (tpu-vm ssh --worker=all). JAX finds the other hosts itself on a TPU pod.
# WORKDIR should be a gs:// path that every worker can write (checkpoints, metrics); a local
# path would give each worker its own directory. The training runs in the foreground: if this
# ssh session ends, the run stops; set MTP_DETACH=1 to start it under nohup instead (logs in
# ~/mtp_jax_run/train.log on each worker). If a previous run still holds the TPU, stop it first.
# Environment: MTP_PYTHON (default 3.11), MTP_WHEEL (use this wheel, skip step 1),
#   MTP_SKIP_INSTALL=1 (skip steps 1-3), MTP_DETACH=1, GCLOUD (default gcloud),
#   MTP_SSH_FLAGS (extra flags for tpu-vm ssh/scp, e.g. --internal-ip).
set -euo pipefail

usage() { sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; }

# shellcheck source=launch/_args.sh
source "$(dirname "${BASH_SOURCE[0]}")/_args.sh"
parse_launch_args 5 "$@"
name=${args[0]}
zone=${args[1]}
project=${args[2]}
config=${args[3]}
workdir=${args[4]}
overrides=("${args[@]:5}")

python_version=${MTP_PYTHON:-3.11}
remote_dir=mtp_jax_run  # relative to the home directory of each worker
read -r -a gcloud <<< "${GCLOUD:-gcloud}"
read -r -a ssh_flags <<< "${MTP_SSH_FLAGS:-}"
target=(--zone "$zone" --project "$project" --worker=all "${ssh_flags[@]}")

if [[ "$workdir" != gs://* ]]; then
  echo "tpu_pod.sh: warning: WORKDIR '$workdir' is not a gs:// path; every worker will write" \
    "its own local copy and checkpoints will not be shared" >&2
fi
if [ ! -f "$config" ]; then
  echo "tpu_pod.sh: no config file $config" >&2
  exit 2
fi

q() {  # q WORD: WORD quoted for a POSIX shell ('...' unless it is plain)
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

show() {  # show CMD...: the command as one line a shell would read back the same
  local out=() w
  for w in "$@"; do
    out+=("$(q "$w")")
  done
  printf '%s\n' "${out[*]}"
}

run() {  # run CMD...: print it under --dry-run, else echo it to stderr and run it
  if [ "$dry_run" = 1 ]; then
    show "$@"
  else
    printf '+ %s\n' "$(show "$@")" >&2
    "$@"
  fi
}

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
config_name=$(basename "$config")

if [ "${MTP_SKIP_INSTALL:-0}" != 1 ]; then
  # 1. a wheel of this checkout
  if [ -n "${MTP_WHEEL:-}" ]; then
    wheel=$MTP_WHEEL
  else
    wheel_dir=$repo_root/dist/launch
    if [ "$dry_run" = 1 ]; then
      wheel=$wheel_dir/mtp_jax-VERSION-py3-none-any.whl
    else
      rm -rf "$wheel_dir"
    fi
    run python3 -m pip wheel --quiet --no-deps --wheel-dir "$wheel_dir" "$repo_root"
    if [ "$dry_run" != 1 ]; then
      wheel=$(ls "$wheel_dir"/mtp_jax-*.whl)
    fi
  fi
  wheel_name=$(basename "$wheel")
  # 2. copy the wheel and the config to every worker
  run "${gcloud[@]}" compute tpus tpu-vm ssh "$name" "${target[@]}" --command "mkdir -p $remote_dir"
  run "${gcloud[@]}" compute tpus tpu-vm scp "$wheel" "$config" "$name:$remote_dir/" "${target[@]}"
  # 3. a venv with mtp_jax[tpu] on every worker
  install="set -e; python3 -m pip install --quiet --user --upgrade uv"
  install+="; ~/.local/bin/uv venv --quiet --allow-existing --python $python_version ~/mtp_venv"
  install+="; ~/.local/bin/uv pip install --quiet --python ~/mtp_venv/bin/python"
  install+=" --reinstall-package mtp_jax $(q "$remote_dir/${wheel_name}[tpu]")"
  run "${gcloud[@]}" compute tpus tpu-vm ssh "$name" "${target[@]}" --command "$install"
else
  run "${gcloud[@]}" compute tpus tpu-vm scp "$config" "$name:$remote_dir/" "${target[@]}"
fi

# 4. train on every worker
train="cd $remote_dir && ~/mtp_venv/bin/mtp-train --config $(q "$config_name")"
train+=" --workdir $(q "$workdir")"
for o in "${overrides[@]}"; do
  train+=" $(q "$o")"
done
if [ "${MTP_DETACH:-0}" = 1 ]; then
  train="cd $remote_dir && nohup bash -c $(q "${train#"cd $remote_dir && "}") > train.log 2>&1 &"
fi
run "${gcloud[@]}" compute tpus tpu-vm ssh "$name" "${target[@]}" --command "$train"
