#!/usr/bin/env bash
# GPU check, ready to run on a machine that cannot reach a package index.
#
#   bash benchmarks/gpu_check.sh [gpu_check.py flags]   # e.g. --configs gpu_125m --steps 30
#   bash benchmarks/gpu_check.sh --dry-run              # tiny model, 3 steps (CPU is fine)
#   bash benchmarks/gpu_check.sh --check-env            # only set up and check the imports
#   bash benchmarks/gpu_check.sh --make-wheelhouse      # on a machine WITH network, first
#
# Prints (benchmarks/gpu_check.py) a markdown table: for gpu_125m and gpu_1b (a row saying so
# where a config does not fit in memory), D=0 and D=1 side by side, the real donated train step
# on one GPU with synthetic tokens: step ms (best, median), tokens/s, MFU % of the chip's
# data-sheet peak, the MTP on/off step-time ratio; then greedy self-speculative decoding at
# D=1..3 against plain decoding: tokens/s, speedup, tokens per step, identical tokens.
# gpu_1b is an 8-GPU config (global batch 256): `--set gpu_1b:data.batch_size=32` gives it a
# one-GPU share.
#
# What it does: (1) picks $PYTHON (default python3); (2) if benchmarks/wheelhouse/ (or
# $WHEELHOUSE) holds wheels, installs those whose distribution is not installed yet with
# `pip install --no-index --no-deps` into $GPU_CHECK_SITE (default /tmp/mtp_jax_gpu_check_site-
# UID), which goes on PYTHONPATH (the system site-packages stay untouched); (3) puts the repo
# root on PYTHONPATH (nothing to install); (4) checks that jax, flax, optax, orbax.checkpoint,
# tensorstore, grain, ml_collections, absl, tqdm and tensorboardX import, else names the
# missing ones and exits 2; (5) prints `nvidia-smi -L`; (6) runs benchmarks/gpu_check.py.
#
# The machine this is meant for has jax (CUDA), flax, optax, orbax and tensorstore but not
# grain & co. Build the wheelhouse where there is network (any OS: it downloads manylinux
# x86_64 wheels for CPython $WHEELHOUSE_PYTHON, default 3.12), then copy benchmarks/wheelhouse/
# over with the repo:
#   bash benchmarks/gpu_check.sh --make-wheelhouse
# XLA may use up to $XLA_PYTHON_CLIENT_MEM_FRACTION (set here to 0.92 unless set) of GPU memory.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
WHEELHOUSE="${WHEELHOUSE:-$REPO/benchmarks/wheelhouse}"
SITE="${GPU_CHECK_SITE:-${TMPDIR:-/tmp}/mtp_jax_gpu_check_site-$(id -u)}"
# What the GPU machine lacks: grain and its requirements (grain's Requires-Dist: absl-py,
# array-record, cloudpickle, etils[epath,epy] -> fsspec, typing_extensions, zipp; numpy,
# portpicker -> psutil; protobuf), ml_collections (absl-py, PyYAML) and mtp_jax's small
# pure-python requirements. jax, flax, optax, orbax-checkpoint, tensorstore, numpy, protobuf
# and PyYAML come with the machine's jax/flax/orbax and are left out.
PACKAGES=(
  "grain>=0.2.18,<0.3" "array-record>=0.8.1" cloudpickle portpicker psutil
  "ml_collections>=1.1.0,<2" "absl-py>=2.1" etils fsspec zipp typing_extensions
  "tqdm>=4.66" "tensorboardX>=2.6" packaging
)
MODULES=(jax flax optax orbax.checkpoint tensorstore grain ml_collections absl tqdm tensorboardX)
# Hidden, for tests: extra modules to require (space-separated).
read -r -a EXTRA <<< "${GPU_CHECK_EXTRA_MODULES:-}"

make_wheelhouse=0
check_only=0
ARGS=()
for arg in "$@"; do
  case "$arg" in
    --make-wheelhouse) make_wheelhouse=1 ;;
    --check-env) check_only=1 ;;
    *) ARGS+=("$arg") ;;
  esac
done

if ! command -v "$PY" > /dev/null; then
  echo "gpu_check: no Python interpreter '$PY' on PATH (set PYTHON=...)" >&2
  exit 2
fi

if ((make_wheelhouse)); then
  mkdir -p "$WHEELHOUSE"
  platforms=()
  for p in manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_27_x86_64 \
    manylinux_2_28_x86_64; do
    platforms+=(--platform "$p")
  done
  "$PY" -m pip download --no-deps --only-binary=:all: \
    --python-version "${WHEELHOUSE_PYTHON:-3.12}" "${platforms[@]}" \
    -d "$WHEELHOUSE" "${PACKAGES[@]}"
  echo "gpu_check: wheelhouse $WHEELHOUSE ($(du -sh "$WHEELHOUSE" | cut -f1)):"
  ls "$WHEELHOUSE"
  exit 0
fi

# --- wheels from the wheelhouse, those not installed yet, into $SITE (not site-packages)
shopt -s nullglob
wheels=("$WHEELHOUSE"/*.whl)
shopt -u nullglob
if ((${#wheels[@]})); then
  todo=()
  while IFS= read -r line; do
    [[ -n "$line" ]] && todo+=("$line")
  done < <("$PY" - "${wheels[@]}" << 'EOF'
import importlib.metadata, os, re, sys

norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
installed = {norm(d.metadata["Name"] or "") for d in importlib.metadata.distributions()}
for wheel in sys.argv[1:]:
    if norm(os.path.basename(wheel).split("-")[0]) not in installed:
        print(wheel)
EOF
  )
  if ((${#todo[@]})); then
    stamp="$(printf '%s\n' "${todo[@]##*/}" | sort)"
    if [[ ! -f "$SITE/.gpu_check_wheels" || "$(cat "$SITE/.gpu_check_wheels")" != "$stamp" ]]; then
      echo "gpu_check: installing ${#todo[@]} wheels from $WHEELHOUSE into $SITE" >&2
      rm -rf "$SITE"
      mkdir -p "$SITE"
      if "$PY" -m pip --version > /dev/null 2>&1; then
        PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 \
          "$PY" -m pip install --quiet --no-index --no-deps --find-links "$WHEELHOUSE" \
          --target "$SITE" "${todo[@]}"
      else  # no pip: a wheel is a zip of what goes into site-packages
        "$PY" -c 'import sys, zipfile
for w in sys.argv[2:]:
    zipfile.ZipFile(w).extractall(sys.argv[1])' "$SITE" "${todo[@]}"
      fi
      printf '%s\n' "$stamp" > "$SITE/.gpu_check_wheels"
    fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi

# --- the repo itself, importable without installing it
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"

# --- every module the check and mtp-train need
"$PY" - "${MODULES[@]}" ${EXTRA[@]+"${EXTRA[@]}"} << 'EOF' || exit 2
import importlib, importlib.metadata, platform, sys

missing, versions = [], []
for name in sys.argv[1:]:
    try:
        module = importlib.import_module(name)
    except Exception as e:  # a broken install counts as missing
        missing.append(f"{name} ({type(e).__name__}: {e})")
        continue
    version = getattr(module, "__version__", "")
    try:
        version = version or importlib.metadata.version(name.split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        pass
    versions.append(f"{name} {version}".strip())
if missing:
    print(
        f"gpu_check: missing Python module(s): {'; '.join(missing)}. Build the wheelhouse on a "
        "machine with network (bash benchmarks/gpu_check.sh --make-wheelhouse), copy "
        "benchmarks/wheelhouse/ here (or set WHEELHOUSE=DIR) and run this again; it brings "
        "grain, ml_collections, absl-py, tqdm, tensorboardX and their needs, not jax, flax, "
        "optax, orbax-checkpoint, tensorstore, numpy, protobuf or PyYAML.",
        file=sys.stderr,
    )
    sys.exit(2)
print(f"gpu_check: python {platform.python_version()}; " + ", ".join(versions), file=sys.stderr)
EOF

if command -v nvidia-smi > /dev/null; then
  nvidia-smi -L || true
fi
if ((check_only)); then
  echo "gpu_check: environment OK"
  exit 0
fi
exec "$PY" "$REPO/benchmarks/gpu_check.py" ${ARGS[@]+"${ARGS[@]}"}
