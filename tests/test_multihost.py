"""Real multi-process runs on localhost: 2 processes x 2 CPU devices (jax.distributed over
gloo) against 1 process x 4 devices, checkpoints across process counts, a failing host.

Every process gets a fresh port and a timeout, so nothing here can hang CI.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import CONFIGS, TINY_TRAIN

pytestmark = pytest.mark.slow

# Constant LR and lambda: runs that stop at different steps follow the same schedule.
OVERRIDES = [o for o in TINY_TRAIN if not o.startswith(("train.steps", "checkpoint.every"))] + [
    "train.schedule=constant",
    "train.warmup_steps=0",
    "train.eval_every=3",
    "checkpoint.every=3",
    "checkpoint.keep=10",
]
KEYS = ("loss", "loss/depth_0", "loss/depth_2", "accuracy/depth_1", "grad_norm")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir, store, steps, processes, devices_per_process, delay=0.0):
    port = _free_port()
    procs = []
    for i in range(processes):
        env = dict(os.environ)
        env.update(
            XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
            JAX_PLATFORMS="cpu",
        )
        cmd = [
            sys.executable,
            str(CONFIGS.parent / "tests" / "slow_train.py"),
            str(delay),
            "--config",
            str(CONFIGS / "smoke.py"),
            "--workdir",
            str(workdir),
            "--no_sample",
            *[f"--config.{o}" for o in OVERRIDES],
            f"--config.data.path={store}",
            f"--config.train.steps={steps}",
        ]
        if processes > 1:
            cmd += [
                f"--coordinator_address=127.0.0.1:{port}",
                f"--num_processes={processes}",
                f"--process_id={i}",
                "--heartbeat_timeout=10",
            ]
        procs.append(
            subprocess.Popen(
                cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
        )
    return procs


def _finish(procs, timeout=300):
    try:
        errs = [p.communicate(timeout=timeout)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, err in zip(procs, errs, strict=True):
        assert p.returncode == 0, err[-3000:]


def _run(workdir, store, steps, processes, devices_per_process):
    _finish(_launch(workdir, store, steps, processes, devices_per_process))


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}  # last record per step


def _assert_same(a, b, steps, keys=KEYS):
    for step in steps:
        for key in keys:
            np.testing.assert_allclose(a[step][key], b[step][key], rtol=2e-5, err_msg=str(step))


@pytest.fixture(scope="module")
def reference(code_store, tmp_path_factory):
    """One process with 4 devices, 9 steps straight."""
    workdir = tmp_path_factory.mktemp("one_process")
    _run(workdir, code_store, 9, processes=1, devices_per_process=4)
    return _records(workdir)


def test_two_processes_equal_one_process_and_checkpoints_cross_process_counts(
    reference, code_store, tmp_path
):
    two, one = tmp_path / "two_then_one", tmp_path / "one_then_two"
    _run(two, code_store, 6, processes=2, devices_per_process=2)
    two_first = _records(two)
    assert sorted(two_first) == [1, 2, 3, 4, 5, 6]
    _assert_same(two_first, reference, range(1, 7))
    _assert_same(two_first, reference, (3, 6), keys=("eval/loss/depth_0", "eval/loss/depth_2"))
    assert sorted(int(d) for d in os.listdir(two / "checkpoints")) == [3, 6]

    # The 2-process checkpoint continues in 1 process; a 1-process one continues in 2.
    _run(two, code_store, 9, processes=1, devices_per_process=4)
    _run(one, code_store, 6, processes=1, devices_per_process=4)
    _run(one, code_store, 9, processes=2, devices_per_process=2)
    for workdir in (two, one):
        records = _records(workdir)
        assert sorted(records) == list(range(1, 10))
        _assert_same(records, reference, range(7, 10))


def test_a_failing_host_stops_the_other_and_both_resume(reference, code_store, tmp_path):
    procs = _launch(tmp_path, code_store, 400, processes=2, devices_per_process=2, delay=0.2)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            assert all(p.poll() is None for p in procs), "a process ended early"
            ckpts = (
                os.listdir(tmp_path / "checkpoints") if (tmp_path / "checkpoints").exists() else []
            )
            if metrics.exists() and any(c.isdigit() and int(c) >= 3 for c in ckpts):
                steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
                if steps and steps[-1] >= 5:
                    break
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGKILL)
        start = time.time()
        procs[0].wait(timeout=90)  # bounded: the heartbeat timeout is 10 s
        waited = time.time() - start
        err = procs[0].stderr.read()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode != 0
    assert waited < 60
    assert "heartbeat" in err.lower() or "task 1" in err.lower(), err[-2000:]
    saved = max(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert saved >= 3

    # Restart both: they resume from the newest checkpoint and finish.
    _run(tmp_path, code_store, saved + 3, processes=2, devices_per_process=2)
    records = _records(tmp_path)
    assert max(records) == saved + 3
    assert int(max(d for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())) == saved + 3
