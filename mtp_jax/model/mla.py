"""DeepSeek-V2/V3 multi-head latent attention (MLA) with a compressed decode cache.

Shapes: B batch, T new tokens, L cache slots, E d_model, N n_heads, H head_dim (the "nope"
part of queries/keys and the value width), R qk_rope_head_dim (the decoupled RoPE part),
C kv_lora_rank (the KV latent), Q q_lora_rank (the query latent; 0 = full-rank queries).

```
q      = x @ W_q [E, N, H+R]            or  norm(x @ W_dq [E, Q]) @ W_uq [Q, N, H+R]
c, k_r = split(x @ W_dkv [E, C+R])      c -> kv_norm (the latent), k_r -> rope (one shared head)
k_nope = c @ W_uk [C, N, H]             v = c @ W_uv [C, N, H]
scores = (q_nope . k_nope + rope(q_r) . k_r) / sqrt(H + R);  out = softmax(scores) v @ W_o
```
(`model.rope_scaling` yarn with mscale_all_dim also multiplies the 1/sqrt(H + R) by
mscale^2, as DeepSeek's attention does: `softmax_scale`.)
Training runs this form: `naive_attention` in XLA, or on TPUs the Pallas splash kernel
(`splash_mla`, `model.attention_impl` auto | splash), which never forms the scores. Decoding
keeps only `LatentCache(latent [B, L, C], rope_key [B, L, R])` (C + R values per token and
layer instead of 2 K H) and runs the weight-absorbed form:
q_lat = q_nope @ W_uk^T [B, T, N, C], scores = q_lat . latent + q_r . rope_key, out =
((probs . latent) @ W_uv) @ W_o, so per-head keys and values over the cache never exist. Cache
writes and the causal mask follow `KVCache` (see `mtp_jax.model.layers`): T new slots at
`positions[:, 0] + [0, T)`, each query sees the slots at or before its position.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtp_jax.model.config import ModelConfig
from mtp_jax.model.layers import (
    RMSNorm,
    _init,
    _write_cache,
    attention_impl,
    dense,
    rope,
    yarn_mscale,
)
from mtp_jax.model.splash import splash_attention

Array = jax.Array


class LatentCache(NamedTuple):
    """The MLA decode cache of one layer: latent [B, L, C] (after kv_norm) and the RoPE'd
    shared key rope_key [B, L, R]; slot j holds absolute position j."""

    latent: Array
    rope_key: Array


def _softmax(scores: Array, mask: Array) -> Array:
    """scores [B, N, T, S] f32, mask broadcastable to it -> attention probabilities, f32."""
    return jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1)


def _einsum(spec: str, a: Array, b: Array) -> Array:
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


class MLAttention(nn.Module):
    """Causal multi-head latent attention; the same call contract as `layers.Attention`.

    The softmax is written out in float32 (`model.attention_impl` does not apply):
    `jax.nn.dot_product_attention` wants values as wide as keys (H vs H + R here).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        x: Array,
        positions: Array,
        segment_ids: Array | None = None,
        cache: LatentCache | None = None,
    ) -> tuple[Array, LatentCache | None]:
        """x [B, T, E], positions [B, T], segment_ids [B, T] (training only) -> ([B, T, E],
        the updated cache or None)."""
        cfg = self.cfg
        e, n, h, r, c, ql = _dims(cfg)
        dt = cfg.compute_dtype

        def weight(name, shape, names):
            return self.param(name, _init(cfg, names), shape, cfg.weight_dtype).astype(dt)

        x = x.astype(dt)
        if ql:
            cq = RMSNorm(cfg, name="q_norm")(
                dense(x, weight("q_down", (e, ql), ("embed", "q_lora")))
            )
            q = dense(cq, weight("q_up", (ql, n, h + r), ("q_lora", "heads", "kv")))
        else:
            q = dense(x, weight("query", (e, n, h + r), ("embed", "heads", "kv")))
        rs = cfg.rope_scaling
        q_nope, q_rope = q[..., :h], rope(q[..., h:], positions, cfg.rope_theta, rs)  # [B,T,N,*]

        kv = dense(x, weight("kv_down", (e, c + r), ("embed", "kv_lora")))  # [B, T, C+R]
        latent = RMSNorm(cfg, name="kv_norm")(kv[..., :c])  # [B, T, C]
        rope_key = rope(kv[..., None, c:], positions, cfg.rope_theta, rs)[:, :, 0]  # [B, T, R]
        w_uk = weight("k_up", (c, n, h), ("kv_lora", "heads", "kv"))
        w_uv = weight("v_up", (c, n, h), ("kv_lora", "heads", "kv"))
        scale = softmax_scale(cfg)

        if cache is None:
            k_nope, v = dense(latent, w_uk), dense(latent, w_uv)  # [B, T, N, H]
            masked = segment_ids is not None
            if attention_impl(cfg, x.shape[1], cached=False, masked=masked) == "splash":
                out = splash_mla(q_nope, q_rope, k_nope, rope_key, v, segment_ids, scale)
            else:
                mask = _training_mask(positions, segment_ids)
                out = naive_attention(q_nope, q_rope, k_nope, rope_key, v, scale, mask)
            new_cache = None
        else:
            start = positions[:, 0]
            new_cache = LatentCache(
                _write_cache(cache.latent, latent, start),
                _write_cache(cache.rope_key, rope_key, start),
            )
            slots = jnp.arange(cache.latent.shape[1])
            mask = (slots[None, None, :] <= positions[:, :, None])[:, None]  # [B, 1, T, L]
            latents, keys = new_cache.latent.astype(dt), new_cache.rope_key.astype(dt)
            out = absorbed_attention(q_nope, q_rope, latents, keys, w_uk, w_uv, scale, mask)
        out = dense(out.astype(dt), weight("out", (n, h, e), ("heads", "kv", "embed")), 2)
        return out, new_cache


def _training_mask(positions: Array, segment_ids: Array | None) -> Array:
    """Causal, and within one packed document when segment_ids [B, T] are given (as
    `layers.Attention`): [1 or B, 1, T, T] bool."""
    if segment_ids is None:
        t = positions.shape[1]
        return jnp.tril(jnp.ones((t, t), bool))[None, None]
    causal = positions[:, :, None] >= positions[:, None, :]
    same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal & same_doc)[:, None]


def naive_attention(q_nope, q_rope, k_nope, rope_key, v, scale, mask) -> Array:
    """The non-absorbed form. q_nope [B, T, N, H], q_rope [B, T, N, R], k_nope [B, S, N, H],
    rope_key [B, S, R] (shared by all heads), v [B, S, N, H], mask -> [B, T, N, H] f32."""
    scores = _einsum("btnh,bsnh->bnts", q_nope, k_nope)
    scores += _einsum("btnr,bsr->bnts", q_rope, rope_key)  # the one RoPE key, for every head
    probs = _softmax(scores * scale, mask)
    return _einsum("bnts,bsnh->btnh", probs.astype(v.dtype), v)


def splash_mla(q_nope, q_rope, k_nope, rope_key, v, segment_ids, scale) -> Array:
    """`naive_attention` through the Pallas splash kernel (`model.attention_impl`, TPUs):
    queries and keys of H + R (the one RoPE key repeated for every head), values of H; the
    [B, N, T, S] scores are never formed. Shapes as `naive_attention`, causal within the
    documents of segment_ids [B, T] (or one document: None)."""
    keys = jnp.broadcast_to(rope_key[:, :, None, :], k_nope.shape[:3] + rope_key.shape[-1:])
    q = jnp.concatenate([q_nope, q_rope.astype(q_nope.dtype)], axis=-1)
    k = jnp.concatenate([k_nope, keys.astype(k_nope.dtype)], axis=-1)
    return splash_attention(q, k, v, segment_ids, scale)


def absorbed_attention(q_nope, q_rope, latent, rope_key, w_uk, w_uv, scale, mask) -> Array:
    """The weight-absorbed form over a latent cache. q_nope [B, T, N, H], q_rope [B, T, N, R],
    latent [B, L, C], rope_key [B, L, R], w_uk / w_uv [C, N, H], mask -> [B, T, N, H] f32.

    Equal to `naive_attention(q_nope, q_rope, latent @ w_uk, rope_key, latent @ w_uv, ...)`.
    """
    q_lat = _einsum("btnh,cnh->btnc", q_nope, w_uk).astype(latent.dtype)  # query in latent space
    scores = _einsum("btnc,blc->bntl", q_lat, latent)
    scores += _einsum("btnr,blr->bntl", q_rope, rope_key)
    probs = _softmax(scores * scale, mask)
    # [B, N, T, C]: as [B, T, N, C], XLA:CPU (jax 0.10.2) fails on this dot in bfloat16
    # ("Unsupported element type for DotThunk: BF16 x BF16 = F32").
    ctx = _einsum("bntl,blc->bntc", probs.astype(latent.dtype), latent)
    return _einsum("bntc,cnh->btnh", ctx.astype(w_uv.dtype), w_uv)


def softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(H + R), times mscale(factor, mscale_all_dim)^2 under yarn with mscale_all_dim
    set: `DeepseekV3Attention.scaling` in transformers' modeling_deepseek_v3.py and
    `DeepseekV2Attention.scaling` in vLLM's deepseek_v2.py (DeepSeek-V3: x 1.874 at factor
    40). transformers' Llama attention has no such term (see `layers.Attention`)."""
    _, _, h, r, _, _ = _dims(cfg)
    scale = 1.0 / math.sqrt(h + r)
    rs = cfg.rope_scaling
    if rs.type == "yarn" and rs.mscale_all_dim:
        scale *= yarn_mscale(rs.factor, rs.mscale_all_dim) ** 2
    return scale


def _dims(cfg: ModelConfig) -> tuple[int, int, int, int, int, int]:
    """(E, N, H, R, C, Q)."""
    return (
        cfg.d_model,
        cfg.n_heads,
        cfg.head_dim,
        cfg.qk_rope_head_dim,
        cfg.kv_lora_rank,
        cfg.q_lora_rank,
    )


def mla_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs of one MLA layer per token in training (the non-absorbed form): its
    projections, plus scores and A.V over all `seq_len` keys (as `flops._block_flops` counts)."""
    e, n, h, r, c, ql = _dims(cfg)
    query = 2 * e * ql + 2 * ql * n * (h + r) if ql else 2 * e * n * (h + r)
    keys_values = 2 * e * (c + r) + 2 * 2 * c * n * h
    out = 2 * n * h * e
    attention = 2 * seq_len * n * (h + r) + 2 * seq_len * n * h
    return float(query + keys_values + out + attention)


def mla_param_count(cfg: ModelConfig) -> int:
    """Parameters of one MLAttention (projections and its q_norm / kv_norm scales)."""
    e, n, h, r, c, ql = _dims(cfg)
    query = e * ql + ql + ql * n * (h + r) if ql else e * n * (h + r)
    return query + e * (c + r) + c + 2 * c * n * h + n * h * e
