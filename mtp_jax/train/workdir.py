"""The workdir before a run: writable (checked before anything compiles) and held by one run
at a time (a lock file that the OS releases when its holder dies, however it dies)."""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator

import jax

from mtp_jax.train.checkpoint import CheckpointError, checkpoint_dir

LOCK_FILE = ".mtp_jax.lock"


class WorkdirInUseError(CheckpointError):
    """Another run holds the workdir's lock."""


def _is_url(path: str) -> bool:
    return "://" in path


def check_writable(workdir: str) -> None:
    """CheckpointError naming the directory unless checkpoints can be written under `workdir`
    (local paths: a probe file is created and removed; URLs are left to the first save)."""
    if _is_url(workdir):
        return
    directory = os.fspath(checkpoint_dir(workdir))
    probe = os.path.join(directory, f".write_probe.{os.getpid()}")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(
            f"checkpoint directory {directory} is not writable ({e.strerror or e}): fix its "
            "permissions or free space, or give another --workdir"
        ) from e


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
    """Holds WORKDIR/.mtp_jax.lock (an exclusive `flock`) for the run's lifetime.

    Process 0 takes it (the other processes of a multi-host run share the workdir). A second
    run on the same workdir gets `WorkdirInUseError` naming the holder (pid, host, start,
    command). A killed holder's lock is released by the OS: no stale lock to clean up. URL
    workdirs (gs://) have no lock.
    """
    if _is_url(workdir) or jax.process_index() != 0:
        yield
        return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise WorkdirInUseError(
                f"workdir {workdir} is in use by another run ({_holder(fd)}): wait for it to "
                f"end, stop it, or give another --workdir"
            ) from None
        os.ftruncate(fd, 0)
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
        }
        os.write(fd, json.dumps(info).encode())
        yield
    finally:
        os.close(fd)  # releases the lock


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 1 << 16, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "holder unknown"
    return (
        f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}: "
        f"{info.get('command')}"
    )
