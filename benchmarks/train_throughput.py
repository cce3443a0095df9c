"""Train-step throughput and MFU vs MTP depth, on one device with synthetic tokens.

    python benchmarks/train_throughput.py [--steps 20] [--configs d0,d1,d2,p2,p4]
        [--set model.n_kv_heads=2 ...] [--profile DIR] [--repeats 3] [--ceiling]

A llama-like model (V=32000, E=256, 4 layers, 4 heads of 64, kv 4, MLP 1024, S=256,
batch 8, float32) trained by the real compiled step (`make_train_step`, shardings and a
donated state, as `compile_steps` builds it). For each config: compile, warm up, then time
--steps steps with `block_until_ready` after each (--repeats times), and report the best and
the median step time, tokens/s and MFU = model_flops * tokens/step / step time / peak, with
peak = the highest of several `measured_peak()` runs (a float32 2048^2 matmul on this
device, measured before and after each config: one run beside other work comes out low).
Configs: d0, d1, d2 (sequential MTP, D = 0, 1, 2) and p2, p4 (parallel heads, n = 2, 4).
The 1-minute load average is printed next to each figure (other jobs on the same cores slow
it down). The table is printed at the end, with the peak; progress goes to stderr.

--ceiling also measures each config's MFU bound (benchmarks/train_ceiling.py: the step's
matmuls, loss passes and optimizer, each alone) and prints it next to the measured MFU.

--profile DIR writes a `jax.profiler` trace of a few steps of each config to DIR/<name> and
prints where the time goes (XLA ops grouped into head/loss, attention, MLP, optimizer, ...).
Set XLA_FLAGS yourself if you want to try XLA CPU flags; by default none are set.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import time

import jax
import numpy as np

from mtp_jax.config import apply_overrides, base_config, validate
from mtp_jax.model import Model, model_flops
from mtp_jax.sharding import batch_sharding, make_mesh, replicated, with_shardings
from mtp_jax.train.mfu import measured_peak
from mtp_jax.train.state import abstract_state, init_state, make_optimizer
from mtp_jax.train.step import make_train_step, mesh_context
from mtp_jax.window import WindowSpec
from mtp_jax.xla_cpu import reexec_with_tuned_malloc

MODEL = dict(
    vocab_size=32_000,
    d_model=256,
    n_layers=4,
    n_heads=4,
    n_kv_heads=4,
    head_dim=64,
    mlp_dim=1024,
    dtype="float32",
    param_dtype="float32",
    remat_policy="none",
)
CONFIGS = {
    "d0": dict(mtp_depth=0),
    "d1": dict(mtp_depth=1, mtp_layout="sequential"),
    "d2": dict(mtp_depth=2, mtp_layout="sequential"),
    "p2": dict(mtp_depth=2, mtp_layout="parallel"),
    "p4": dict(mtp_depth=4, mtp_layout="parallel"),
}


def make_config(name: str, overrides: list[str]):
    config = base_config()
    config.model.update(MODEL)
    config.model.update(CONFIGS[name])
    config.data.source = "synthetic"
    config.data.seq_len = 256
    config.data.batch_size = 8
    config.train.steps = 10_000
    config.train.warmup_steps = 10
    apply_overrides(config, overrides)
    config.lock()
    validate(config)
    return config


def build(config):
    """(compiled donated train step, fresh state, list of device batches)."""
    mesh = make_mesh(config.mesh, jax.devices()[:1])
    model = Model(config.model)
    tx = make_optimizer(config)
    abstract, shardings = abstract_state(config, model, tx, mesh)
    bsh = batch_sharding(mesh)
    spec = WindowSpec.from_config(config)
    shape = (spec.batch_size, spec.length)
    batch_abstract = spec.abstract_batch(bsh)
    state_abstract = with_shardings(abstract, shardings)
    step = jax.jit(
        make_train_step(config, model, tx),
        in_shardings=(shardings, {k: bsh for k in batch_abstract}),
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=0,
    )
    start = time.perf_counter()
    with mesh_context(mesh):
        compiled = step.lower(state_abstract, batch_abstract).compile()
    compile_s = time.perf_counter() - start
    state = init_state(config, model, tx, shardings)
    # Synthetic data as the pipeline makes it (random tokens, one document per window),
    # prepared up front so that the timing is the step's alone.
    rng = np.random.default_rng(0)
    batches = [
        jax.device_put(
            {
                "tokens": rng.integers(0, config.model.vocab_size, shape, dtype=np.int32),
                "segment_ids": np.ones(shape, np.int32),
            },
            bsh,
        )
        for _ in range(4)
    ]
    return compiled, state, batches, compile_s


def time_steps(compiled, state, batches, steps: int):
    """Per-step seconds of `steps` steps; returns (times, state)."""
    times = []
    for i in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batches[i % len(batches)])
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    return times, state, metrics


# ------------------------------------------------------------------------------ profile

# (category, test on an HLO op's `op_name` metadata), first match wins.
CATEGORIES = [
    ("head matmuls + softmax/CE (loss)", lambda o: "Model" not in o and "jvp(" in o),
    ("head matmuls + softmax/CE (loss)", lambda o: "head_matrix" in o),
    ("attention (proj, rope, QK, softmax, AV)", lambda o: "/attn/" in o),
    ("MLP (SwiGLU)", lambda o: "/mlp/" in o),
    ("embedding gather + its scatter-add grad", lambda o: "/embed" in o),
    ("MTP proj/concat + norms + residuals", lambda o: "Model" in o or "/block/" in o),
    ("optimizer (AdamW, clip, norms)", lambda o: o.startswith("jit(train_step)/")),
]


def profile(compiled, state, batches, out_dir: str, steps: int = 3):
    """Writes a jax.profiler trace of `steps` steps to out_dir; returns the state."""
    os.makedirs(out_dir, exist_ok=True)
    with jax.profiler.trace(out_dir):
        for i in range(steps):
            with jax.profiler.StepTraceAnnotation("train", step_num=i):
                state, metrics = compiled(state, batches[i % len(batches)])
                jax.block_until_ready((state, metrics))
    return state


def breakdown(out_dir: str, hlo_text: str, steps: int = 3) -> list[tuple[str, float]]:
    """(category, ms per step) from the trace's XLA thunk events (self time, both threads).

    Thunks are named after HLO instructions; their `op_name` metadata (from the compiled
    HLO text) says which part of the model they come from. Eigen dots that run
    asynchronously are only partly visible, so the sum is below 2 x the step time (2 cores).
    """
    names = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = [^\n]*$", hlo_text, re.M):
        o = re.search(r'op_name="([^"]*)"', m.group(0))
        names.setdefault(m.group(1), o.group(1) if o else "")
    trace = sorted(glob.glob(os.path.join(out_dir, "**", "*.trace.json.gz"), recursive=True))[-1]
    with gzip.open(trace) as f:
        events = json.load(f)["traceEvents"]
    threads = {
        (e["pid"], e["tid"]): e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "thread_name"
    }
    per_thread = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and "XLAEigen" in threads.get((e["pid"], e["tid"]), ""):
            per_thread[e["tid"]].append(e)
    self_us: collections.Counter = collections.Counter()
    for evs in per_thread.values():  # self time: minus nested events (while bodies, ...)
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack = []
        for e in evs:
            while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
                stack.pop()
            if stack:
                self_us[stack[-1]["name"]] -= e["dur"]
            self_us[e["name"]] += e["dur"]
            stack.append(e)
    totals: collections.Counter = collections.Counter()
    for name, us in self_us.items():
        op = names.get(name)
        if op is None:
            category = "XLA runtime (thunk executor, thread pool waits)"
        else:
            category = next((c for c, test in CATEGORIES if test(op)), "unattributed copies")
        totals[category] += us / 1e3 / steps
    return totals.most_common()


# ------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {list(CONFIGS)}")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. a.b=1")
    parser.add_argument("--profile", default="", help="write jax.profiler traces here")
    parser.add_argument(
        "--ceiling",
        action="store_true",
        help="also measure each config's MFU bound with this backend's kernels "
        "(benchmarks/train_ceiling.py) and print it next to the measured MFU",
    )
    args = parser.parse_args()

    # The peak is re-measured before every config and the highest kept: a peak measured while
    # something else ran would come out low and inflate every MFU.
    peaks = [measured_peak.__wrapped__()]
    results, rows, profiles, ceilings = {}, [], {}, {}
    for name in args.configs.split(","):
        print(f"timing {name} ...", file=sys.stderr, flush=True)
        config = make_config(name, args.set)
        compiled, state, batches, compile_s = build(config)
        _, state, _ = time_steps(compiled, state, batches, args.warmup)
        all_times, loads = [], []
        for _ in range(args.repeats):
            loads.append(os.getloadavg()[0])
            times, state, metrics = time_steps(compiled, state, batches, args.steps)
            all_times += times
        assert np.isfinite(float(metrics["loss"])), "non-finite loss"
        best, median = min(all_times), statistics.median(all_times)
        tokens = config.data.batch_size * config.data.seq_len
        flops = model_flops(config)
        results[name] = (best, flops)
        rows.append((name, config.model, flops, tokens, best, median, compile_s, loads))
        if args.profile:
            out = os.path.join(args.profile, name)
            state = profile(compiled, state, batches, out)
            profiles[name] = (best, breakdown(out, compiled.as_text()))
        del state, compiled
        if args.ceiling:
            from train_ceiling import ceiling  # noqa: PLC0415 (it imports this module)

            ceilings[name] = ceiling(config)
        peaks.append(measured_peak.__wrapped__())
    peak = max(peaks)
    print(
        f"jax {jax.__version__}, {jax.devices()[0].device_kind} x{len(jax.devices())}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; f32 2048^2 matmul peak "
        f"{peak / 1e9:.1f} GFLOP/s (highest of {len(peaks)} measurements, lowest "
        f"{min(peaks) / 1e9:.1f})"
    )
    print()
    print(
        "| config | D | layout | MFLOP/token | step ms (best) | step ms (median) | tokens/s | "
        "MFU % of matmul peak | compile s | load |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, m, flops, tokens, best, median, compile_s, loads in rows:
        print(
            f"| {name} | {m.mtp_depth} | {m.mtp_layout if m.mtp_depth else '-'} | "
            f"{flops / 1e6:.1f} | {best * 1e3:.1f} | {median * 1e3:.1f} | {tokens / best:,.0f} | "
            f"{100 * flops * tokens / best / peak:.1f} | {compile_s:.1f} | "
            f"{min(loads):.2f}-{max(loads):.2f} |"
        )
    if "d0" in results:
        print()
        t0, f0 = results["d0"]
        for name in ("d1", "d2", "p2", "p4"):
            if name in results:
                t, f = results[name]
                print(f"- {name}/d0: step time x{t / t0:.3f}, model FLOPs x{f / f0:.3f}")
    if ceilings:
        print(
            "\nMFU bound: the step's MFU if only its matmuls, the loss's softmax/CE passes and "
            "the optimizer\ntook time, each measured alone with this backend's kernels "
            "(benchmarks/train_ceiling.py);\n'the rest' is everything else in the measured "
            "step (norms, RoPE, attention softmax, SwiGLU, runtime, ...).\n"
        )
        print(
            "| config | step ms | MFU | bound ms | MFU bound | the rest, ms |\n"
            "|---|---|---|---|---|---|"
        )
        for name, c in ceilings.items():
            best, flops = results[name]
            print(
                f"| {name} | {best * 1e3:.1f} | {100 * c.flops / best / peak:.1f}% | "
                f"{c.time * 1e3:.1f} | {100 * c.flops / c.time / peak:.1f}% | "
                f"{(best - c.time) * 1e3:.1f} |"
            )
    for name, (best, rows) in profiles.items():
        total = sum(ms for _, ms in rows)
        print(f"\nWhere the time goes, {name} (thread-ms per step on 2 threads; best step")
        print(f"{best * 1e3:.0f} ms = {2 * best * 1e3:.0f} thread-ms; traced {total:.0f}):\n")
        print("| part | thread-ms / step | % of traced |\n|---|---|---|")
        for category, ms in rows:
            print(f"| {category} | {ms:.0f} | {100 * ms / total:.1f} |")


if __name__ == "__main__":
    reexec_with_tuned_malloc()  # huge-page malloc, as mtp-train runs (mtp_jax/xla_cpu.py)
    main()
