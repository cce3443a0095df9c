"""The entry points re-execute once with glibc's huge-page malloc tunable (mtp_jax/hostenv.py)."""

import importlib.metadata
import os
import platform
import subprocess
import sys

import pytest

from mtp_jax.hostenv import SWITCH, TUNABLE, tuned_environ

glibc_linux = pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc tunables only"
)

PROBE = (
    "import os; from mtp_jax.hostenv import reexec_with_tuned_malloc; "
    "print('pid', os.getpid(), flush=True); reexec_with_tuned_malloc(); "
    "print('tunables', os.environ.get('GLIBC_TUNABLES'))"
)


def _probe(**env):
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", SWITCH)}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env={**base, **env}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split("\n")


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
    pid, again, tunables = _probe()[:3]
    assert pid.startswith("pid ") and again == pid  # the same process, started twice
    assert tunables == f"tunables {TUNABLE}"
    off = _probe(**{SWITCH: "0"})
    assert off[0].startswith("pid ") and off[1] == "tunables None"


def test_console_scripts_use_the_reexecuting_entry():
    scripts = importlib.metadata.entry_points(group="console_scripts")
    assert scripts["mtp-train"].value == "mtp_jax.train.cli:entry"
    assert scripts["mtp-generate"].value == "mtp_jax.inference.cli:entry"
