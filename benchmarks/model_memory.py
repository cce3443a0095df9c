"""Compiled memory of the full train step vs MTP depth, with and without the chunked loss.

    python benchmarks/model_memory.py [--configs smoke,mid] [--depths 0,1,2,4] [--chunk 256]

For each config and D in --depths (sequential layout), AOT-compiles the real train step
(`make_train_step`, donated state, abstract inputs: nothing is allocated) with the chunked
loss (`loss.chunk_size=--chunk`) and the unchunked one (`loss.chunk_size=0`), and prints a
markdown table of XLA's temp (scratch) bytes, the increment per added depth, and the model
FLOPs per token. For reference it prints the size of one [B, S, V] float32 logits tensor, one
[B, c, V] chunk of it, and one transformer block's activations, measured as the temp growth
of one more trunk layer at D=0 (unchunked loss: the block's saved activations).

Configs: `smoke` = configs/smoke.py; `mid` = configs/gpu_125m.py (V=32k, E=768, 12 layers)
with S=1024, B=8, float32 and its remat policy (dots_no_batch); `mid-noremat` = the same
without remat. CPU only; a mid-size compile takes about half a minute.
"""

from __future__ import annotations

import argparse
import os
import time

import jax

from mtp_jax.config import load_config
from mtp_jax.model import Model, model_flops
from mtp_jax.sharding import batch_sharding, make_mesh, replicated, with_shardings
from mtp_jax.train.state import abstract_state, make_optimizer
from mtp_jax.train.step import make_train_step, mesh_context
from mtp_jax.window import WindowSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIGS = {
    "smoke": ("configs/smoke.py", []),
    "mid": (
        "configs/gpu_125m.py",
        ["data.seq_len=1024", "data.batch_size=8", "model.dtype=float32"],
    ),
    "mid-noremat": (
        "configs/gpu_125m.py",
        [
            "data.seq_len=1024",
            "data.batch_size=8",
            "model.dtype=float32",
            "model.remat_policy=none",
        ],
    ),
}


def get_config(name: str, overrides: list[str]):
    path, base = CONFIGS[name]
    return load_config(os.path.join(ROOT, path), base + ["data.source=synthetic"] + overrides)


def compile_train_step(config):
    """The train step compiled as `compile_steps` does (shardings, donation), train only."""
    mesh = make_mesh(config.mesh, jax.devices()[:1])
    model = Model(config.model)
    tx = make_optimizer(config)
    abstract, shardings = abstract_state(config, model, tx, mesh)
    bsh = batch_sharding(mesh)
    batch = WindowSpec.from_config(config).abstract_batch(bsh)
    state = with_shardings(abstract, shardings)
    step = jax.jit(
        make_train_step(config, model, tx),
        in_shardings=(shardings, {k: bsh for k in batch}),
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=0,
    )
    with mesh_context(mesh):
        return step.lower(state, batch).compile()


def temp_bytes(name: str, overrides: list[str]) -> int:
    compiled = compile_train_step(get_config(name, overrides))
    return int(compiled.memory_analysis().temp_size_in_bytes)


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def bench(name: str, depths: list[int], chunk: int) -> list[str]:
    base = get_config(name, [])
    b, s, v = base.data.batch_size, base.data.seq_len, base.model.vocab_size
    chunk = min(chunk, s // 2)
    layers = base.model.n_layers
    start = time.perf_counter()
    mem = {}
    for c in (chunk, 0):
        for d in depths:
            mem[c, d] = temp_bytes(name, [f"model.mtp_depth={d}", f"loss.chunk_size={c}"])
    # One block's activations: the temp growth of one more trunk layer (D=0, unchunked).
    block = (
        temp_bytes(name, ["model.mtp_depth=0", "loss.chunk_size=0", f"model.n_layers={layers + 1}"])
        - mem[0, 0]
    )
    logits = b * s * v * 4
    rows = []
    for c in (chunk, 0):
        for i, d in enumerate(depths):
            flops = model_flops(get_config(name, [f"model.mtp_depth={d}"]))
            if i:
                prev = depths[i - 1]
                inc = (mem[c, d] - mem[c, prev]) / (d - prev)
                inc_s = f"{mib(inc)} ({inc / logits:.2f} BSV, {inc / block:.2f} blk)"
            else:
                inc_s = "-"
            rows.append(
                f"| {name} | {d} | {c or 'off'} | {mib(mem[c, d])} | {inc_s} | {flops / 1e6:,.2f} |"
            )
    ref = (
        f"{name}: B={b} S={s} V={v} E={base.model.d_model} layers={layers} "
        f"remat={base.model.remat_policy} dtype={base.model.dtype}; one [B,S,V] f32 logits = "
        f"{mib(logits)} MiB; one [B,c={chunk},V] chunk = {mib(b * chunk * v * 4)} MiB; "
        f"one block's activations (measured, +1 trunk layer) = {mib(block)} MiB; "
        f"{time.perf_counter() - start:.0f} s of compiles"
    )
    return rows, ref


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="smoke,mid", help=f"subset of {list(CONFIGS)}")
    parser.add_argument("--depths", default="0,1,2,4")
    parser.add_argument("--chunk", type=int, default=256, help="loss.chunk_size when chunked")
    args = parser.parse_args()
    depths = [int(x) for x in args.depths.split(",")]
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, load {os.getloadavg()[0]:.2f}")
    print()
    print(
        "| config | D | loss chunk | temp MiB | per added depth MiB (in [B,S,V] f32 logits, "
        "in blocks) | model MFLOP/token |"
    )
    print("|---|---|---|---|---|---|")
    refs = []
    for name in args.configs.split(","):
        rows, ref = bench(name, depths, args.chunk)
        print("\n".join(rows), flush=True)
        refs.append(ref)
    print()
    for ref in refs:
        print("- " + ref)


if __name__ == "__main__":
    main()
