"""benchmarks/gpu_check.sh: the dry run end to end on the CPU, the missing-module message and
the offline install from a wheelhouse.

Each test runs the script as a subprocess on one CPU device (XLA_FLAGS dropped), with this
interpreter as $PYTHON and an empty or test-made wheelhouse, so nothing is downloaded.
"""

import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile

import pytest
from conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def _env(tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(
        JAX_PLATFORMS="cpu",
        PYTHON=sys.executable,
        WHEELHOUSE=str(tmp_path / "no_wheelhouse"),
        GPU_CHECK_SITE=str(tmp_path / "site"),
    )
    env.pop("GPU_CHECK_EXTRA_MODULES", None)
    env.update(extra)
    return env


def _run(tmp_path, *args, timeout=300, **extra) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        env=_env(tmp_path, **extra),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
    )


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    rows = tmp_path / "rows.json"
    proc = _run(tmp_path, "--dry-run", "--json", str(rows))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "| config | D | step ms (best) | step ms (median) | tokens/s | MFU % |" in out
    assert "| tiny | 0 |" in out and "| tiny | 1 |" in out
    assert "measured float32" in out  # a CPU: no data-sheet peak, and the output says so
    assert "## Decoding" in out and "Random weights" in out
    speculative = [line for line in out.splitlines() if line.startswith("| speculative |")]
    assert len(speculative) == 3, out
    assert all(line.endswith("| yes |") for line in speculative), out

    data = json.loads(rows.read_text())
    train = {r["D"]: r for r in data["train"]}
    assert [r["status"] for r in data["train"]] == ["ok", "ok"]
    assert train[1]["mtp_on_off"] > 0 and train[0]["tokens_per_sec"] > 0
    assert 0 < train[0]["mfu_percent"] and train[1]["step_ms_best"] <= train[1]["step_ms_median"]
    decode = data["decode"]["rows"]
    assert [r["D"] for r in decode] == [0, 1, 2, 3]
    assert all(r["identical"] and r["mean_accepted"] >= 1 for r in decode[1:])


def test_missing_module_is_named(tmp_path):
    proc = _run(
        tmp_path, "--dry-run", timeout=120, GPU_CHECK_EXTRA_MODULES="no_such_module_for_gpu_check"
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "no_such_module_for_gpu_check" in line]
    assert len(lines) == 1, proc.stderr
    assert "--make-wheelhouse" in lines[0]
    assert "| config |" not in proc.stdout  # stopped before the check ran


def _fake_wheel(directory, name: str = "gpu_check_fake_mod", version: str = "0.1") -> None:
    """A minimal pure-python wheel of module `name` in `directory`."""
    files = {
        f"{name}/__init__.py": f'__version__ = "{version}"\n',
        f"{name}-{version}.dist-info/METADATA": (
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        ),
        f"{name}-{version}.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{name}-{version}.dist-info/RECORD,,")
    files[f"{name}-{version}.dist-info/RECORD"] = "\n".join(record) + "\n"
    directory.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(directory / f"{name}-{version}-py3-none-any.whl", "w") as z:
        for path, text in files.items():
            z.writestr(path, text)


def test_wheelhouse_installs_offline_into_its_own_dir(tmp_path):
    wheelhouse = tmp_path / "wheelhouse"
    _fake_wheel(wheelhouse)
    proc = _run(
        tmp_path,
        "--check-env",
        timeout=120,
        WHEELHOUSE=str(wheelhouse),
        GPU_CHECK_EXTRA_MODULES="gpu_check_fake_mod",
        PIP_NO_INDEX="1",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "environment OK" in proc.stdout
    assert "installing 1 wheels" in proc.stderr and "gpu_check_fake_mod 0.1" in proc.stderr
    assert (tmp_path / "site" / "gpu_check_fake_mod" / "__init__.py").is_file()


def _gpu_check_module():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return gpu_check


def test_out_of_memory_gets_a_row_and_the_check_goes_on(monkeypatch, capsys):
    gpu_check = _gpu_check_module()
    calls = []

    def measure(config, steps, warmup, peak):
        calls.append(config.model.mtp_depth)
        if len(calls) == 1:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9GiB")
        raise ValueError("something else")

    monkeypatch.setattr(gpu_check, "measure_train", measure)
    args = type("Args", (), dict(steps=3, warmup=1, set=[]))()
    rows, failed = gpu_check.run_train(["tiny", "smoke"], args, peak=1e12)
    assert calls == [0, 0, 1]  # tiny's D=1 is not compiled after its D=0 did not fit
    assert [r["status"] for r in rows[:2]] == [
        "does not fit in device memory",
        "does not fit in device memory (as D=0)",
    ]
    assert all(r["status"].startswith("failed: ValueError") for r in rows[2:]) and failed
    gpu_check.print_train(rows)
    out = capsys.readouterr().out
    assert "| tiny | 0 | does not fit in device memory |" in out
    assert "| smoke | 1 | failed: ValueError: something else |" in out
    assert gpu_check.is_oom(MemoryError("the step needs 200 GiB, the device has 130"))
