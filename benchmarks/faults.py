"""The fault matrix: real mtp-train processes hit by kills, signals, a full disk, a read-only
workdir, a second run, corrupt token stores and NaN batches; fuzzed configs, prompts and
manifests. Prints a markdown table.

    python benchmarks/faults.py [--kills 10] [--seed 0] [--fuzz-examples 1000]

Every run trains the smoke model shrunk (1 layer, d=32, S=16, B=8, D=2) for 12 steps with a
checkpoint every 3 and an eval every 4, on one CPU device, through `tests/fault_runner.py`
(mtp-train with one injected fault). "identical" compares the final parameters with an
uninterrupted run's, bit for bit; "data lost" counts checkpoints that were complete before the
fault and are gone after, and metrics.jsonl steps missing or duplicated after the resume.
tests/test_faults.py runs the same trials with fewer repetitions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import random
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
RUNNER = REPO / "tests" / "fault_runner.py"
STEPS, EVERY, EVAL_EVERY = 12, 3, 4
TINY = [
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.n_kv_heads=1",
    "model.head_dim=16",
    "model.mlp_dim=64",
    "data.seq_len=16",
    "data.batch_size=8",
    "loss.chunk_size=8",
    f"train.steps={STEPS}",
    "train.warmup_steps=2",
    "train.log_every=1",
    f"train.eval_every={EVAL_EVERY}",
    "train.eval_steps=1",
    "train.peak_flops=1e12",  # no matmul measurement at start-up
    f"checkpoint.every={EVERY}",
    "checkpoint.keep=10",
]


@dataclasses.dataclass
class Row:
    fault: str
    trials: int = 0
    survived: int = 0
    steps_lost: list[int] = dataclasses.field(default_factory=list)
    data_lost: int = 0
    identical: int = 0
    compared: int = 0
    note: str = ""

    def cells(self) -> list[str]:
        lost = (
            f"{min(self.steps_lost)}-{max(self.steps_lost)}"
            if self.steps_lost and min(self.steps_lost) != max(self.steps_lost)
            else str(self.steps_lost[0])
            if self.steps_lost
            else "-"
        )
        same = f"{self.identical}/{self.compared}" if self.compared else "-"
        return [
            self.fault,
            str(self.trials),
            f"{self.survived}/{self.trials}",
            lost,
            "none" if not self.data_lost else str(self.data_lost),
            same,
            self.note,
        ]


# ------------------------------------------------------------------------------ runs


def make_store(out: str) -> str:
    """A byte store of a few stdlib packages (~0.5 MB of code), 10% held out."""
    from mtp_jax.data import prepare

    corpus = os.path.join(out, "corpus")
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    for package in ("json", "email"):
        for f in sorted((stdlib / package).rglob("*.py")):
            rel = f.relative_to(stdlib)
            os.makedirs(os.path.join(corpus, rel.parent), exist_ok=True)
            shutil.copy(f, os.path.join(corpus, rel))
    store = os.path.join(out, "store")
    prepare(corpus, store, val_fraction=0.1, progress=False)
    return store


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, like a laptop
    e.setdefault("JAX_PLATFORMS", "cpu")
    e.setdefault(
        "JAX_COMPILATION_CACHE_DIR",
        os.path.join(tempfile.gettempdir(), "mtp_jax_test_compilation_cache"),
    )
    e.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    return e


def command(fault: str, workdir: str, store: str, *overrides: str) -> list[str]:
    return [
        sys.executable,
        str(RUNNER),
        fault,
        "--config",
        str(REPO / "configs" / "smoke.py"),
        "--workdir",
        str(workdir),
        "--no_sample",
        *[f"--config.{o}" for o in (*TINY, f"data.path={store}", *overrides)],
    ]


def run(fault: str, workdir: str, store: str, *overrides: str, timeout: int = 300):
    return subprocess.run(
        command(fault, workdir, store, *overrides),
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def complete_steps(workdir: str) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(x) for x in os.listdir(d) if x.isdigit()) if os.path.isdir(d) else []


def logged_steps(workdir: str) -> list[int]:
    """The step of every line of metrics.jsonl, in order (torn lines count as -1)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(int(json.loads(line)["step"]))
            except (ValueError, KeyError):
                out.append(-1)
    return out


def final_params(workdir: str):
    import jax

    from mtp_jax.train import load_params

    return [jax.device_get(x) for x in jax.tree.leaves(load_params(workdir))]


def same_params(a: str, b: str) -> bool:
    import numpy as np

    pa, pb = final_params(a), final_params(b)
    return len(pa) == len(pb) and all(np.array_equal(x, y) for x, y in zip(pa, pb, strict=True))


def same_records(reference: str, workdir: str) -> bool:
    """Every step logged once, in order, with the reference run's loss values."""

    def by_step(w):
        with open(os.path.join(w, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f]

    want, got = by_step(reference), by_step(workdir)
    keys = ("loss", "loss/depth_0", "loss/depth_2", "grad_norm", "eval/loss/depth_0")
    return [r["step"] for r in got] == [r["step"] for r in want] and all(
        g.get(k) == w.get(k) for g, w in zip(got, want, strict=True) for k in keys
    )


def reference_run(tmp: str, store: str) -> str:
    workdir = os.path.join(tmp, "reference")
    proc = run("none", workdir, store)
    if proc.returncode != 0:
        raise RuntimeError(f"the uninterrupted run failed:\n{proc.stderr[-3000:]}")
    return workdir


def _resume_and_compare(row: Row, reference: str, workdir: str, before: list[int]) -> None:
    """Runs `workdir` to the end (no fault) and scores it against `reference`."""
    last_done = max([s for s in logged_steps(workdir) if s >= 0], default=0)
    restart_from = max(complete_steps(workdir), default=0)
    proc = run("none", workdir, row_store(workdir))
    ok = proc.returncode == 0
    lost = [s for s in before if s not in complete_steps(workdir) and s <= restart_from]
    row.data_lost += len(lost) + (0 if ok and same_records(reference, workdir) else 1)
    row.steps_lost.append(max(0, last_done - restart_from))
    row.compared += 1
    if ok and same_params(reference, workdir):
        row.identical += 1
        row.survived += 1


def row_store(workdir: str) -> str:
    with open(os.path.join(workdir, "store_path")) as f:
        return f.read()


def _fresh(tmp: str, name: str, store: str) -> str:
    workdir = os.path.join(tmp, name)
    os.makedirs(workdir)
    with open(os.path.join(workdir, "store_path"), "w") as f:
        f.write(store)
    return workdir


# ------------------------------------------------------------------------------ trials


def kill_moments(n: int, seed: int) -> list[str]:
    """n seeded (step, phase) SIGKILL moments; the first always mid-save (async write)."""
    rng = random.Random(seed)
    saves = list(range(EVERY, STEPS, EVERY))
    out = [f"kill@{rng.choice(saves)}:save"]
    while len(out) < n:
        if rng.random() < 0.4:
            out.append(f"kill@{rng.choice(saves)}:save")
        else:
            out.append(f"kill@{rng.randint(1, STEPS - 1)}:step")
    return out


def kill_trials(reference: str, store: str, tmp: str, moments: list[str]) -> Row:
    row = Row("SIGKILL (" + ", ".join(moments) + ")" if len(moments) <= 3 else "SIGKILL")
    mid_write = 0
    for i, fault in enumerate(moments):
        workdir = _fresh(tmp, f"kill{i}", store)
        row.trials += 1
        proc = run(fault, workdir, store)
        if proc.returncode != -9:
            row.note += f" {fault}: exit {proc.returncode}?"
            continue
        ckpt = os.path.join(workdir, "checkpoints")
        mid_write += any("tmp" in d for d in os.listdir(ckpt)) if os.path.isdir(ckpt) else 0
        _resume_and_compare(row, reference, workdir, complete_steps(workdir))
    row.note = (
        f"{len(moments)} seeded moments, {mid_write} during an async checkpoint write "
        f"(a partial step dir left behind){row.note}"
    )
    return row


def sigterm_trial(reference: str, store: str, tmp: str, phase: str) -> Row:
    at = EVAL_EVERY * 2 if phase == "eval" else EVERY * 2
    row = Row(f"SIGTERM during {'evaluation' if phase == 'eval' else 'an async save'}", trials=1)
    workdir = _fresh(tmp, f"term_{phase}", store)
    proc = run(f"term@{at}:{phase}", workdir, store)
    saved = complete_steps(workdir)
    clean = proc.returncode == 0 and "preempted: checkpoint saved at step" in proc.stderr
    if not clean:
        row.note = f"exit {proc.returncode}: {proc.stderr[-300:]}"
        return row
    row.note = f"exit 0, complete checkpoint at step {saved[-1]} (signalled at step {at})"
    _resume_and_compare(row, reference, workdir, saved)
    return row


def namespaces_work() -> bool:
    """Whether `unshare` gives this process a private mount namespace (for tmpfs mounts)."""
    try:
        proc = subprocess.run(
            ["unshare", "--user", "--map-root-user", "--mount", "true"],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def in_namespace(script: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs a bash `script` in a private user + mount namespace (mounts vanish with it)."""
    return subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", script],
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def _shell(cmd: list[str]) -> str:
    import shlex

    return " ".join(shlex.quote(c) for c in cmd)


def disk_full_trial(reference: str, store: str, tmp: str) -> Row:
    """A real 8 MiB tmpfs holds the workdir; it fills up just before the save of step 6."""
    row = Row("disk full during a checkpoint save (8 MiB tmpfs)", trials=1)
    mnt, out = os.path.join(tmp, "full_mnt"), os.path.join(tmp, "disk_full")
    os.makedirs(mnt)
    workdir = os.path.join(mnt, "run")
    at = EVERY * 2
    script = f"""
set -u
mount -t tmpfs -o size=8m tmpfs {mnt} || exit 97
{_shell(command(f"fill@{at}:save", workdir, store))} 2> {tmp}/full.err
echo "first=$?"
ls {workdir}/checkpoints
rm -f {workdir}/filler
{_shell(command("none", workdir, store))} 2> {tmp}/resume.err
echo "second=$?"
cp -r {workdir} {out}
"""
    proc = in_namespace(script)
    with open(os.path.join(tmp, "full.err")) as f:
        err = f.read()
    message = [ln for ln in err.replace("\r", "\n").splitlines() if "mtp-train: error" in ln]
    named = bool(message) and "No space left on device" in message[0] and workdir in message[0]
    intact = f"Newest complete checkpoint: step {EVERY}, intact" in (message or [""])[0]
    traceback = "Traceback" in err
    if "first=2" not in proc.stdout or not named or not intact:
        row.note = f"first run: {proc.stdout[-300:]} {message[:1]} {err[-500:]}"
        return row
    if "second=0" not in proc.stdout:
        with open(os.path.join(tmp, "resume.err")) as f:
            row.note = f"resume failed: {f.read()[-1000:]}"
        return row
    row.compared = 1
    if same_params(reference, out) and same_records(reference, out):
        row.identical = row.survived = 1
    row.steps_lost.append(at - EVERY)
    row.note = f"exit 2 naming the path, step {EVERY} intact, resumed after freeing space" + (
        "; Orbax's writer threads still print tracebacks as they die" if traceback else ""
    )
    return row


def unwritable_trial(store: str, tmp: str) -> Row:
    """The workdir is a read-only mount: refused before compiling, naming the directory."""
    row = Row("checkpoint directory not writable (read-only mount)", trials=1)
    mnt = os.path.join(tmp, "ro_mnt")
    os.makedirs(mnt)
    script = f"""
mount -t tmpfs -o ro,size=1m tmpfs {mnt} || exit 97
{_shell(command("none", mnt, store))}
"""
    proc = in_namespace(script)
    refused = proc.returncode == 2 and f"checkpoint directory {mnt}/checkpoints" in proc.stderr
    compiled = "compiled train/eval steps" in proc.stderr
    if refused and not compiled and "Traceback" not in proc.stderr:
        row.survived = 1
        row.note = "exit 2 before compiling: " + proc.stderr.strip().splitlines()[-1][11:90]
    else:
        row.note = f"exit {proc.returncode}: {proc.stderr[-400:]}"
    return row


def lock_trial(store: str, tmp: str) -> Row:
    """A second run on a workdir in use is refused, naming the first."""
    row = Row("second run on the same workdir", trials=1)
    workdir = _fresh(tmp, "locked", store)
    first = subprocess.Popen(
        command("slow@0.5", workdir, store), env=env(), cwd=REPO, stderr=subprocess.PIPE
    )
    try:
        deadline = time.time() + 120
        while not logged_steps(workdir) and time.time() < deadline:
            time.sleep(0.1)
        second = run("none", workdir, store)
        named = f"pid {first.pid}" in second.stderr and "in use by another run" in second.stderr
        if second.returncode == 2 and named and "compiled" not in second.stderr:
            row.survived = 1
            row.note = "the second exits 2 before compiling, naming the first's pid and command"
        else:
            row.note = f"exit {second.returncode}: {second.stderr[-300:]}"
    finally:
        first.kill()
        first.wait()
    return row


def corrupt_store_trials(store: str, tmp: str) -> Row:
    """Truncated chunk, manifest vs array, an id >= vocab: a named error before any step."""
    import numpy as np
    import tensorstore as ts

    from mtp_jax.data import store as store_lib

    row = Row("corrupt token store (truncated chunk, manifest vs array, id >= vocab)")
    kinds = {}
    for kind in ("truncated", "manifest", "big_id"):
        bad = os.path.join(tmp, f"store_{kind}")
        shutil.copytree(store, bad)
        if kind == "truncated":
            chunk = os.path.join(bad, "train", "tokens", "0")
            with open(chunk, "rb") as f:
                data = f.read()
            with open(chunk, "wb") as f:
                f.write(data[: len(data) // 3])
            expect = f"chunk file {bad}/train/tokens/0"
        elif kind == "manifest":
            path = os.path.join(bad, "manifest.json")
            with open(path) as f:
                manifest = json.load(f)
            manifest["splits"]["train"]["tokens"] += 100
            with open(path, "w") as f:
                json.dump(manifest, f)
            expect = "manifest says"
        else:
            spec = store_lib._array_spec(bad, "train", "tokens")
            tokens = ts.open(spec, open=True, read=True, write=True).result()
            tokens[1234].write(np.uint16(300)).result()
            expect = "train token 1234 has id 300, not below model.vocab_size=259"
        workdir = _fresh(tmp, f"corrupt_{kind}", bad)
        proc = run("none", workdir, bad, "model.vocab_size=259")
        row.trials += 1
        clean = proc.returncode == 2 and expect in proc.stderr and "Traceback" not in proc.stderr
        stepped = bool(logged_steps(workdir)) or bool(complete_steps(workdir))
        kinds[kind] = clean and not stepped
        row.survived += kinds[kind]
        if not kinds[kind]:
            row.note += f" {kind}: exit {proc.returncode} {proc.stderr[-300:]}"
    row.note = row.note or "exit 2 naming the store and the chunk/position; no step, no checkpoint"
    return row


def nonfinite_trials(reference: str, store: str, tmp: str) -> list[Row]:
    """A NaN batch (train.nan_batches=5) under each train.on_nonfinite."""
    rows = []
    for mode in ("stop", "skip", "rollback"):
        row = Row(f"NaN loss at batch 5, on_nonfinite={mode}", trials=1)
        workdir = _fresh(tmp, f"nan_{mode}", store)
        proc = run("none", workdir, store, "train.nan_batches=(5,)", f"train.on_nonfinite={mode}")
        steps = logged_steps(workdir)
        if mode == "stop":
            ok = (
                proc.returncode == 3
                and "step 5" in proc.stderr
                and 6 not in complete_steps(workdir)
            )
            row.note = "exit 3 naming step 5; the NaN state never saved"
        elif mode == "skip":
            ok = proc.returncode == 0 and steps == list(range(1, STEPS + 1))
            row.note = "update of step 5 dropped (params and optimizer kept), counted"
        else:
            ok = proc.returncode == 0 and steps == list(range(1, STEPS + 1))
            ok = ok and "rolled back to the checkpoint at step 3" in proc.stderr
            row.note = "restored step 3, batch 5 passed over, metrics rewound, counted"
        row.survived = int(ok)
        if not ok:
            row.note = f"exit {proc.returncode}: {proc.stderr[-400:]}"
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------ fuzzing


def fuzz_rows(examples: int) -> list[Row]:
    """The hypothesis properties of tests/test_faults.py, `examples` each."""
    sys.path.insert(0, str(REPO / "tests"))
    import fuzz_properties as fp

    rows = []
    for name, prop in fp.PROPERTIES.items():
        row = Row(f"fuzz: {name}", trials=examples)
        try:
            prop(examples)
            row.survived = examples
            row.note = "only named errors (exit 2), never a traceback"
        except Exception as e:  # noqa: BLE001 - report the falsifying example
            row.note = f"FAILED: {str(e)[:300]}"
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------ main


def matrix(kills: int, seed: int, fuzz_examples: int) -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(tmp)
        reference = reference_run(tmp, store)
        rows.append(kill_trials(reference, store, tmp, kill_moments(kills, seed)))
        rows.append(sigterm_trial(reference, store, tmp, "eval"))
        rows.append(sigterm_trial(reference, store, tmp, "save"))
        if namespaces_work():
            rows.append(disk_full_trial(reference, store, tmp))
            rows.append(unwritable_trial(store, tmp))
        else:
            rows.append(Row("disk full / read-only workdir", note="no `unshare` here: not run"))
        rows.append(lock_trial(store, tmp))
        rows.append(corrupt_store_trials(store, tmp))
        rows.extend(nonfinite_trials(reference, store, tmp))
    rows.extend(fuzz_rows(fuzz_examples))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=10, help="SIGKILL moments")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--fuzz-examples", type=int, default=1000, help="per fuzz property")
    args = parser.parse_args()
    start = time.time()
    rows = matrix(args.kills, args.seed, args.fuzz_examples)
    header = ["fault", "trials", "survived", "steps lost", "data lost", "identical", "how"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row.cells()) + " |")
    print(f"\n{time.time() - start:.0f} s; python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
