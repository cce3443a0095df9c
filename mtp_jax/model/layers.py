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

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax import xla_cpu
from mtp_jax.model.config import ModelConfig, RopeScalingConfig
from mtp_jax.model.splash import splash_attention
from mtp_jax.model.splash import supports as splash_supports

Array = jax.Array


class KVCache(NamedTuple):
    """Keys and values of one attention layer: k, v [B, L, K, H] (L = cache length)."""

    k: Array
    v: Array


def _init(cfg: ModelConfig, names: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), names)


def dense(x: Array, w: Array, contract: int = 1) -> Array:
    """Contracts the last `contract` axes of x with the first `contract` axes of w.

    x [..., *C], w [*C, *O] -> [..., *O]: `jnp.tensordot`, or its XLA:CPU form (`xla_cpu.dense`).
    """
    if xla_cpu.active():
        return xla_cpu.dense(x, w, contract)
    return jnp.tensordot(x, w, contract)


def scan_unroll(cfg: ModelConfig, length: int) -> int:
    """Iterations per loop trip of the `nn.scan` over `length` layers or depths (see
    `xla_cpu.scan_unroll`: `model.scan_unroll`, or auto by platform)."""
    return xla_cpu.scan_unroll(cfg.scan_unroll, length)


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


class Linear(nn.Module):
    """y = dense(x, kernel) with kernel [in, features] named `names` (no bias)."""

    cfg: ModelConfig
    features: int
    names: tuple[str, str]

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x [..., in] -> [..., features]."""
        cfg = self.cfg
        shape = (x.shape[-1], self.features)
        kernel = self.param("kernel", _init(cfg, self.names), shape, cfg.weight_dtype)
        return dense(x.astype(cfg.compute_dtype), kernel.astype(cfg.compute_dtype))


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


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 mscale ln(scale) + 1 (1 for scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(dim: int, theta: float, scaling: RopeScalingConfig) -> np.ndarray:
    """Inverse frequencies [dim/2] (float64) of a rotated width `dim` (head_dim for GQA,
    qk_rope_head_dim for MLA), as transformers' `modeling_rope_utils` computes them:

    - none: theta^(-2j/dim).
    - llama3 (`_compute_llama3_parameters`): with wavelength w = 2 pi / f and L the original
      context, w > L / low_freq_factor -> f / factor; w < L / high_freq_factor -> f; between,
      (1 - a) f / factor + a f with a = (L / w - low_freq_factor) / (high - low freq factor).
    - yarn (`_compute_yarn_parameters`): correction dims d(b) = dim ln(L / (2 pi b)) /
      (2 ln theta) for b = beta_fast (low) and beta_slow (high), floored / ceiled when
      `truncate`, clipped to [0, dim - 1]; ramp r_j = clip((j - low) / (high - low), 0, 1)
      (high += 0.001 when equal); f = f_plain / factor * r + f_plain * (1 - r).
    """
    f = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    s = scaling
    if s.type == "llama3":
        L = s.original_max_position_embeddings
        wavelen = 2 * math.pi / f
        out = np.where(wavelen > L / s.low_freq_factor, f / s.factor, f)
        smooth = (L / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        medium = (wavelen >= L / s.high_freq_factor) & (wavelen <= L / s.low_freq_factor)
        return np.where(medium, (1 - smooth) * out / s.factor + smooth * out, out)
    if s.type == "yarn":
        L = s.original_max_position_embeddings

        def correction_dim(rotations: float) -> float:
            return dim * math.log(L / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
        if s.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        return f / s.factor * ramp + f * (1 - ramp)
    return f


def rope_attention_factor(scaling: RopeScalingConfig) -> float:
    """The factor on cos and sin (transformers' `attention_factor` / vLLM's `mscale`): 1 but
    for yarn, where it is `attention_factor` if set, else mscale(s, mscale) /
    mscale(s, mscale_all_dim) when both are set (DeepSeek-V3: 1.0), else mscale(s)."""
    s = scaling
    if s.type != "yarn":
        return 1.0
    if s.attention_factor:
        return float(s.attention_factor)
    if s.mscale and s.mscale_all_dim:
        return yarn_mscale(s.factor, s.mscale) / yarn_mscale(s.factor, s.mscale_all_dim)
    return yarn_mscale(s.factor)


def rope(
    x: Array, positions: Array, theta: float, scaling: RopeScalingConfig | None = None
) -> Array:
    """Rotary position embedding (rotate-half form). x [B, T, N, H], positions [B, T] ->
    [B, T, N, H]. `scaling` (model.rope_scaling) changes the frequencies and multiplies cos
    and sin by `rope_attention_factor`; None or type 'none' is plain RoPE."""
    half = x.shape[-1] // 2
    if scaling is None or not scaling.enabled:
        freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [H/2]
        mag = None
    else:
        freqs = jnp.asarray(rope_inv_freq(2 * half, theta, scaling), jnp.float32)
        mag = rope_attention_factor(scaling)
    angles = positions[..., None].astype(jnp.float32) * freqs  # [B, T, H/2]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    if mag is not None and mag != 1.0:
        sin, cos = sin * mag, cos * mag
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
            return dense(inp, w.astype(cfg.compute_dtype), contract)

        q = proj("query", (e, n, h), ("embed", "heads", "kv"), x)
        k = proj("key", (e, nk, h), ("embed", "kv_heads", "kv"), x)
        v = proj("value", (e, nk, h), ("embed", "kv_heads", "kv"), x)
        # transformers' LlamaAttention keeps 1/sqrt(H) whatever the rope scaling.
        q = rope(q, positions, cfg.rope_theta, cfg.rope_scaling)
        k = rope(k, positions, cfg.rope_theta, cfg.rope_scaling)

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
        impl = attention_impl(cfg, q.shape[1], cached=cache is not None, masked=mask is not None)
        if impl == "splash":
            out = splash_attention(q, k, v, segment_ids)
        else:
            out = jax.nn.dot_product_attention(
                q, k, v, mask=mask, is_causal=is_causal, implementation=impl
            )
        out = proj("out", (n, h, e), ("heads", "kv", "embed"), out, contract=2)
        return out, new_cache


def attention_impl(cfg: ModelConfig, seq_len: int, cached: bool, masked: bool) -> str:
    """The attention kernel for one call: 'splash' (Pallas, TPU), 'cudnn' or 'xla'.

    `model.attention_impl` auto picks splash when compiling for TPUs (the current mesh's
    platform, so AOT plans for a slice count) for training forwards whose length the kernel
    takes, cuDNN on GPUs when no dense mask is needed, else XLA. Decoding (`cached`) always
    runs XLA: its queries attend to a cache, not a causal square. MLA (`model.attention`) takes the
    kernel only when asked (splash): auto keeps XLA there, since the DeepSeek-V3 plan on
    v5p:8x8x8 needed 3.9 GiB more temporaries per chip with the kernel at S = 4096 (README,
    "Planning a TPU run"); MLA has no cuDNN path.
    """
    choice = cfg.attention_impl
    platform = xla_cpu.compile_platform()
    if cached or choice == "xla":
        return "xla"
    auto_splash = platform == "tpu" and splash_supports(seq_len) and cfg.attention != "mla"
    if choice == "splash" or (choice == "auto" and auto_splash):
        return "splash"
    if cfg.attention == "mla":
        return "xla"
    # cuDNN's fused kernel takes no dense mask (packed documents): XLA there.
    if not masked and (choice == "cudnn" or (choice == "auto" and platform == "gpu")):
        return "cudnn"
    return "xla"


def attention_class(cfg: ModelConfig) -> type[nn.Module]:
    """`model.attention`: Attention (mha) or MLAttention (mla, `mtp_jax.model.mla`)."""
    if cfg.attention == "mla":
        from mtp_jax.model.mla import MLAttention

        return MLAttention
    return Attention


class Mlp(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). [B, T, E] -> [B, T, E]; hidden width `width`
    (0 = model.mlp_dim)."""

    cfg: ModelConfig
    width: int = 0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        width = self.width or cfg.mlp_dim
        gate = Linear(cfg, width, ("embed", "mlp"), name="gate")(x)
        up = Linear(cfg, width, ("embed", "mlp"), name="up")(x)
        h = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "act_mlp"))
        return Linear(cfg, cfg.d_model, ("mlp", "embed"), name="down")(h)


def layer_is_moe(cfg: ModelConfig, layer: int) -> bool:
    """Whether trunk layer `layer` (0-based) has the MoE FFN (`model.moe.first_dense_layers`
    leading layers keep the dense MLP)."""
    return cfg.moe.enabled and layer >= cfg.moe.first_dense_layers


def depth_is_moe(cfg: ModelConfig) -> bool:
    """Whether the MTP depths' blocks have the MoE FFN (the trunk's type unless
    `model.moe.dense_mtp`)."""
    return cfg.moe.enabled and not cfg.moe.dense_mtp


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + ffn(norm(x)); the FFN is the
    SwiGLU MLP, or DeepSeekMoE (`mtp_jax.model.moe.MoE`) with `moe`."""

    cfg: ModelConfig
    moe: bool = False

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
        h, cache = attention_class(self.cfg)(self.cfg, name="attn")(
            RMSNorm(self.cfg, name="attn_norm")(x), positions, segment_ids, cache
        )
        x = x + h
        h = RMSNorm(self.cfg, name="mlp_norm")(x)
        if self.moe:
            from mtp_jax.model.moe import MoE

            x = x + MoE(self.cfg, name="mlp")(h, decoding=cache is not None)
        else:
            x = x + Mlp(self.cfg, name="mlp")(h)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        return x, cache


class ScanBlock(nn.Module):
    """`Block` in the (carry, xs) -> (carry, ys) form `nn.scan` over layers expects."""

    cfg: ModelConfig
    moe: bool = False

    @nn.compact
    def __call__(self, x, positions, segment_ids, cache):
        x, cache = remat(Block, self.cfg.remat_policy)(self.cfg, self.moe, name="block")(
            x, positions, segment_ids, cache
        )
        return x, cache
