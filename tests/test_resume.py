"""Resume after SIGKILL is bit-identical; SIGTERM saves the current step and exits cleanly.

Real mtp-train processes (`tests/slow_train.py`: `mtp_jax.cli.train.main` with an `on_step`
callback that slows each step, so that a signal can land mid-run).
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import CONFIGS, TINY_TRAIN

from mtp_jax.train import load_checkpoint
from mtp_jax.train.metrics import read_metrics

pytestmark = pytest.mark.slow

STEPS = 24
LOSS_KEYS = (
    "loss",
    "loss/depth_0",
    "loss/depth_1",
    "loss/depth_2",
    "accuracy/depth_2",
    "grad_norm",
    "param_norm",
)


SLOW_TRAIN = CONFIGS.parent / "tests" / "slow_train.py"


def _command(workdir, store, delay=0.0):
    overrides = [o for o in TINY_TRAIN if not o.startswith(("train.steps", "checkpoint."))]
    return [
        sys.executable,
        str(SLOW_TRAIN),
        str(delay),
        "--config",
        str(CONFIGS / "smoke.py"),
        "--workdir",
        str(workdir),
        "--no_sample",
        *[f"--config.{o}" for o in overrides],
        f"--config.data.path={store}",
        f"--config.train.steps={STEPS}",
        "--config.checkpoint.every=6",
        "--config.checkpoint.keep=10",
    ]


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, like a user's laptop run
    return env


def _run(workdir, store, timeout=240):
    proc = subprocess.run(
        _command(workdir, store), env=_env(), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _start_and_signal(workdir, store, sig, when, timeout=240):
    """Starts a slowed run and sends `sig` once `when(last_logged_step, checkpoint_steps)`."""
    proc = subprocess.Popen(
        _command(workdir, store, delay=0.25),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + timeout
    metrics = os.path.join(workdir, "metrics.jsonl")
    ckpt_dir = os.path.join(workdir, "checkpoints")
    try:
        while time.time() < deadline:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            step = 0
            if os.path.exists(metrics):
                with open(metrics) as f:
                    lines = [ln for ln in f if ln.strip()]
                step = json.loads(lines[-1])["step"] if lines else 0
            ckpts = (
                [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()]
                if os.path.isdir(ckpt_dir)
                else []
            )
            if when(step, ckpts):
                proc.send_signal(sig)
                _, err = proc.communicate(timeout=120)
                return proc.returncode, err, step
            time.sleep(0.05)
        raise AssertionError("the run never reached the point to signal it")
    finally:
        if proc.poll() is None:
            proc.kill()


def _by_step(workdir):
    """The last record per step (a resumed run re-logs the steps after its checkpoint)."""
    return {r["step"]: r for r in read_metrics(str(workdir))}


@pytest.fixture(scope="module")
def straight(code_store, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    _run(workdir, code_store)
    return workdir


def test_resume_after_sigkill_is_bit_identical(straight, code_store, tmp_path):
    kill_at = random.Random().randint(8, 20)
    code, _, killed_at = _start_and_signal(
        tmp_path,
        code_store,
        signal.SIGKILL,
        lambda step, ckpts: step >= kill_at and any(c >= 6 for c in ckpts),
    )
    assert code == -signal.SIGKILL
    assert killed_at < STEPS
    _, straight_params = load_checkpoint(str(straight))
    _, partial_params = load_checkpoint(str(tmp_path))
    # Before resuming, the killed run's newest state differs from the straight run's final one.
    assert not all(
        np.array_equal(a, b)
        for a, b in zip(
            jax.tree.leaves(straight_params), jax.tree.leaves(partial_params), strict=True
        )
    )

    _run(tmp_path, code_store)
    _, resumed_params = load_checkpoint(str(tmp_path))
    for a, b in zip(jax.tree.leaves(straight_params), jax.tree.leaves(resumed_params), strict=True):
        np.testing.assert_array_equal(a, b)  # bit-identical
    want, got = _by_step(straight), _by_step(tmp_path)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:
        for key in LOSS_KEYS:
            assert got[step][key] == want[step][key], (step, key)


def test_sigterm_saves_current_step_and_exits_cleanly(straight, code_store, tmp_path):
    code, err, signalled_at = _start_and_signal(
        tmp_path, code_store, signal.SIGTERM, lambda step, ckpts: step >= 8
    )
    assert code == 0, err[-3000:]
    assert "preempted: checkpoint saved at step" in err
    saved = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    last_logged = max(_by_step(tmp_path))
    assert saved[-1] == last_logged >= signalled_at  # the step it was at, not the last periodic
    # And it resumes to the same end as the straight run.
    _run(tmp_path, code_store)
    _, straight_params = load_checkpoint(str(straight))
    _, resumed_params = load_checkpoint(str(tmp_path))
    for a, b in zip(jax.tree.leaves(straight_params), jax.tree.leaves(resumed_params), strict=True):
        np.testing.assert_array_equal(a, b)
