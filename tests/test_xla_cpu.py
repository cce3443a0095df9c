"""The CPU tricks of mtp_jax/xla_cpu.py: the dense custom VJP, and the entry points' single
re-execution with glibc's huge-page malloc tunable."""

import importlib.metadata
import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtp_jax import xla_cpu
from mtp_jax.xla_cpu import MALLOC_SWITCH as SWITCH
from mtp_jax.xla_cpu import MALLOC_TUNABLE as TUNABLE
from mtp_jax.xla_cpu import tuned_environ

glibc_linux = pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc tunables only"
)

PROBE = (
    "import os; from mtp_jax.xla_cpu import reexec_with_tuned_malloc; "
    "print('pid', os.getpid(), flush=True); reexec_with_tuned_malloc(); "
    "print('tunables', os.environ.get('GLIBC_TUNABLES'))"
)


def _probe(**env):
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", SWITCH)}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env={**base, **env}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split("\n"), out.stderr


@glibc_linux
def test_tuned_environ():
    assert tuned_environ({})["GLIBC_TUNABLES"] == TUNABLE
    kept = tuned_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert kept["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{TUNABLE}"
    assert tuned_environ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None  # the user's
    assert tuned_environ({SWITCH: "0"}) is None
    assert tuned_environ({SWITCH: "done"}) is None


@glibc_linux
def test_reexec_keeps_pid_and_sets_the_tunable_once():
    (pid, again, tunables, *_), err = _probe()
    assert pid.startswith("pid ") and again == pid  # the same process, started twice
    assert tunables == f"tunables {TUNABLE}"
    assert err.count("restarting once with GLIBC_TUNABLES") == 1  # said once, on stderr
    off, err = _probe(**{SWITCH: "0"})
    assert off[0].startswith("pid ") and off[1] == "tunables None"
    assert "restarting" not in err


def test_console_scripts_use_the_reexecuting_entry():
    scripts = importlib.metadata.entry_points(group="console_scripts")
    assert scripts["mtp-train"].value == "mtp_jax.cli.train:entry"
    assert scripts["mtp-generate"].value == "mtp_jax.cli.generate:entry"
    assert scripts["mtp-prepare"].value == "mtp_jax.cli.prepare:main"


def test_dense_gradients_equal_autodiff_of_a_plain_dot():
    """`xla_cpu.dense` (custom VJP: weight gradient from a transposed copy, 2-D reshapes)
    against tensordot's autodiff, for 2-D and multi-axis contractions."""
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    for xs, ws, contract in [((24, 16), (16, 40), 1), ((2, 3, 4, 8), (4, 8, 5, 6), 2)]:
        x, w = jax.random.normal(kx, xs), jax.random.normal(kw, ws)
        ref_out, ref_vjp = jax.vjp(lambda a, b, c=contract: jnp.tensordot(a, b, c), x, w)
        out, vjp = jax.vjp(lambda a, b, c=contract: xla_cpu.dense(a, b, c), x, w)
        np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
        dy = jax.random.normal(kg, out.shape)
        for a, b in zip(vjp(dy), ref_vjp(dy), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # The transposed copy really is a copy behind a barrier (what makes XLA:CPU fast).
    hlo = jax.jit(jax.grad(lambda w: xla_cpu.dense(x, w, 2).sum())).lower(w).as_text()
    assert "opt-barrier" in hlo or "optimization_barrier" in hlo
