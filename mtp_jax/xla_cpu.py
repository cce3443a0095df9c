"""The CPU-only speed tricks, in quarantine: each says what it buys and where it was measured.

The model reads as the maths everywhere (`layers.dense(x, w)`, `nn.scan` over layers, a
decode step per layer); these functions decide, per compile, whether XLA:CPU gets a form it
runs faster. On TPUs and GPUs every one of them is a no-op or the plain form. Figures are from
the 2-core AVX-512 EPYC CI machine (`benchmarks/README.md` lists the benchmarks that give them).

- `dense`: 2-D matmuls whose weight gradient is taken from an explicitly transposed copy.
  SwiGLU MLP fwd+bwd ~2.5x; weight-gradient dots 60% -> 88% of the matmul peak
  (benchmarks/train_ceiling.py).
- `weight_grad`: the same transposed copy for the loss's d head: [256,1024]x[1024,32000]
  77% -> 95% of the peak (train_ceiling.py).
- `scan_unroll`: fully unrolled layer and depth scans: train step 4-10% faster
  (train_throughput.py).
- `unstack_before_decoding`: per-layer weight copies made once, outside the decode loop:
  slicing them inside it copied the whole weights every step, a third of a small model's
  decode step (decode.py).
- `reexec_with_tuned_malloc`: glibc huge-page malloc for the CLIs: a V=32k train step 19%
  faster, fewer 4 KiB page faults (train_throughput.py).
"""

from __future__ import annotations

import math
import os
import platform as _platform
import sys
from collections.abc import Mapping

import jax
import jax.numpy as jnp

Array = jax.Array


def compile_platform() -> str:
    """The platform the code being traced compiles for: the current mesh's (`jax.set_mesh`;
    an AOT compile for a TPU slice on a CPU host counts as TPU), else the default backend's."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def active() -> bool:
    """Whether the CPU tricks apply to the code being traced now."""
    return compile_platform() == "cpu"


# ------------------------------------------------------------------------------ matmuls


def transposed(x: Array) -> Array:
    """x [N, K] -> x.T [K, N] as a real transposed copy, not a transposed dot operand.

    XLA:CPU runs x.T @ g (a weight gradient) 1.2-1.5x slower than the same dot on an explicitly
    transposed copy. The barrier stops XLA folding the copy back into the dot; the copy is small
    next to the dot.
    """
    return jax.lax.optimization_barrier(jnp.transpose(x))


@jax.custom_vjp
def _dense2d(x: Array, w: Array) -> Array:
    return jnp.dot(x, w)


def _dense2d_fwd(x: Array, w: Array):
    return jnp.dot(x, w), (x, w)


def _dense2d_bwd(residuals, dy: Array):
    x, w = residuals
    return jnp.dot(dy, w.T).astype(x.dtype), jnp.dot(transposed(x), dy).astype(w.dtype)


_dense2d.defvjp(_dense2d_fwd, _dense2d_bwd)


def dense(x: Array, w: Array, contract: int = 1) -> Array:
    """`layers.dense` for XLA:CPU: x [..., *C] @ w [*C, *O] as one 2-D matmul
    [prod(...), prod(C)] x [prod(C), prod(O)] whose weight gradient is `transposed(x) @ dy`.

    XLA:CPU's backward of a dot_general with several contracting or batch-like axes
    materialises transposed copies of the activations; the 2-D form keeps every weight
    gradient a plain x^T @ dy.
    """
    lead, inner = x.shape[: x.ndim - contract], x.shape[x.ndim - contract :]
    out, k = w.shape[contract:], math.prod(inner)
    return _dense2d(x.reshape(-1, k), w.reshape(k, -1)).reshape(lead + out)


def weight_grad(x: Array, dy: Array) -> Array:
    """x [N, K], dy [N, M] -> x^T dy [K, M] in float32 (a hand-written weight gradient)."""
    lhs = transposed(x) if active() else x.T
    return jnp.dot(lhs, dy, preferred_element_type=jnp.float32)


# ------------------------------------------------------------------------------ loops


def scan_unroll(setting: int, length: int) -> int:
    """Iterations per loop trip of an `nn.scan` over `length` layers or depths.

    `setting` (`model.scan_unroll`) > 0 is taken as given (capped at `length`). 0 (auto)
    unrolls the whole scan when compiling for CPUs and keeps one iteration per trip elsewhere.
    On XLA:CPU a scan's backward slices each layer's saved activations out of the stacked
    buffer, and XLA fuses that dynamic slice into the weight gradient's transposed copy, which
    then runs as a slow element loop (a [2048, 1024] copy: 6 ms instead of 0.3); unrolled, the
    slices are static. On TPUs and GPUs, one layer per trip keeps compile times flat in depth.
    """
    if setting:
        return min(setting, length)
    return length if active() else 1


def unstack_before_decoding() -> bool:
    """Whether decoding should copy each layer's weights out of the stacked [n_layers, ...]
    arrays once, before its jitted loop (else the loop slices them itself).

    Inside a while loop XLA:CPU sinks the loop-invariant slices into the body and copies the
    whole weights at every step. Elsewhere the copies would double the weights' memory.
    """
    return jax.default_backend() == "cpu"


# ------------------------------------------------------------------------------ malloc

MALLOC_TUNABLE = "glibc.malloc.hugetlb=1"
MALLOC_SWITCH = "MTP_JAX_TUNE_MALLOC"  # "0": leave malloc alone; "done": already re-executed


def tuned_environ(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The environment to re-execute with, or None when there is nothing to do (not Linux
    with glibc, switched off, already done, or the user set the tunable themselves)."""
    if sys.platform != "linux" or _platform.libc_ver()[0] != "glibc":
        return None
    if environ.get(MALLOC_SWITCH) in ("0", "done"):
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in current:
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{current}:{MALLOC_TUNABLE}" if current else MALLOC_TUNABLE
    env[MALLOC_SWITCH] = "done"  # never re-execute twice, whatever glibc does with the tunable
    return env


def reexec_with_tuned_malloc(prog: str | None = None) -> None:
    """Re-executes this process (same PID, same command line) once with huge-page malloc.

    XLA:CPU allocates an executable's temporaries anew on every run and glibc serves large ones
    with fresh mmaps, so every step page-faults its activations back in, 4 KiB at a time;
    `glibc.malloc.hugetlb=1` (glibc >= 2.35; older ones ignore it) backs them with transparent
    huge pages. glibc reads tunables only at start-up, hence the re-exec. Says so once on
    stderr. Call it first thing in a command-line entry point, before JAX runs; never from
    library code. `MTP_JAX_TUNE_MALLOC=0` turns it off.
    """
    env = tuned_environ(os.environ)
    if env is None:
        return
    name = prog or os.path.basename(sys.argv[0] or "mtp_jax")
    print(
        f"{name}: restarting once with GLIBC_TUNABLES={MALLOC_TUNABLE} (huge-page malloc: "
        f"faster CPU steps); {MALLOC_SWITCH}=0 turns this off",
        file=sys.stderr,
        flush=True,
    )
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
