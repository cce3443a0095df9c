"""GPU check: train-step throughput and MFU with MTP off and on, then speculative decoding.

    python benchmarks/gpu_check.py [--configs gpu_125m,gpu_1b] [--steps 30] [--json FILE]
        [--set KEY=VALUE | CONFIG:KEY=VALUE ...] [--peak-tflops T] [--workdir DIR]
    python benchmarks/gpu_check.py --dry-run     # tiny model, 3 steps, few tokens (CPU test)

Usually run through `bash benchmarks/gpu_check.sh`, which prepares the environment of a
machine without a package index first.

Training: for each config of --configs (files in configs/) and each D in {0, 1}, the real
donated train step (`train_throughput.build`: `make_train_step`, shardings, AOT compile) on
one device with synthetic tokens; after --warmup steps, --steps steps are timed one by one
(`block_until_ready` after each). Prints per row the best and the median step time,
tokens/s (batch x seq_len / best step), MFU = model_flops(config) x tokens per step / best
step / peak, and for D=1 the MTP on/off step-time ratio (D=1 best / D=0 best). The peak is
the chip's data-sheet dense bfloat16 figure (`mtp_jax.train.mfu.PEAK_FLOPS`), or, for a
device the table does not know (a CPU), a measured float32 matmul; the output says which.
A config whose step does not fit in device memory (XLA RESOURCE_EXHAUSTED / out of memory at
compile, init or the first step) gets a row saying so and the check goes on. `gpu_1b` is an
8-GPU config (global batch 256): on one GPU give it its per-GPU share with
`--set gpu_1b:data.batch_size=32`.

Decoding: a random-init model of the first config (--decode-config), or --workdir's trained
checkpoint, with D=3 sequential depths; plain greedy decoding (`mtp_jax.generate`) against
self-speculative greedy decoding (`mtp_jax.speculative_generate`) with the first 1, 2, 3
depths, batch 1, one random prompt. Prints tokens/s, speedup, tokens per verify step (mean
accepted), the step cost in plain-token times (tokens per step / speedup) and whether the
tokens equal plain greedy's (they must). With random weights the drafts are rarely accepted:
the speedup is a lower bound for a trained model, and the step cost is what to read.

Exit status 0; 1 when a row failed other than for memory, or speculative tokens differ.

--tiny replaces the configs by one tiny byte model (E=64, 2 layers, V=259, S=128, B=4, float32)
for CPU tests; --dry-run = --tiny --steps 3, 8 new tokens, one run each.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import pathlib
import statistics
import sys
import time
import traceback

import flax.linen as nn
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_throughput  # noqa: E402  (benchmarks/train_throughput.py: build, time_steps)
from decode import sliced  # noqa: E402  (benchmarks/decode.py)

import mtp_jax  # noqa: E402
from mtp_jax.train.mfu import measured_peak, peak_for_kind  # noqa: E402
from mtp_jax.xla_cpu import reexec_with_tuned_malloc  # noqa: E402

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
TINY = [  # the smoke config shrunk: E=64, 2 layers, V=259 (bytes), S=128, B=4
    "model.vocab_size=259",
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.head_dim=16",
    "model.mlp_dim=192",
    "model.dtype=float32",
    "model.param_dtype=float32",
    "data.seq_len=128",
    "data.batch_size=4",
    "loss.chunk_size=128",
]
DECODE_DEPTH = 3


_START = time.perf_counter()


def log(msg: str) -> None:
    """Progress goes to stderr, with the seconds since start; the tables go to stdout."""
    print(f"gpu_check [{time.perf_counter() - _START:.0f}s]: {msg}", file=sys.stderr, flush=True)


def is_oom(error: BaseException) -> bool:
    """Whether `error` is XLA running out of device memory (at compile or at run time), or
    the compiled step needing more than the device has (MemoryError)."""
    text = str(error)
    return (
        isinstance(error, MemoryError)
        or "RESOURCE_EXHAUSTED" in text
        or "out of memory" in text.lower()
    )


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:160]


def config_path(name: str) -> pathlib.Path:
    """configs/<name>.py for the tiny model's base and the named configs."""
    return CONFIGS / f"{'smoke' if name == 'tiny' else name}.py"


def overrides_for(name: str, sets: list[str]) -> list[str]:
    """--set items that apply to config `name`: plain KEY=VALUE, or NAME:KEY=VALUE."""
    out = []
    for item in sets:
        head, _, rest = item.partition(":")
        if rest and "=" not in head:
            if head == name:
                out.append(rest)
        else:
            out.append(item)
    return out


def train_config(name: str, depth: int, steps: int, sets: list[str]):
    """The config `name` for a throughput run: synthetic tokens, D=`depth`, no eval/ckpt."""
    overrides = (TINY if name == "tiny" else []) + [
        "data.source=synthetic",
        f"model.mtp_depth={depth}",
        f"train.steps={max(steps, 1)}",
        "train.warmup_steps=1",
        "train.eval_every=0",
        "checkpoint.every=0",
    ]
    return mtp_jax.load_config(config_path(name), overrides + overrides_for(name, sets))


def device_peak(peak_tflops: float) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from)."""
    kind = jax.devices()[0].device_kind
    if peak_tflops > 0:
        return peak_tflops * 1e12, f"--peak-tflops ({kind})"
    peak = peak_for_kind(kind)
    if peak is not None:
        return peak, f"data-sheet dense bf16 peak of {kind}"
    return measured_peak(), f"measured float32 2048^2 matmul on {kind} (no data-sheet figure)"


def compiled_gib(compiled) -> float | None:
    """Device memory the compiled step needs (arguments + outputs + temporaries), GiB."""
    try:
        m = compiled.memory_analysis()
        total = (
            m.argument_size_in_bytes
            + m.output_size_in_bytes
            - m.alias_size_in_bytes
            + m.temp_size_in_bytes
        )
        return total / 2**30
    except Exception:  # not every backend reports it
        return None


def device_memory_gib() -> float | None:
    """The memory XLA may use on the first device, GiB (None where it does not say: CPUs)."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # not every backend reports it
        return None
    limit = stats.get("bytes_limit")
    return limit / 2**30 if limit else None


def measure_train(config, steps: int, warmup: int, peak: float) -> dict:
    """Compiles and times the donated train step of `config` on one device.

    Returns a row: step times (ms, best and median of `steps` timed steps), tokens/s, MFU %,
    compile seconds, compiled memory (GiB) and the last loss."""
    compiled, state, batches, compile_s = train_throughput.build(config)
    memory, limit = compiled_gib(compiled), device_memory_gib()
    if memory is not None and limit is not None and memory > limit:
        raise MemoryError(
            f"out of memory: the step needs {memory:.1f} GiB, the device has {limit:.1f}"
        )
    _, state, _ = train_throughput.time_steps(compiled, state, batches, warmup)
    times, state, metrics = train_throughput.time_steps(compiled, state, batches, steps)
    loss = float(metrics["loss"])
    best, median = min(times), statistics.median(times)
    tokens = config.data.batch_size * config.data.seq_len
    flops = mtp_jax.model_flops(config)
    return {
        "status": "ok",
        "batch": config.data.batch_size,
        "seq_len": config.data.seq_len,
        "params_m": mtp_jax.param_count(config) / 1e6,
        "step_ms_best": best * 1e3,
        "step_ms_median": median * 1e3,
        "tokens_per_sec": tokens / best,
        "mfu_percent": 100 * flops * tokens / best / peak,
        "model_flops_per_token": flops,
        "compile_s": compile_s,
        "memory_gib": memory,
        "loss": loss,
    }


def run_train(names: list[str], args, peak: float) -> tuple[list[dict], bool]:
    """One row per (config, D); (rows, whether some row failed other than by memory)."""
    rows, failed = [], False
    for name in names:
        best_d0 = None
        for depth in (0, 1):
            row = {"config": name, "D": depth}
            if depth and rows[-1]["status"].startswith("does not fit"):
                rows.append({**row, "status": "does not fit in device memory (as D=0)"})
                continue  # D=1 needs more than D=0: spare the compile
            log(f"{name} D={depth}: compiling and timing {args.steps} steps ...")
            try:
                config = train_config(name, depth, args.warmup + args.steps, args.set)
                row.update(measure_train(config, args.steps, args.warmup, peak))
                if not np.isfinite(row["loss"]):
                    row.update(status="failed: non-finite loss")
                    failed = True
            except Exception as e:  # one row per failure; the check goes on
                if is_oom(e):
                    row["status"] = "does not fit in device memory"
                    row["error"] = first_line(e)
                    if isinstance(e, MemoryError):
                        row["status"] += f" ({str(e).removeprefix('out of memory: ')})"
                    log(f"{name} D={depth}: out of memory ({first_line(e)})")
                else:
                    row["status"] = f"failed: {first_line(e)}"
                    failed = True
                    traceback.print_exc()
            gc.collect()
            jax.clear_caches()
            if row["status"] == "ok":
                if depth == 0:
                    best_d0 = row["step_ms_best"]
                elif best_d0:
                    row["mtp_on_off"] = row["step_ms_best"] / best_d0
            rows.append(row)
    return rows, failed


# ------------------------------------------------------------------------------ decoding


def decode_model(name: str, args):
    """(ModelConfig, params on one device, description) to decode with."""
    if args.workdir:
        config, params = mtp_jax.load_checkpoint(args.workdir)
        cfg = mtp_jax.ModelConfig.from_any(config.model)
        return cfg, params, f"checkpoint {args.workdir} (trained)"
    config = train_config(name, DECODE_DEPTH, 1, args.set)
    cfg = dataclasses.replace(
        mtp_jax.ModelConfig.from_any(config.model),
        mtp_depth=DECODE_DEPTH,
        mtp_layout="sequential",
    )
    tokens = np.zeros((1, 8 + DECODE_DEPTH), np.int32)
    init = jax.jit(mtp_jax.Model(cfg).init)
    params = nn.unbox(init(jax.random.key(0), tokens))["params"]
    return cfg, params, f"{name}, random init"


def fastest(fn, model, params, prompts, lengths, new_tokens: int, repeats: int):
    """The fastest of `repeats` runs after one warm-up (compile) run."""
    fn(model, params, prompts, lengths, max_new_tokens=new_tokens)
    runs = [fn(model, params, prompts, lengths, max_new_tokens=new_tokens) for _ in range(repeats)]
    return min(runs, key=lambda r: r.stats["seconds"])


def run_decode(name: str, args) -> tuple[dict, bool]:
    """Plain vs speculative greedy decoding at D = 1 .. 3; (section, whether it failed)."""
    section = {"model": name, "rows": []}
    try:
        cfg, params, what = decode_model(name, args)
        section["model"] = what
        section["mtp_depth"] = cfg.mtp_depth
        rng = np.random.default_rng(0)
        prompts = rng.integers(0, cfg.vocab_size, (1, args.prompt_len)).astype(np.int32)
        lengths = np.array([args.prompt_len], np.int32)
        n, r = args.new_tokens, args.repeats
        log(f"decoding {what}: plain greedy, {n} new tokens ...")
        plain = fastest(mtp_jax.generate, mtp_jax.Model(cfg), params, prompts, lengths, n, r)
        base = plain.stats["tokens_per_sec"]
        section["rows"].append({"decoding": "plain", "D": 0, "tokens_per_sec": base})
        for depth in range(1, cfg.mtp_depth + 1):
            log(f"decoding {what}: speculative D={depth} ...")
            model, p = sliced(cfg, params, depth)
            res = fastest(mtp_jax.speculative_generate, model, p, prompts, lengths, n, r)
            same = bool(
                np.array_equal(res.num_generated, plain.num_generated)
                and np.array_equal(res.tokens, plain.tokens)
            )
            row = {
                "decoding": "speculative",
                "D": depth,
                "tokens_per_sec": res.stats["tokens_per_sec"],
                "speedup": res.stats["tokens_per_sec"] / base,
                "mean_accepted": res.stats["mean_accepted"],
                "acceptance": res.stats["acceptance"],
                "identical": same,
            }
            if not same:
                diff = np.flatnonzero(res.tokens[0] != plain.tokens[0])
                row["first_difference"] = int(diff[0]) if diff.size else None
            row["step_cost"] = row["mean_accepted"] / row["speedup"]
            section["rows"].append(row)
        return section, not all(r.get("identical", True) for r in section["rows"])
    except Exception as e:  # a section saying why; the table above stands
        section["status"] = (
            "does not fit in device memory" if is_oom(e) else f"failed: {first_line(e)}"
        )
        if not is_oom(e):
            traceback.print_exc()
        return section, not is_oom(e)


# ------------------------------------------------------------------------------ output


def fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def print_train(rows: list[dict]) -> None:
    print(
        "| config | D | step ms (best) | step ms (median) | tokens/s | MFU % | "
        "MTP on/off | compile s | memory GiB | loss |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["status"] != "ok":
            print(f"| {r['config']} | {r['D']} | {r['status']} |  |  |  |  |  |  |  |")
            continue
        ratio = fmt(r.get("mtp_on_off"), ".3f") + ("x" if r.get("mtp_on_off") else "")
        print(
            f"| {r['config']} | {r['D']} | {r['step_ms_best']:.1f} | {r['step_ms_median']:.1f} "
            f"| {r['tokens_per_sec']:,.0f} | {r['mfu_percent']:.1f} | {ratio} "
            f"| {r['compile_s']:.1f} | {fmt(r['memory_gib'], '.2f')} | {r['loss']:.3f} |"
        )


def print_decode(section: dict, args) -> None:
    print(
        f"\n## Decoding: {section['model']}, batch 1, greedy, {args.prompt_len}-token random "
        f"prompt, {args.new_tokens} new tokens, best of {args.repeats}\n"
    )
    if "status" in section:
        print(f"decoding {section['status']}")
        return
    print("| decoding | D | tokens/s | speedup | tokens/step | step cost | identical to plain |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in section["rows"]:
        if r["decoding"] == "plain":
            print(f"| plain | - | {r['tokens_per_sec']:,.0f} | 1.00x | 1.00 | 1.00x | - |")
            continue
        same = "yes" if r["identical"] else f"NO (first difference at {r['first_difference']})"
        print(
            f"| speculative | {r['D']} | {r['tokens_per_sec']:,.0f} | {r['speedup']:.2f}x "
            f"| {r['mean_accepted']:.2f} | {r['step_cost']:.2f}x | {same} |"
        )
    print(
        "\nstep cost: one draft + verify step in plain-token times (speedup = tokens/step / "
        "step cost)."
    )
    accepted = [r["mean_accepted"] for r in section["rows"] if r["decoding"] != "plain"]
    if args.workdir or not accepted:
        return
    if max(accepted) < 1.25:
        print(
            "Random weights: the drafts are almost never accepted, so these speedups are a "
            "lower bound\nfor a trained model; the step cost is what carries over. Use "
            "--workdir DIR for a trained\ncheckpoint's acceptance."
        )
    else:
        print(
            f"Random weights, yet up to {max(accepted):.2f} tokens/step: the random model's "
            "greedy continuation is\ndegenerate (repetitive) and its drafts agree; not a "
            "trained model's acceptance. Read the\nstep cost, or use --workdir DIR."
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="gpu_125m,gpu_1b", help="config names in configs/")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 30)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        help="config override KEY=VALUE for every config, or CONFIG:KEY=VALUE for one "
        "(e.g. gpu_1b:data.batch_size=32); repeatable",
    )
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="per-device peak for MFU")
    ap.add_argument("--tiny", action="store_true", help="a tiny model instead (CPU tests)")
    ap.add_argument("--dry-run", action="store_true", help="--tiny, 3 steps, few tokens")
    ap.add_argument("--json", default="", help="also write the rows to this file")
    ap.add_argument("--workdir", default="", help="decode this training run's checkpoint")
    ap.add_argument(
        "--decode-config", default="", help="config to decode with (default: the first; none)"
    )
    ap.add_argument("--prompt-len", type=int, default=None, help="default 64 (dry run 16)")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 128 (dry run 8)")
    ap.add_argument("--repeats", type=int, default=None, help="default 3 (dry run 1)")
    args = ap.parse_args()
    dry = args.dry_run
    args.tiny = args.tiny or dry
    args.steps = args.steps or (3 if dry else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if dry else 3)
    args.prompt_len = args.prompt_len or (16 if dry else 64)
    args.new_tokens = args.new_tokens or (8 if dry else 128)
    args.repeats = args.repeats or (1 if dry else 3)
    names = ["tiny"] if args.tiny else [c for c in args.configs.split(",") if c]
    for name in names:
        if not config_path(name).is_file():
            ap.error(f"--configs: no config file {config_path(name)}")
    decode_name = args.decode_config or names[0]
    if decode_name != "none" and not config_path(decode_name).is_file() and not args.workdir:
        ap.error(f"--decode-config: no config file {config_path(decode_name)}")

    start = time.perf_counter()
    device = jax.devices()[0]
    peak, peak_source = device_peak(args.peak_tflops)
    rows, failed = run_train(names, args, peak)
    section, decode_failed = ({}, False)
    if decode_name != "none":
        section, decode_failed = run_decode(decode_name, args)

    print(
        f"\n# GPU check: {device.device_kind} ({device.platform}, {jax.device_count()} "
        f"device(s), 1 used), jax {jax.__version__}\n"
    )
    print(
        f"MFU peak: {peak / 1e12:.3g} TFLOP/s per device, {peak_source}. Synthetic tokens; "
        f"{args.steps} timed steps after {args.warmup} warm-up steps; tokens/s and MFU from the "
        "best step.\nMTP on/off: D=1 best step time over D=0's. memory: the compiled step's "
        "arguments + outputs + temporaries.\n"
    )
    print_train(rows)
    if section:
        print_decode(section, args)
    print(f"\n(total {time.perf_counter() - start:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": device.device_kind,
                    "platform": device.platform,
                    "jax": jax.__version__,
                    "peak_flops": peak,
                    "peak_source": peak_source,
                    "train": rows,
                    "decode": section,
                },
                f,
                indent=1,
            )
    sys.exit(1 if failed or decode_failed else 0)


if __name__ == "__main__":
    reexec_with_tuned_malloc()  # huge-page malloc, as mtp-train runs (mtp_jax/xla_cpu.py)
    main()
