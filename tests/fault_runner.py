"""`mtp-train` with one injected fault, for the fault matrix (tests/test_faults.py,
benchmarks/faults.py).

    python tests/fault_runner.py FAULT [mtp-train arguments ...]

FAULT is one of
  none           a plain run
  kill@S:step    SIGKILL itself right after train step S
  kill@S:save    SIGKILL itself right after the (async) checkpoint save of step S started,
                 while its files are being written
  term@S:save    SIGTERM itself at the same moment
  term@S:eval    SIGTERM itself when the evaluation at step S starts
  fill@S         after step S, fill the file system that holds the workdir (a file of zeros
                 in WORKDIR until the OS answers ENOSPC)
  fill@S:save    fill it just before the checkpoint save of step S starts
  slow@SECONDS   sleep SECONDS after every step (for signals sent from outside)

The faults go in through `train(on_step=...)` and by wrapping `Checkpointer.save` and
`loop.evaluate` in this process: the library holds no test hook.
"""

import errno
import os
import signal
import sys
import time

import mtp_jax.train.loop as loop
from mtp_jax.cli.train import main
from mtp_jax.train.checkpoint import Checkpointer


def _workdir(argv: list[str]) -> str:
    for i, a in enumerate(argv):
        if a == "--workdir":
            return argv[i + 1]
        if a.startswith("--workdir="):
            return a.split("=", 1)[1]
    raise SystemExit("fault_runner: no --workdir")


def fill_disk(directory: str) -> int:
    """Writes WORKDIR/filler until the file system is full; returns the bytes written."""
    written = 0
    block = b"\0" * (1 << 16)
    with open(os.path.join(directory, "filler"), "wb", buffering=0) as f:
        while True:
            try:
                written += f.write(block)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                if len(block) == 1:
                    return written
                block = block[: len(block) // 2]


def install(fault: str, workdir: str):
    """Arms `fault`; returns the on_step hook (or None)."""
    if fault == "none":
        return None
    kind, _, where = fault.partition("@")
    if kind == "slow":
        delay = float(where)
        return lambda step: time.sleep(delay)
    at, _, phase = where.partition(":")
    at = int(at)
    sig = {"kill": signal.SIGKILL, "term": signal.SIGTERM}.get(kind)
    if kind == "fill" and phase == "save":
        save = Checkpointer.save

        def fill_then_save(self, step, *args, **kwargs):
            if step == at:
                self.wait()  # the previous checkpoint is complete: it is the one to keep
                fill_disk(workdir)
            return save(self, step, *args, **kwargs)

        Checkpointer.save = fill_then_save
        return None
    if kind == "fill":

        def fill(step):
            if step == at:
                time.sleep(1.0)  # let the last async save commit: it is the one to keep
                fill_disk(workdir)

        return fill
    if phase == "step":
        return lambda step: os.kill(os.getpid(), sig) if step == at else None
    if phase == "save":
        save = Checkpointer.save

        def save_then_signal(self, step, *args, **kwargs):
            started = save(self, step, *args, **kwargs)
            if step == at:
                os.kill(os.getpid(), sig)
            return started

        Checkpointer.save = save_then_signal
        return None
    if phase == "eval":
        evaluate = loop.evaluate
        calls = {"step": 0}

        def on_step(step):
            calls["step"] = step

        def evaluate_after_signal(*args, **kwargs):
            if calls["step"] == at:
                os.kill(os.getpid(), sig)
            return evaluate(*args, **kwargs)

        loop.evaluate = evaluate_after_signal
        return on_step
    raise SystemExit(f"fault_runner: unknown fault {fault!r}")


if __name__ == "__main__":
    fault, argv = sys.argv[1], sys.argv[2:]
    sys.exit(main(argv, on_step=install(fault, _workdir(argv))))
