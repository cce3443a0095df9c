"""MoE train-step throughput and MFU vs dense twins, and the all-to-all share under expert
parallelism, on CPUs with synthetic tokens.

    python benchmarks/moe_throughput.py [--models smoke,mid] [--variants dropless,cap,dense]
        [--steps 3] [--repeats 2] [--warmup 1] [--capacity 1.25] [--set KEY=VALUE ...]
        [--ep-meshes 4x2,8x1] [--ep-variants dropless,cap] [--ep-steps 2] [--no-ep]
        [--keep-traces DIR]

Table 1 (one device): per model, the MoE trained dropless (`model.moe.capacity_factor=0`:
sorted tokens, `jax.lax.ragged_dot` grouped matmuls), with capacity buffers
(capacity_factor=--capacity: batched einsums) and its dense twin (same attention, MTP and
vocabulary; every FFN a dense SwiGLU of mlp_dim = (top_k + shared_experts) x expert_dim, so
the activated FLOPs match up to the router). Models:
- smoke: configs/moe_smoke.py (byte vocab, d 128, 3 layers (1 dense) + D=1 MTP, MLA, 8 experts
  top-2 + 1 shared of width 96; S=128, B=16);
- mid: byte vocab, d 256, 4 layers (1 dense, mlp 768) + D=1 MTP, 4 MHA heads of 64,
  16 experts top-2 + 1 shared of width 256; S=128, B=8.
Each is the real compiled, donated train step (`train_throughput.build`); the variants of
one model are timed interleaved (repeat 1 of each, then repeat 2 of each, ...), so that load
changes from other jobs hit them alike, and the ratios to the dense twin come from one run.
MFU = `model_flops` (activated FLOPs: router + top-k + shared experts) x tokens / best step
time / peak, the peak being the highest of several `measured_peak()` runs (as in
train_throughput.py). "XLA GFLOP/step" is XLA's own count of the compiled step: on XLA:CPU
ragged_dot becomes a masked dense product over all E groups, which that column shows.

Table 2 (--ep, run by default in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8, so the main run stays on one device):
the mid MoE on meshes expert x data (default 4x2 and 8x1), dropless and with capacity; step
time, then a `jax.profiler` trace of --ep-steps steps, parsed for the XLA `all-to-all` thunks
(and `all-reduce`) per device: their time per step and share of the traced step. Each
collective thunk first waits in a rendezvous for its peers, then copies; the table splits the
two. The 8 fake devices share the same cores, so "waiting" is mostly other devices' compute
(and load imbalance), not communication; the copy part is the data movement.

Progress goes to stderr, the tables to stdout, with the 1-minute load average next to each
figure. JAX_PLATFORMS defaults to cpu.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from unittest import mock

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import train_throughput as tt  # noqa: E402  (benchmarks/ is sys.path[0])

from mtp_jax.config import apply_overrides, base_config, load_config, validate  # noqa: E402
from mtp_jax.model import model_flops  # noqa: E402
from mtp_jax.model.flops import activated_param_count, param_count  # noqa: E402
from mtp_jax.sharding import make_mesh  # noqa: E402
from mtp_jax.train.mfu import measured_peak  # noqa: E402
from mtp_jax.xla_cpu import reexec_with_tuned_malloc  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EP_DEVICES = 8
FAKE_DEVICES_FLAG = f"--xla_force_host_platform_device_count={EP_DEVICES}"

MID_MODEL = dict(
    vocab_size=259,
    d_model=256,
    n_layers=4,
    n_heads=4,
    n_kv_heads=4,
    head_dim=64,
    mlp_dim=768,  # the dense first layer: as wide as a token's 3 activated experts
    mtp_depth=1,
    mtp_layout="sequential",
    dtype="float32",
    param_dtype="float32",
    remat_policy="none",
)
MID_MOE = dict(num_experts=16, top_k=2, shared_experts=1, expert_dim=256, first_dense_layers=1)


def make_config(model: str, variant: str, capacity: float, overrides: list[str]):
    """The locked config of `model` ('smoke' | 'mid') as `variant` ('dropless' | 'cap' |
    'dense'), synthetic tokens."""
    if model == "smoke":
        config = load_config(os.path.join(ROOT, "configs", "moe_smoke.py"))
        config.unlock()
    elif model == "mid":
        config = base_config()
        config.model.update(MID_MODEL)
        config.model.moe.update(MID_MOE)
        config.data.seq_len = 128
        config.data.batch_size = 8
    else:
        raise ValueError(f"unknown model {model!r}: smoke or mid")
    config.data.source = "synthetic"
    config.train.steps = 10_000
    config.train.warmup_steps = 10
    m = config.model
    if variant == "dense":
        m.mlp_dim = (m.moe.top_k + m.moe.shared_experts) * m.moe.expert_dim
        m.moe.num_experts = 0
    elif variant == "cap":
        m.moe.capacity_factor = capacity
    elif variant == "dropless":
        m.moe.capacity_factor = 0.0
    else:
        raise ValueError(f"unknown variant {variant!r}: dropless, cap or dense")
    apply_overrides(config, overrides)
    config.lock()
    validate(config)
    return config


def label(model: str, variant: str, capacity: float) -> str:
    return f"{model} {'capacity ' + format(capacity, 'g') if variant == 'cap' else variant}"


def build(config, devices=None):
    """`train_throughput.build` (compiled donated step, state, batches, compile s) on a mesh
    over `devices` (default: the first device, as train_throughput does)."""
    if devices is None or len(devices) == 1:
        return tt.build(config)
    with mock.patch.object(tt, "make_mesh", lambda cfg, _: make_mesh(cfg, devices)):
        return tt.build(config)


def xla_flops(compiled) -> float:
    """XLA's FLOP count of the compiled step (nan if the backend gives none)."""
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        return float(cost.get("flops", float("nan")))
    except Exception:  # noqa: BLE001 (informational column)
        return float("nan")


def log(msg: str) -> None:
    print(
        f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}] {msg}",
        file=sys.stderr,
        flush=True,
    )


# ------------------------------------------------------------------------------ table 1


def run_single(args) -> None:
    peaks = [measured_peak.__wrapped__()]
    rows = []  # (model, variant, config, times, loads, compile_s, xla flops)
    for model in args.models.split(","):
        built = {}
        for variant in args.variants.split(","):
            config = make_config(model, variant, args.capacity, args.set)
            log(f"compiling {label(model, variant, args.capacity)} ...")
            compiled, state, batches, compile_s = build(config)
            flops_xla = xla_flops(compiled)
            _, state, _ = tt.time_steps(compiled, state, batches, args.warmup)
            built[variant] = [config, compiled, state, batches, compile_s, flops_xla, [], []]
        for r in range(args.repeats):
            for variant, b in built.items():
                log(f"timing {label(model, variant, args.capacity)}, repeat {r + 1}/{args.repeats}")
                b[7].append(os.getloadavg()[0])
                times, b[2], metrics = tt.time_steps(b[1], b[2], b[3], args.steps)
                b[6] += times
                assert np.isfinite(float(metrics["loss"])), f"{model} {variant}: non-finite loss"
        for variant, (config, _, _, _, compile_s, flops_xla, times, loads) in built.items():
            rows.append((model, variant, config, times, loads, compile_s, flops_xla))
        del built
        peaks.append(measured_peak.__wrapped__())
    peak = max(peaks)
    print(
        f"jax {jax.__version__}, {jax.devices()[0].device_kind} x1 (of {len(jax.devices())}), "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; f32 2048^2 matmul peak "
        f"{peak / 1e9:.1f} GFLOP/s (highest of {len(peaks)}, lowest {min(peaks) / 1e9:.1f}); "
        f"best of {args.repeats} x {args.steps} steps, variants interleaved"
    )
    print()
    print(
        "| config | params total / activated | MFLOP/token (activated) | XLA GFLOP/step | "
        "step ms (best) | step ms (median) | tokens/s | MFU % | x dense step time (best, "
        "median) | x dense FLOPs | compile s | load |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    dense = {
        m: (min(t), statistics.median(t), model_flops(c)) for m, v, c, t, *_ in rows if v == "dense"
    }
    for model, variant, config, times, loads, compile_s, flops_xla in rows:
        best, median = min(times), statistics.median(times)
        tokens = config.data.batch_size * config.data.seq_len
        flops = model_flops(config)
        total, active = param_count(config), activated_param_count(config)
        ratio, fratio = ("-", "-")
        if model in dense and variant != "dense":
            ratio = f"{best / dense[model][0]:.2f}, {median / dense[model][1]:.2f}"
            fratio = f"{flops / dense[model][2]:.3f}"
        print(
            f"| {label(model, variant, args.capacity)} | "
            f"{total / 1e6:.2f}M / {active / 1e6:.2f}M | "
            f"{flops / 1e6:.1f} | {flops_xla / 1e9:.1f} | {best * 1e3:.0f} | {median * 1e3:.0f} | "
            f"{tokens / best:,.0f} | {100 * flops * tokens / best / peak:.1f} | {ratio} | "
            f"{fratio} | {compile_s:.0f} | {min(loads):.2f}-{max(loads):.2f} |"
        )
    print(
        "\nMFU and MFLOP/token count activated FLOPs (router + top-k + shared experts, "
        "training = 3x forward);\nXLA GFLOP/step is what the compiled step executes "
        "(XLA:CPU: ragged_dot as a dense product over all experts, masked)."
    )


# ------------------------------------------------------------------------------ table 2


def collectives(out_dir: str, steps: int) -> dict:
    """From the newest trace in out_dir: step ms (mean of the traced steps) and, per device
    and step, the ms spent in `all-to-all` / `all-reduce` thunks and, of it, in their
    rendezvous (waiting for the peers)."""
    trace = sorted(glob.glob(os.path.join(out_dir, "**", "*.trace.json.gz"), recursive=True))[-1]
    with gzip.open(trace) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    step_ms = statistics.mean(e["dur"] for e in events if e["name"] == "train") / 1e3
    by_thread = collections.defaultdict(list)
    for e in events:
        by_thread[(e["pid"], e["tid"])].append(e)
    total = collections.Counter()  # kind -> us, all devices
    wait = collections.Counter()
    devices = set()
    for evs in by_thread.values():
        evs.sort(key=lambda e: e["ts"])
        for i, e in enumerate(evs):
            op = e.get("args", {}).get("hlo_op", "")
            kind = next((k for k in ("all-to-all", "all-reduce") if op.startswith(k)), None)
            if kind is None:
                continue
            devices.add(e["args"].get("device_ordinal"))
            total[kind] += e["dur"]
            end = e["ts"] + e["dur"]
            for n in evs[i + 1 :]:
                if n["ts"] > end:
                    break
                if n["name"] == "Rendezvous":  # the outermost wait; nested "Wait: ..." inside
                    wait[kind] += n["dur"]
    per = max(len(devices), 1) * steps * 1e3
    return {
        "step_ms": step_ms,
        **{f"{k}_ms": total[k] / per for k in ("all-to-all", "all-reduce")},
        **{f"{k}_wait_ms": wait[k] / per for k in ("all-to-all", "all-reduce")},
    }


def run_ep(args) -> None:
    devices = jax.devices()
    if len(devices) < EP_DEVICES:
        sys.exit(
            f"--ep needs {EP_DEVICES} devices, found {len(devices)}: set XLA_FLAGS="
            f"{FAKE_DEVICES_FLAG} (the default run does)"
        )
    peaks = [measured_peak.__wrapped__()]
    trace_root = args.keep_traces or tempfile.mkdtemp(prefix="moe_ep_trace_")
    rows = []
    for mesh_s in args.ep_meshes.split(","):
        expert, data = (int(v) for v in mesh_s.split("x"))
        for variant in args.ep_variants.split(","):
            name = label("mid", variant, args.capacity)
            overrides = [
                *args.set,
                f"mesh.expert={expert}",
                f"mesh.data={data}",
                "mesh.fsdp=1",
                "mesh.tensor=1",
            ]
            config = make_config("mid", variant, args.capacity, overrides)
            log(f"--ep: compiling {name} on expert={expert} x data={data} ...")
            compiled, state, batches, compile_s = build(config, devices[: expert * data])
            _, state, _ = tt.time_steps(compiled, state, batches, args.warmup)
            load = os.getloadavg()[0]
            log(f"--ep: timing {name} on expert={expert} x data={data}")
            times, state, metrics = tt.time_steps(compiled, state, batches, args.ep_steps)
            assert np.isfinite(float(metrics["loss"])), f"{name}: non-finite loss"
            out = os.path.join(trace_root, f"{variant}_e{expert}d{data}")
            log(f"--ep: tracing {args.ep_steps} steps of {name} -> {out}")
            state = tt.profile(compiled, state, batches, out, steps=args.ep_steps)
            stats = collectives(out, args.ep_steps)
            tokens = config.data.batch_size * config.data.seq_len
            rows.append(
                (
                    name,
                    expert,
                    data,
                    min(times),
                    tokens,
                    model_flops(config),
                    stats,
                    load,
                    os.getloadavg()[0],
                )
            )
            del compiled, state
    peaks.append(measured_peak.__wrapped__())
    peak = max(peaks)
    if not args.keep_traces:
        shutil.rmtree(trace_root, ignore_errors=True)
    print(
        f"\nExpert parallelism: {EP_DEVICES} fake CPU devices on the same cores "
        f"(XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}), mid MoE, S=128, B=8 split over "
        f"expert x data; peak {peak / 1e9:.1f} GFLOP/s for the whole host; collective ms are "
        f"per device and step, averaged over devices, from a trace of {args.ep_steps} steps\n"
    )
    print(
        "| config | mesh expert x data | step ms (best) | tokens/s | MFU % | traced step ms | "
        "all-to-all ms | of it waiting for peers | all-to-all % of step | all-to-all copy % "
        "of step | all-reduce ms (wait) | load |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, expert, data, best, tokens, flops, s, l0, l1 in rows:
        a2a, a2a_wait, step = s["all-to-all_ms"], s["all-to-all_wait_ms"], s["step_ms"]
        print(
            f"| {name} | {expert} x {data} | {best * 1e3:.0f} | {tokens / best:,.0f} | "
            f"{100 * flops * tokens / best / peak:.1f} | {step:.0f} | {a2a:.1f} | "
            f"{a2a_wait:.1f} | {100 * a2a / step:.1f} | {100 * (a2a - a2a_wait) / step:.1f} | "
            f"{s['all-reduce_ms']:.1f} ({s['all-reduce_wait_ms']:.1f}) | {l0:.2f}-{l1:.2f} |"
        )
    print(
        "\nall-to-all ms: time inside the XLA all-to-all thunks per device and step; waiting: "
        "of it, in\ntheir rendezvous until every peer arrived (with 8 devices on 2 cores mostly "
        "the others' compute);\ncopy % = (all-to-all - waiting) / traced step. all-reduce "
        "(gradients, stats): ms (of it waiting)."
    )
    sys.stdout.flush()


# ------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="smoke,mid", help="subset of smoke,mid")
    parser.add_argument(
        "--variants",
        default="dropless,cap,dense",
        help="subset of dropless,cap,dense (cap: capacity_factor=--capacity)",
    )
    parser.add_argument("--capacity", type=float, default=1.25, help="capacity factor of 'cap'")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. a.b=1")
    parser.add_argument(
        "--ep",
        action="store_true",
        help="only the expert-parallel table (needs 8 devices; the default run "
        "starts it in a subprocess with fake CPU devices)",
    )
    parser.add_argument("--no-ep", action="store_true", help="skip the expert-parallel table")
    parser.add_argument("--ep-meshes", default="4x2,8x1", help="expert x data meshes")
    parser.add_argument("--ep-variants", default="dropless,cap", help="subset of dropless,cap")
    parser.add_argument(
        "--ep-steps",
        type=int,
        default=2,
        help="timed steps, then traced steps, per expert-parallel config",
    )
    parser.add_argument("--keep-traces", default="", help="write the --ep traces here")
    args = parser.parse_args()

    if args.ep:
        run_ep(args)
        return
    run_single(args)
    if args.no_ep:
        return
    sys.stdout.flush()
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {FAKE_DEVICES_FLAG}".strip()
    cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--ep"]
    log(f"starting the expert-parallel run: {' '.join(cmd[1:])}")
    subprocess.run(cmd, env=env, check=True)


if __name__ == "__main__":
    reexec_with_tuned_malloc()  # huge-page malloc, as mtp-train runs (mtp_jax/xla_cpu.py)
    main()
