"""Multi-token prediction depths.

SequentialMTP (DeepSeek-V3): for k = 1..D,
    h^k_i = Block_k(W_k [RMSNorm(h^{k-1}_i) ; RMSNorm(Emb(t[i+k]))]),  out^k_i = RMSNorm_k(h^k_i)
applied by `nn.scan` over depths, parameters stacked on a leading `depth` axis (or, with
`model.mtp_share_depths`, one set of depth parameters broadcast to every depth). h^0 is the
trunk's output before its final norm, or after it with `model.mtp_chain_input='normed'` (what
vLLM and SGLang feed DeepSeek-V3's MTP layers; see `mtp_jax.interop.hf`).

Hidden-state mixing (`model.mtp_hidden_mixing` = p, sequential, training only; after
Megatron-LM #6566): a depth reads its own drafts at decode time, so in training, at depth
k >= 2 and each token position independently, with probability p the input h^{k-1}_i is
replaced by h^j_i with j drawn uniformly from 0..k-2 (the trunk's state and the earlier
depths' outputs). The scan carries one extra [B, T, E] state, a reservoir sample of
h^0..h^{k-2} (replaced by h^{k-1} with probability 1/k after depth k), so memory is O(1) in D.
The draws come from an explicit key (`Model.features(mixing_rng=...)`); eval and decoding
pass none and never mix.

ParallelHeads (Gloeckle et al. 2024): out^k_i = RMSNorm_k(Block_k(h^0_i)), every head reading
the trunk output only.

Both return normed hidden states; the model's shared head turns them into logits. The
embedding of t[i+k] is computed by the caller with the trunk's own embedding, so no
embedding or head parameter lives under this subtree.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtp_jax.model.layers import (
    Block,
    KVCache,
    Linear,
    ModelConfig,
    RMSNorm,
    depth_is_moe,
    remat,
    scan_unroll,
)
from mtp_jax.model.moe import MOE_STATS

Array = jax.Array


def depth_tokens(
    tokens: Array, k: int, positions: Array | None = None, length: int | None = None
) -> Array:
    """The depth-k shift: the tokens t[i + k] that sequential depth k embeds at positions i.

    With `positions` [B, T]: tokens [B, L] -> [B, T], row b's t[positions[b] + k] (decoding,
    where positions are absolute and tokens a buffer); else positions 0 .. length-1:
    tokens [B, >= length + k] -> tokens[:, k : k + length] (training).
    """
    if positions is None:
        return tokens[:, k : k + length]
    return jnp.take_along_axis(tokens, positions + k, axis=1, mode="clip")


def all_depth_tokens(tokens: Array, depth: int, length: int) -> Array:
    """tokens [B, >= length + depth] -> [D, B, length], entry k-1 = `depth_tokens(tokens, k)`."""
    return jnp.stack([depth_tokens(tokens, k, length=length) for k in range(1, depth + 1)])


def mixed_input(h_prev: Array, pool: Array, key: Array, k: Array, p: float):
    """Hidden-state mixing at depth k (1-based): (input [B, T, E], next pool [B, T, E]).

    h_prev = h^{k-1}; pool: a uniform sample of h^0..h^{k-2} per position (any value at k=1).
    The input is `pool` with probability p where k >= 2, else h^{k-1}; the next pool, a
    uniform sample of h^0..h^{k-1}, keeps `pool` with probability (k-1)/k.
    """
    mix_key, pool_key = jax.random.split(key)
    shape = h_prev.shape[:-1]
    mix = jax.random.bernoulli(mix_key, p, shape) & (k >= 2)
    take = jax.random.uniform(pool_key, shape) * k < 1.0  # probability 1/k
    x = jnp.where(mix[..., None], pool, h_prev)
    return x, jnp.where(take[..., None], h_prev, pool)


class MTPDepth(nn.Module):
    """One sequential depth k. Scan form: (h^{k-1}, emb_k, ...) -> (h^k, (out^k, cache)).

    With `mixing` = (key, k) (training with `model.mtp_hidden_mixing`), the carry is the pair
    (h^{k-1}, pool) and the input state is drawn by `mixed_input`.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        h_prev: Array | tuple[Array, Array],
        emb: Array,
        positions: Array,
        segment_ids: Array | None,
        cache: KVCache | None,
        mixing: tuple[Array, Array] | None = None,
    ) -> tuple[Array, tuple[Array, KVCache | None]]:
        """h_prev, emb [B, T, E] (emb = Emb(t[i+k]) at position i) -> h [B, T, E], out [B, T, E]."""
        cfg = self.cfg
        if mixing is not None:
            h_in, pool = h_prev
            h_prev, pool = mixed_input(h_in, pool, *mixing, cfg.mtp_hidden_mixing)
        joined = jnp.concatenate(
            [RMSNorm(cfg, name="hidden_norm")(h_prev), RMSNorm(cfg, name="embed_norm")(emb)],
            axis=-1,
        )
        x = Linear(cfg, cfg.d_model, ("mlp", "embed"), name="proj")(joined)
        h, cache = Block(cfg, depth_is_moe(cfg), name="block")(x, positions, segment_ids, cache)
        out = (RMSNorm(cfg, name="out_norm")(h), cache)
        return ((h, pool) if mixing is not None else h), out


class ParallelHead(nn.Module):
    """One parallel head. Scan form: (h^0, ...) -> (h^0, (out^k, cache))."""

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        h0: Array,
        positions: Array,
        segment_ids: Array | None,
        cache: KVCache | None,
    ) -> tuple[Array, tuple[Array, KVCache | None]]:
        """h0 [B, T, E] -> (h0 unchanged, (out^k [B, T, E], cache))."""
        cfg = self.cfg
        h, cache = Block(cfg, depth_is_moe(cfg), name="block")(h0, positions, segment_ids, cache)
        return h0, (RMSNorm(self.cfg, name="out_norm")(h), cache)


def _depth_scan(module_cls: type[nn.Module], cfg: ModelConfig, in_axes: tuple):
    """`module_cls` scanned over cfg.mtp_depth stacked depths, each rematerialised whole
    (norms, concat and projection too, not just the block) by `model.remat_policy`.

    With `model.mtp_share_depths` the parameters are broadcast instead of stacked: one depth
    module (no `depth` axis) applied at every depth.
    """
    if cfg.mtp_share_depths:
        return nn.scan(
            remat(module_cls, cfg.remat_policy),
            variable_broadcast="params",
            variable_axes={MOE_STATS: 0},
            split_rngs={"params": False},
            in_axes=in_axes,
            out_axes=0,
            length=cfg.mtp_depth,
            unroll=scan_unroll(cfg, cfg.mtp_depth),
        )
    return nn.scan(
        remat(module_cls, cfg.remat_policy),
        variable_axes={"params": 0, MOE_STATS: 0},
        split_rngs={"params": True},
        in_axes=in_axes,
        out_axes=0,
        length=cfg.mtp_depth,
        unroll=scan_unroll(cfg, cfg.mtp_depth),
        metadata_params={nn.PARTITION_NAME: "depth"},
    )


class SequentialMTP(nn.Module):
    """The DeepSeek-V3 chain of D depths, scanned."""

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        h0: Array,
        embs: Array,
        positions: Array,
        segment_ids: Array | None = None,
        cache: KVCache | None = None,
        mixing_rng: Array | None = None,
    ) -> tuple[Array, KVCache | None]:
        """h0 [B, T, E] (the chain input: see `model.mtp_chain_input`); embs [D, B, T, E],
        embs[k-1] = Emb(t[i+k]); mixing_rng: a key for hidden-state mixing (training with
        `model.mtp_hidden_mixing` > 0; None: no mixing).

        Returns out [D, B, T, E] (normed hidden of depths 1..D) and the caches [D, ...].
        """
        cfg = self.cfg
        scan = _depth_scan(MTPDepth, cfg, (0, nn.broadcast, nn.broadcast, 0, 0))
        depths = scan(cfg, name="depths")
        if mixing_rng is None or not cfg.mtp_hidden_mixing:
            _, (outs, cache) = depths(h0, embs, positions, segment_ids, cache, None)
            return outs, cache
        keys = jax.random.split(mixing_rng, cfg.mtp_depth)
        ks = jnp.arange(1, cfg.mtp_depth + 1)
        _, (outs, cache) = depths((h0, h0), embs, positions, segment_ids, cache, (keys, ks))
        return outs, cache


class ParallelHeads(nn.Module):
    """Meta's D parallel heads on the trunk output, scanned."""

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        h0: Array,
        positions: Array,
        segment_ids: Array | None = None,
        cache: KVCache | None = None,
    ) -> tuple[Array, KVCache | None]:
        """h0 [B, T, E] -> out [D, B, T, E], caches [D, ...]."""
        scan = _depth_scan(ParallelHead, self.cfg, (nn.broadcast, nn.broadcast, 0))
        _, (outs, cache) = scan(self.cfg, name="heads")(h0, positions, segment_ids, cache)
        return outs, cache
