"""The highest MFU the train step could reach with this backend's own kernels.

    python benchmarks/train_ceiling.py [--configs d0,d1,d2,p2,p4] [--set k=v ...]
        [--repeats 20] [--peak GFLOPS]

For each benchmark config of `train_throughput.py` (same model, batch and loss chunk):

1. Every matmul the train step runs, each jitted alone in the form the model code uses and
   timed with warm caches (best of --repeats): per weight of every trunk layer and MTP
   depth the forward product, the input gradient (dy @ w.T) and the weight gradient
   (`transposed(x) @ dy`, copy included); the attention's six batched products (QK^T and
   PV forward, four in the backward pass, as XLA's `dot_product_attention` writes them);
   per loss chunk the head's three products. Their FLOPs add up to `model_flops` exactly
   (asserted), so "MFU if only matmuls ran" = model FLOPs / (their time) / peak.
2. The two largest parts of the step that are not matmuls, measured alone: the loss's
   softmax / cross-entropy passes over each [B*c, V] chunk (the real `_fused_chunk` with its
   gradients, minus its three matmuls) and the optimizer step on the real parameters
   (`apply_gradients`: AdamW, clipping and the logged norms).

"bound" = model FLOPs / (1 + 2) / peak: the step's MFU if everything else (norms, RoPE,
the attention's mask and softmax, SwiGLU, residuals, the embedding's gather and scatter,
the XLA runtime between ops) took no time at all. `train_throughput.py --ceiling` prints
it next to the measured MFU.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from train_throughput import CONFIGS, make_config

from mtp_jax.loss import _fused_chunk
from mtp_jax.model import Model, ModelConfig, model_flops
from mtp_jax.train.mfu import measured_peak
from mtp_jax.train.state import TrainState, make_optimizer
from mtp_jax.train.step import apply_gradients
from mtp_jax.window import WindowSpec
from mtp_jax.xla_cpu import reexec_with_tuned_malloc, transposed


@dataclasses.dataclass(frozen=True)
class Dot:
    """One matmul of the train step: `count` times a [m, k] x [k, n] product of `form`.

    form: "fwd" x @ w, "dx" dy @ w.T (a transposed operand), "dW" transposed(x) @ dy,
    "attn" (one block's six batched attention products; m, k, n = B, S, H; `heads` N).
    """

    part: str
    form: str
    m: int
    k: int
    n: int
    count: int
    heads: int = 1

    @property
    def flops(self) -> float:
        if self.form == "attn":
            return 6.0 * 2 * self.m * self.heads * self.k * self.k * self.n * self.count
        return 2.0 * self.m * self.k * self.n * self.count


def _dense(part: str, rows: int, fan_in: int, fan_out: int, count: int) -> list[Dot]:
    """Forward, input-gradient and weight-gradient products of a [fan_in, fan_out] weight."""
    return [
        Dot(part, "fwd", rows, fan_in, fan_out, count),
        Dot(part, "dx", rows, fan_out, fan_in, count),
        Dot(part, "dW", fan_in, rows, fan_out, count),
    ]


def loss_chunks(config) -> tuple[int, int]:
    """(sequence positions per loss chunk c, loss chunks per step over all D + 1 depths)."""
    s = config.data.seq_len
    chunk = config.loss.chunk_size if 0 < config.loss.chunk_size < s else s
    return chunk, (config.model.mtp_depth + 1) * (s // chunk)


def step_dots(config) -> list[Dot]:
    """Every matmul of one train step of `config`, grouped by model part."""
    cfg = ModelConfig.from_any(config.model)
    b, s = config.data.batch_size, config.data.seq_len
    rows, blocks = b * s, cfg.n_layers + cfg.mtp_depth
    e, n, nk, h, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim
    dots = (
        _dense("attention projections", rows, e, n * h, blocks)  # query
        + _dense("attention projections", rows, e, nk * h, 2 * blocks)  # key, value
        + _dense("attention projections", rows, n * h, e, blocks)  # out
        + _dense("MLP", rows, e, f, 2 * blocks)  # gate, up
        + _dense("MLP", rows, f, e, blocks)  # down
        + [Dot("attention QK^T, PV", "attn", b, s, h, blocks, heads=n)]
    )
    if cfg.mtp_depth and cfg.mtp_layout == "sequential":
        dots += _dense("MTP projection 2E->E", rows, 2 * e, e, cfg.mtp_depth)
    chunk, chunks = loss_chunks(config)
    dots += _dense("output head (per loss chunk)", b * chunk, e, cfg.vocab_size, chunks)
    return dots


def best_time(fn: Callable, *args, repeats: int) -> float:
    """Fastest of `repeats` calls, in seconds, after one warm-up call."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def _normal(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> jax.Array:
    return jnp.asarray(scale * rng.standard_normal(shape, dtype=np.float32))


def _attention_products(q, k, v, g):
    """The six products of XLA's attention: QK^T and PV, and their four gradients."""

    def core(q, k, v):
        logits = jnp.einsum("BTNH,BSNH->BNTS", q, k)
        return jnp.einsum("BNTS,BSNH->BTNH", logits, v)

    out, vjp = jax.vjp(core, q, k, v)
    return out, vjp(g)


_TIMES: dict[Dot, float] = {}


def time_dot(dot: Dot, repeats: int) -> float:
    """Seconds for one product of `dot`'s shape and form (cached across configs)."""
    key = dataclasses.replace(dot, part="", count=1)
    if key not in _TIMES:
        rng = np.random.default_rng(0)
        m, k, n = dot.m, dot.k, dot.n
        if dot.form == "fwd":
            fn, args = jnp.dot, (_normal(rng, m, k), _normal(rng, k, n))
        elif dot.form == "dx":  # dy [m, k] @ w.T with w [n, k]
            fn, args = (lambda dy, w: jnp.dot(dy, w.T)), (_normal(rng, m, k), _normal(rng, n, k))
        elif dot.form == "dW":  # transposed(x) with x [k, m], then @ dy [k, n]
            fn = lambda x, dy: jnp.dot(transposed(x), dy)  # noqa: E731
            args = (_normal(rng, k, m), _normal(rng, k, n))
        else:  # attention: q, k, v and d out [B, S, N, H]
            args = tuple(_normal(rng, m, k, dot.heads, n) for _ in range(4))
            fn = _attention_products
        _TIMES[key] = best_time(jax.jit(fn), *args, repeats=repeats)
    return _TIMES[key]


def loss_passes_time(config, repeats: int) -> tuple[float, int]:
    """(seconds of one loss chunk's softmax/CE passes, number of chunks per step).

    The real fused chunk (forward and both gradients, no argmax, as the train step runs it)
    minus its three matmuls timed alone.
    """
    cfg = ModelConfig.from_any(config.model)
    b = config.data.batch_size
    chunk, chunks = loss_chunks(config)
    rng = np.random.default_rng(0)
    hidden = _normal(rng, b, chunk, cfg.d_model)
    head = _normal(rng, cfg.d_model, cfg.vocab_size, scale=cfg.init_std)
    targets = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, chunk)), jnp.int32)
    mask = jnp.ones((b, chunk), bool)
    fused = jax.jit(lambda h, w, t, m: _fused_chunk(h, w, t, m, jnp.float32(1.0), True, False))
    whole = best_time(fused, hidden, head, targets, mask, repeats=repeats)
    dots = _dense("", b * chunk, cfg.d_model, cfg.vocab_size, 1)
    return whole - sum(time_dot(d, repeats) for d in dots), chunks


def optimizer_time(config, repeats: int) -> float:
    """Seconds of the optimizer step (`apply_gradients`) on the config's real parameters."""
    model = Model(config.model)
    tx = make_optimizer(config)
    example = WindowSpec.from_config(config).example_input()
    params = jax.jit(lambda key: nn.unbox(model.init(key, example)["params"]))(jax.random.key(0))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    grads = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), params)
    step = jax.jit(lambda state, grads: apply_gradients(tx, state, grads), donate_argnums=0)
    state, _ = step(state, grads)  # compile; then time with a fresh donated state each call
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        state, norms = step(state, grads)
        jax.block_until_ready((state, norms))
        best = min(best, time.perf_counter() - start)
    return best


@dataclasses.dataclass
class Ceiling:
    """One config's bound: matmul seconds per part, the loss passes and the optimizer."""

    flops: float  # model FLOPs per step
    parts: dict[str, tuple[float, float]]  # part -> (FLOPs, seconds) of its matmuls
    loss_passes: float  # seconds per step
    optimizer: float  # seconds per step

    @property
    def matmul_time(self) -> float:
        return sum(t for _, t in self.parts.values())

    @property
    def time(self) -> float:
        return self.matmul_time + self.loss_passes + self.optimizer


def ceiling(config, repeats: int = 20) -> Ceiling:
    """Measures `config`'s bound (module docstring)."""
    dots = step_dots(config)
    flops = model_flops(config) * config.data.batch_size * config.data.seq_len
    listed = sum(d.flops for d in dots)
    assert abs(listed / flops - 1) < 1e-9, f"matmuls listed {listed:.4g} != model FLOPs {flops:.4g}"
    parts: dict[str, tuple[float, float]] = {}
    for dot in dots:
        fl, t = parts.get(dot.part, (0.0, 0.0))
        parts[dot.part] = (fl + dot.flops, t + dot.count * time_dot(dot, repeats))
    per_chunk, chunks = loss_passes_time(config, repeats)
    return Ceiling(flops, parts, per_chunk * chunks, optimizer_time(config, repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {list(CONFIGS)}")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. a.b=1")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--peak", type=float, default=0.0, help="GFLOP/s (default: measured)")
    args = parser.parse_args()
    peak = args.peak * 1e9 or measured_peak()
    print(
        f"jax {jax.__version__}, {jax.devices()[0].device_kind}; peak {peak / 1e9:.1f} GFLOP/s "
        f"({'given' if args.peak else 'measured f32 2048^2 matmul'}; load "
        f"{os.getloadavg()[0]:.2f})\n"
    )
    results = {
        name: ceiling(make_config(name, args.set), args.repeats) for name in args.configs.split(",")
    }
    print("| config | part | GFLOP/step | ms/step | % of peak |\n|---|---|---|---|---|")
    for name, c in results.items():
        for part, (fl, t) in c.parts.items():
            print(
                f"| {name} | {part} | {fl / 1e9:.1f} | {t * 1e3:.1f} | {100 * fl / t / peak:.1f} |"
            )
    print(
        "\n| config | model GFLOP/step | matmuls ms | MFU if only matmuls ran | + loss "
        "softmax/CE ms | + optimizer ms | bound ms | MFU bound |\n|---|---|---|---|---|---|---|---|"
    )
    for name, c in results.items():
        print(
            f"| {name} | {c.flops / 1e9:.1f} | {c.matmul_time * 1e3:.1f} | "
            f"{100 * c.flops / c.matmul_time / peak:.1f}% | {c.loss_passes * 1e3:.1f} | "
            f"{c.optimizer * 1e3:.1f} | {c.time * 1e3:.1f} | {100 * c.flops / c.time / peak:.1f}% |"
        )


if __name__ == "__main__":
    reexec_with_tuned_malloc()  # huge-page malloc, as mtp-train runs (mtp_jax/xla_cpu.py)
    main()
