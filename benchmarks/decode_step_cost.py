"""Cost of one speculative step against one plain decode step, and the speedup it allows.

    python benchmarks/decode_step_cost.py [--models 128x2,128x6,256x8] [--depths 1,2,3]

Self-speculative decoding at D depths emits at most D + 1 tokens per step, so its speedup
over plain greedy decoding is at most (D + 1) * t_plain / t_step, reached at perfect
acceptance. This measures t_plain (µs per generated token of `generate`) and t_step (µs per
draft -> verify -> accept step of `speculative_generate`) on random-init byte-level models
(`configs/smoke.py` with E x layers from --models, MLP 3E, 4 heads), batch 1, a 48-token
prompt and --max-new-tokens tokens; each figure is the fastest of --repeats runs after a
warm-up. Random weights make acceptance ~0, so every step emits one token and the step count
is exact. Prints a markdown table with that upper bound next to each ratio.
"""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np
from decode import sliced, smoke_config  # benchmarks/decode.py, next to this script

import mtp_jax
from mtp_jax.inference import generate, speculative_generate
from mtp_jax.xla_cpu import reexec_with_tuned_malloc


def model_and_params(width: int, layers: int, depth: int, prompt: int):
    """A random-init sequential byte model (`decode.smoke_config` at this width and depth)."""
    cfg = smoke_config("sequential", steps=1, depth=depth, layers=layers, width=width)
    model = mtp_jax.Model(cfg.model)
    params = model.init(jax.random.key(0), np.zeros((1, prompt + depth), np.int32))["params"]
    return model, params


def fastest(fn, args, max_new: int, repeats: int):
    fn(*args, max_new_tokens=max_new)  # compile and warm up
    runs = [fn(*args, max_new_tokens=max_new) for _ in range(repeats)]
    return min(runs, key=lambda r: r.stats["seconds"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="128x2,128x6,256x8", help="E x layers, comma-separated")
    ap.add_argument("--depths", default="1,2,3")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    prompt_len, n = 48, args.max_new_tokens
    prompt = np.random.default_rng(0).integers(0, 256, (1, prompt_len)).astype(np.int32)
    depths = [int(d) for d in args.depths.split(",")]
    print(
        f"batch 1, {n} new tokens, random init, best of {args.repeats}, "
        f"{jax.devices()[0].platform} ({os.cpu_count()} cores)\n"
    )
    print(
        "| model | plain µs/token | D | speculative µs/step | ratio | speedup bound (D+1)/ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for spec in args.models.split(","):
        width, layers = (int(x) for x in spec.split("x"))
        model, params = model_and_params(width, layers, max(depths), prompt_len)
        call = (model, params, prompt, np.array([prompt_len]))
        plain = fastest(generate, call, n, args.repeats).stats["seconds"] / n * 1e6
        cfg = mtp_jax.ModelConfig.from_any(model.config)
        for depth in depths:
            res = fastest(
                speculative_generate, (*sliced(cfg, params, depth), *call[2:]), n, args.repeats
            )
            step = res.stats["seconds"] / res.stats["steps"] * 1e6
            print(
                f"| E={width}, {layers} layers | {plain:.0f} | {depth} | {step:.0f} | "
                f"{step / plain:.2f} | {(depth + 1) * plain / step:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    reexec_with_tuned_malloc()  # as mtp-generate runs (mtp_jax/xla_cpu.py)
    main()
