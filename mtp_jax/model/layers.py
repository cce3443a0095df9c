"""Transformer building blocks: RMSNorm, rotary embedding, GQA attention with a KV cache,
SwiGLU MLP and the pre-norm block.

Every parameter carries logical axis names (mapped to mesh axes in `mtp_jax.sharding`).
Activations at block boundaries carry `('batch', 'length', 'act_embed')`.

A KV cache is a `KVCache(k [B, L, K, H], v [B, L, K, H])`: slot j holds the key/value of
absolute position j. A call with a cache writes its T new keys at `positions[:, 0] + [0, T)`
of each row and attends to every slot at or before each query's position, so rolling a row
back (after rejected speculative drafts) is just decoding again from an earlier position.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The model's hyperparameters (the `model.*` config keys), frozen and hashable."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_dim: int
    mtp_depth: int = 0
    mtp_layout: str = "sequential"
    dtype: str = "float32"
    param_dtype: str = "float32"
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    remat_policy: str = "none"
    scan_layers: bool = True
    scan_unroll: int = 0
    init_std: float = 0.02
    attention_impl: str = "auto"

    @classmethod
    def from_any(cls, config: Any) -> ModelConfig:
        """Accepts a ModelConfig, a `config.model` ConfigDict or a plain dict."""
        if isinstance(config, cls):
            return config
        values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    @property
    def compute_dtype(self) -> Any:
        return _DTYPES[self.dtype]

    @property
    def weight_dtype(self) -> Any:
        return _DTYPES[self.param_dtype]


class KVCache(NamedTuple):
    """Keys and values of one attention layer: k, v [B, L, K, H] (L = cache length)."""

    k: Array
    v: Array


def _init(cfg: ModelConfig, names: tuple[str | None, ...], fan_in_scale: bool = False):
    init = nn.initializers.normal(cfg.init_std)
    return nn.with_logical_partitioning(init, names)


def scan_unroll(cfg: ModelConfig, length: int) -> int:
    """Iterations per loop trip of the `nn.scan` over `length` layers or depths.

    `model.scan_unroll` > 0 is taken as given (capped at `length`). 0 (auto) unrolls the whole
    scan when compiling for CPUs and keeps one iteration per trip elsewhere; the platform is
    the current mesh's (`jax.set_mesh`: an AOT compile for a TPU slice on a CPU host counts
    as TPU), else the default backend's.

    On XLA:CPU, a scan's backward pass slices each layer's saved activations out of the
    stacked [length, ...] buffer, and XLA fuses that dynamic slice into the weight gradient's
    transposed copy, which then runs as a slow element loop (a [2048, 1024] copy: 6 ms
    instead of 0.3). Unrolled, the slices are static and the copies fast: the train
    benchmark's step is 4-10% faster. On TPUs and GPUs, one layer per trip keeps compile
    times flat in depth.
    """
    if cfg.scan_unroll:
        return min(cfg.scan_unroll, length)
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    platform = device.platform if device is not None else jax.default_backend()
    return length if platform == "cpu" else 1


def remat(module_cls: type[nn.Module], policy: str, static_argnums: tuple[int, ...] = ()):
    """Wraps a module class in `nn.remat` according to `model.remat_policy`."""
    if policy == "none":
        return module_cls
    policies = {
        "full": None,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }
    return nn.remat(
        module_cls, policy=policies[policy], prevent_cse=False, static_argnums=static_argnums
    )


class RMSNorm(nn.Module):
    """x / rms(x) * scale over the last axis, computed in float32."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            (x.shape[-1],),
            self.cfg.weight_dtype,
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.norm_eps)
        return (y * scale.astype(jnp.float32)).astype(self.cfg.compute_dtype)


def transposed(x: Array) -> Array:
    """x [N, K] -> x.T [K, N] as a real transposed copy, not a transposed dot operand.

    XLA:CPU runs x.T @ g (a weight gradient) 1.2-1.5x slower than the same dot on an
    explicitly transposed copy (MLP [256,2048]x[2048,1024]: 60% -> 88% of the matmul peak;
    the loss's d head [256,1024]x[1024,32000]: 77% -> 95%). The barrier stops XLA folding
    the copy back into the dot; the copy is small next to the dot.
    """
    return jax.lax.optimization_barrier(jnp.transpose(x))


@jax.custom_vjp
def dense(x: Array, w: Array) -> Array:
    """x [N, K] @ w [K, M] -> [N, M], whose weight gradient is `transposed(x) @ dy`."""
    return jnp.dot(x, w)


def _dense_fwd(x: Array, w: Array):
    return jnp.dot(x, w), (x, w)


def _dense_bwd(residuals, dy: Array):
    x, w = residuals
    return jnp.dot(dy, w.T).astype(x.dtype), jnp.dot(transposed(x), dy).astype(w.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`nn.Dense(dot_general=...)`: `dense` for plain 2-D [N, K] x [K, M] products."""
    (lc, rc), (lb, rb) = dimension_numbers
    plain = lhs.ndim == 2 and rhs.ndim == 2 and tuple(lc) == (1,) and tuple(rc) == (0,)
    if plain and not lb and not rb and precision is None and preferred_element_type is None:
        return dense(lhs, rhs)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type)


def matmul(x: Array, w: Array, contract: int = 1) -> Array:
    """Contracts the last `contract` axes of x with the first `contract` axes of w.

    x [..., *C], w [*C, *O] -> [..., *O], computed as one 2-D matmul [prod(...), prod(C)] x
    [prod(C), prod(O)]. The same contraction as the einsum, but on CPUs XLA's backward of a
    dot_general with several contracting (batch-like) axes materialises transposed copies
    of the activations; the 2-D form keeps every weight gradient a plain x^T @ dy
    (about 2.5x faster for the SwiGLU MLP's forward + backward).
    """
    lead, inner, out = (
        x.shape[: x.ndim - contract],
        x.shape[x.ndim - contract :],
        w.shape[contract:],
    )
    k = math.prod(inner)
    y = dense(x.reshape(-1, k), w.reshape(k, -1))
    return y.reshape(lead + out)


def rope(x: Array, positions: Array, theta: float) -> Array:
    """Rotary position embedding. x [B, T, N, H], positions [B, T] -> [B, T, N, H]."""
    half = x.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [H/2]
    angles = positions[..., None].astype(jnp.float32) * freqs  # [B, T, H/2]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def _write_cache(cache: Array, new: Array, start: Array) -> Array:
    """Per row b: cache[b, start[b] : start[b] + T] = new[b].

    cache [B, L, K, H], new [B, T, K, H], start [B].
    """
    return jax.vmap(lambda c, n, s: jax.lax.dynamic_update_slice_in_dim(c, n, s, axis=0))(
        cache, new.astype(cache.dtype), start
    )


class Attention(nn.Module):
    """Causal grouped-query attention with RoPE and an optional KV cache."""

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        x: Array,
        positions: Array,
        segment_ids: Array | None = None,
        cache: KVCache | None = None,
    ) -> tuple[Array, KVCache | None]:
        """x [B, T, E], positions [B, T], segment_ids [B, T] (training only) -> [B, T, E]."""
        cfg = self.cfg
        e, n, nk, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

        def proj(name, shape, names, inp, contract=1):
            w = self.param(name, _init(cfg, names), shape, cfg.weight_dtype)
            return matmul(inp, w.astype(cfg.compute_dtype), contract)

        q = proj("query", (e, n, h), ("embed", "heads", "kv"), x)
        k = proj("key", (e, nk, h), ("embed", "kv_heads", "kv"), x)
        v = proj("value", (e, nk, h), ("embed", "kv_heads", "kv"), x)
        q = rope(q, positions, cfg.rope_theta)
        k = rope(k, positions, cfg.rope_theta)

        if cache is None:
            is_causal = segment_ids is None
            mask = None
            if segment_ids is not None:
                causal = positions[:, :, None] >= positions[:, None, :]
                same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
                mask = (causal & same_doc)[:, None]  # [B, 1, T, T]
            new_cache = None
        else:
            start = positions[:, 0]
            new_cache = KVCache(_write_cache(cache.k, k, start), _write_cache(cache.v, v, start))
            k, v = new_cache.k.astype(q.dtype), new_cache.v.astype(q.dtype)
            slots = jnp.arange(k.shape[1])
            mask = (slots[None, None, :] <= positions[:, :, None])[:, None]  # [B, 1, T, L]
            is_causal = False
        out = jax.nn.dot_product_attention(
            q, k, v, mask=mask, is_causal=is_causal, implementation=_impl(cfg, mask)
        )
        out = proj("out", (n, h, e), ("heads", "kv", "embed"), out, contract=2)
        return out, new_cache


def _impl(cfg: ModelConfig, mask: Array | None) -> str:
    # cuDNN's fused kernel takes no dense mask (packed documents, KV caches): XLA there.
    if mask is not None or cfg.attention_impl == "xla":
        return "xla"
    if cfg.attention_impl == "cudnn" or jax.default_backend() == "gpu":
        return "cudnn"
    return "xla"


class Mlp(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). [B, T, E] -> [B, T, E]."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        linear = lambda feats, names, name: nn.Dense(  # noqa: E731
            feats,
            use_bias=False,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.weight_dtype,
            kernel_init=_init(cfg, names),
            dot_general=dense_dot_general,
            name=name,
        )
        # Dense layers on [B*T, E] rows (see `matmul`: 2-D weight gradients are much faster).
        rows = x.reshape(-1, x.shape[-1])
        gate = linear(cfg.mlp_dim, ("embed", "mlp"), "gate")(rows)
        up = linear(cfg.mlp_dim, ("embed", "mlp"), "up")(rows)
        h = (nn.silu(gate) * up).reshape(x.shape[:-1] + (cfg.mlp_dim,))
        h = nn.with_logical_constraint(h, ("batch", "length", "act_mlp"))
        out = linear(cfg.d_model, ("mlp", "embed"), "down")(h.reshape(-1, cfg.mlp_dim))
        return out.reshape(x.shape[:-1] + (cfg.d_model,))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(x))."""

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        x: Array,
        positions: Array,
        segment_ids: Array | None = None,
        cache: KVCache | None = None,
    ) -> tuple[Array, KVCache | None]:
        """x [B, T, E] -> ([B, T, E], updated cache)."""
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        h, cache = Attention(self.cfg, name="attn")(
            RMSNorm(self.cfg, name="attn_norm")(x), positions, segment_ids, cache
        )
        x = x + h
        x = x + Mlp(self.cfg, name="mlp")(RMSNorm(self.cfg, name="mlp_norm")(x))
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        return x, cache


class ScanBlock(nn.Module):
    """`Block` in the (carry, xs) -> (carry, ys) form `nn.scan` over layers expects."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids, cache):
        x, cache = remat(Block, self.cfg.remat_policy)(self.cfg, name="block")(
            x, positions, segment_ids, cache
        )
        return x, cache
