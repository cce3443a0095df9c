"""The launch scripts: syntax, the commands their --dry-run prints, and the local
multi-process launcher's waiting and failure handling (with a stand-in for mtp-train)."""

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import REPO, TINY_TRAIN

LAUNCH = REPO / "launch"
SCRIPTS = ["local.sh", "multiprocess_local.sh", "tpu_pod.sh", "slurm_gpu.sbatch"]


def run(*args, env=None, timeout=60, check=True):
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        ["bash", *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=REPO,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def lines(out: str) -> list[list[str]]:
    return [shlex.split(line) for line in out.strip().splitlines()]


def flag(argv: list[str], name: str) -> str:
    """The value of `--name VALUE` or `--name=VALUE` in argv."""
    for i, a in enumerate(argv):
        if a == name:
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    raise AssertionError(f"{name} not in {argv}")


@pytest.mark.parametrize("script", SCRIPTS)
def test_syntax_and_header(script):
    path = LAUNCH / script
    run("-n", path)
    text = path.read_text()
    assert "set -euo pipefail" in text
    header = text.split("set -euo")[0]
    assert f"launch/{script}" in header and "--dry-run" in header  # how to run it
    if script.endswith(".sh"):
        assert os.stat(path).st_mode & stat.S_IXUSR


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck():
    proc = subprocess.run(
        ["shellcheck", "-x", *(f"launch/{s}" for s in SCRIPTS)],
        capture_output=True,
        text=True,
        cwd=LAUNCH.parent,
    )
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("script, n", [("local.sh", 2), ("multiprocess_local.sh", 3)])
def test_missing_arguments_print_usage(script, n):
    proc = run(LAUNCH / script, *["x"] * (n - 1), check=False)
    assert proc.returncode == 2
    assert "Run" in proc.stderr


def test_local_dry_run():
    proc = run(
        LAUNCH / "local.sh",
        "configs/smoke.py",
        "runs/x",
        "--config.train.steps=5",
        "--config.data.path=a b",
        "--dry-run",
    )
    (argv,) = lines(proc.stdout)
    assert argv == [
        "mtp-train",
        "--config",
        "configs/smoke.py",
        "--workdir",
        "runs/x",
        "--config.train.steps=5",
        "--config.data.path=a b",
    ]


def test_multiprocess_local_dry_run():
    proc = run(
        LAUNCH / "multiprocess_local.sh",
        "3",
        "configs/smoke.py",
        "/tmp/w",
        "--config.train.steps=5",
        "--dry-run",
        env={"DEVICES_PER_PROCESS": "4"},
    )
    commands = lines(proc.stdout)
    assert commands[-1] == ["wait"]
    commands = commands[:-1]
    assert len(commands) == 3
    ports = set()
    for i, argv in enumerate(commands):
        assert "JAX_PLATFORMS=cpu" in argv
        assert "XLA_FLAGS=--xla_force_host_platform_device_count=4" in argv
        assert "mtp-train" in argv
        assert flag(argv, "--config") == "configs/smoke.py"
        assert flag(argv, "--num_processes") == "3"
        assert flag(argv, "--process_id") == str(i)
        host, port = flag(argv, "--coordinator_address").split(":")
        assert host == "127.0.0.1" and port.isdigit()
        ports.add(port)
        assert "--config.train.steps=5" in argv
        assert argv[-2:] == ["2>&1", "&"] and argv[-3] == f"/tmp/w/logs/process_{i}.log"
    assert len(ports) == 1

    fixed = run(
        LAUNCH / "multiprocess_local.sh", "2", "c.py", "w", "--dry-run", env={"MTP_PORT": "23456"}
    )
    assert all(
        flag(a, "--coordinator_address") == "127.0.0.1:23456" for a in lines(fixed.stdout)[:-1]
    )
    bad = run(LAUNCH / "multiprocess_local.sh", "zero", "c.py", "w", "--dry-run", check=False)
    assert bad.returncode == 2 and "positive integer" in bad.stderr


def _remote(argv: list[str]) -> list[str]:
    return shlex.split(flag(argv, "--command"))


def test_tpu_pod_dry_run():
    proc = run(
        LAUNCH / "tpu_pod.sh",
        "my-tpu",
        "us-east5-a",
        "my-proj",
        "configs/tpu_7b.py",
        "gs://bucket/runs/7b",
        "--config.train.steps=10",
        "--config.data.path=gs://b/it's here",
        "--dry-run",
    )
    commands = lines(proc.stdout)
    assert "not a gs://" not in proc.stderr
    build, mkdir, scp, install, train = commands
    assert build[:4] == ["python3", "-m", "pip", "wheel"]
    for argv in commands[1:]:
        assert argv[:4] == ["gcloud", "compute", "tpus", "tpu-vm"]
        assert argv[5] == "my-tpu" or "my-tpu:mtp_jax_run/" in argv
        assert flag(argv, "--zone") == "us-east5-a"
        assert flag(argv, "--project") == "my-proj"
        assert "--worker=all" in argv
    assert scp[4] == "scp" and "configs/tpu_7b.py" in scp
    assert any(a.endswith(".whl") for a in scp)
    assert any(a.endswith(".whl[tpu]") for a in _remote(install))
    remote = _remote(train)
    assert remote[:3] == ["cd", "mtp_jax_run", "&&"]
    assert remote[3].endswith("mtp_venv/bin/mtp-train")
    assert flag(remote, "--config") == "tpu_7b.py"
    assert flag(remote, "--workdir") == "gs://bucket/runs/7b"
    assert remote[-2:] == ["--config.train.steps=10", "--config.data.path=gs://b/it's here"]


def test_tpu_pod_warns_on_local_workdir():
    proc = run(
        LAUNCH / "tpu_pod.sh",
        "t",
        "z",
        "p",
        "configs/tpu_7b.py",
        "/tmp/runs",
        "--dry-run",
        env={"MTP_SKIP_INSTALL": "1", "MTP_DETACH": "1"},
    )
    assert "not a gs:// path" in proc.stderr
    scp, train = lines(proc.stdout)
    assert scp[4] == "scp"
    remote = _remote(train)
    assert "nohup" in remote and remote[-4:] == [">", "train.log", "2>&1", "&"]


def test_slurm_dry_run_outside_a_job():
    proc = run(
        LAUNCH / "slurm_gpu.sbatch",
        "--dry-run",
        "configs/gpu_1b.py",
        "/shared/r",
        "--config.train.steps=3",
        env={"MTP_VENV": "/tmp/no_such_venv"},
    )
    *install, srun = lines(proc.stdout)
    assert any("[gpu]" in a for argv in install for a in argv)
    assert srun[0] == "srun" and srun[-3:-1] == ["bash", "-c"]
    task = shlex.split(srun[-1])
    assert task[0] == "/tmp/no_such_venv/bin/mtp-train"
    assert flag(task, "--coordinator_address").startswith("NODE0:")
    assert flag(task, "--num_processes") == "2"
    assert flag(task, "--process_id") == "$SLURM_PROCID"  # expanded by each task
    assert task[-1] == "--config.train.steps=3"


def test_slurm_dry_run_in_a_job(tmp_path):
    scontrol = tmp_path / "scontrol"
    scontrol.write_text("#!/bin/sh\nprintf 'gpu-node-07\\ngpu-node-08\\n'\n")
    scontrol.chmod(0o755)
    env = {
        "PATH": f"{tmp_path}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "gpu-node-[07-08]",
        "SLURM_NTASKS": "2",
        "SLURM_JOB_ID": "123456",
        "MTP_SKIP_INSTALL": "1",
    }
    proc = run(LAUNCH / "slurm_gpu.sbatch", "--dry-run", "configs/gpu_1b.py", "/shared/r", env=env)
    (srun,) = lines(proc.stdout)
    task = shlex.split(srun[-1])
    assert task[0] == "mtp-train"
    assert flag(task, "--coordinator_address") == f"gpu-node-07:{20000 + 123456 % 20000}"
    assert flag(task, "--num_processes") == "2"


# ---------------------------------------------------------- multiprocess_local.sh for real

FAKE_TRAIN = textwrap.dedent(
    """\
    import sys, time
    args = dict(a.split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
    pid = int(args["--process_id"])
    print("process", pid, "of", args["--num_processes"], "at", args["--coordinator_address"],
          flush=True)
    if pid == int(args.get("--config.fail_id", -1)):
        time.sleep(0.5)
        sys.exit(7)
    time.sleep(float(args.get("--config.sleep", 0)))
    """
)


@pytest.fixture
def fake_train(tmp_path):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    return f"{shlex.quote(sys.executable)} {script}"


def test_multiprocess_local_runs_and_waits(tmp_path, fake_train):
    proc = run(
        LAUNCH / "multiprocess_local.sh",
        "3",
        "configs/smoke.py",
        tmp_path / "w",
        "--config.sleep=0.3",
        env={"MTP_TRAIN": fake_train},
    )
    assert "process 0 of 3 at 127.0.0.1:" in proc.stdout  # process 0 is shown
    for i in range(3):
        log = (tmp_path / "w" / "logs" / f"process_{i}.log").read_text()
        assert f"process {i} of 3" in log


def test_multiprocess_local_stops_the_rest_when_one_fails(tmp_path, fake_train):
    start = time.monotonic()
    proc = run(
        LAUNCH / "multiprocess_local.sh",
        "3",
        "configs/smoke.py",
        tmp_path / "w",
        "--config.fail_id=1",
        "--config.sleep=60",
        env={"MTP_TRAIN": fake_train},
        check=False,
    )
    assert proc.returncode == 7
    assert time.monotonic() - start < 30  # the sleeping processes were stopped
    assert "process 1 failed (exit 7)" in proc.stderr


@pytest.mark.slow
def test_multiprocess_local_trains_two_processes(tmp_path, code_store):
    """The real mtp-train over 2 processes x 2 CPU devices, as a pod would run it."""
    overrides = [f"--config.{o}" for o in [*TINY_TRAIN, f"data.path={code_store}"]]
    proc = run(
        LAUNCH / "multiprocess_local.sh",
        "2",
        "configs/smoke.py",
        tmp_path / "w",
        *overrides,
        "--no_sample",
        env={"MTP_TRAIN": f"{shlex.quote(sys.executable)} -m mtp_jax.cli.train"},
        timeout=600,
        check=False,
    )
    logs = {i: (tmp_path / "w" / "logs" / f"process_{i}.log").read_text() for i in range(2)}
    assert proc.returncode == 0, proc.stderr + "\n".join(logs.values())
    # Both processes ran all 6 steps into one shared workdir (process 0 writes the metrics).
    assert (tmp_path / "w" / "checkpoints" / "6").is_dir()
    steps = [json.loads(line)["step"] for line in (tmp_path / "w" / "metrics.jsonl").open()]
    assert steps[-1] == 6
    for log in logs.values():
        assert "Traceback" not in log
