"""Host-process settings that only take effect when a process starts.

XLA:CPU allocates an executable's temporary buffers anew on every run, and glibc serves large
ones with fresh `mmap`s, so every train step page-faults its activations and logits back in,
4 KiB at a time. On the 2-core test machine that was ~20% of a V=32k train step's CPU time, in
the kernel. glibc's `glibc.malloc.hugetlb=1` tunable (glibc >= 2.35; older ones ignore it)
makes malloc back those buffers with transparent huge pages, 512x fewer faults:
`benchmarks/train_throughput.py` went from 1043 to 847 ms per D=1 step. glibc reads tunables
only at start-up, so the command-line entry points (`mtp-train`, `mtp-generate`, the
benchmarks) re-execute themselves once with it set. `MTP_JAX_TUNE_MALLOC=0` turns that off.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
SWITCH = "MTP_JAX_TUNE_MALLOC"  # "0": leave malloc alone; "done": already re-executed


def tuned_environ(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The environment to re-execute with, or None when there is nothing to do (not Linux
    with glibc, switched off, already done, or the user set the tunable themselves)."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    if environ.get(SWITCH) in ("0", "done"):
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in current:
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{current}:{TUNABLE}" if current else TUNABLE
    env[SWITCH] = "done"  # never re-execute twice, whatever glibc does with the tunable
    return env


def reexec_with_tuned_malloc() -> None:
    """Re-executes this process (same PID, same command line) with `TUNABLE` set, once.

    Call it first thing in a command-line entry point, before JAX is imported; never from
    library code that someone may call in-process.
    """
    env = tuned_environ(os.environ)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
