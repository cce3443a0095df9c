"""Multi-token prediction depths.

SequentialMTP (DeepSeek-V3): for k = 1..D,
    h^k_i = Block_k(W_k [RMSNorm(h^{k-1}_i) ; RMSNorm(Emb(t[i+k]))]),  out^k_i = RMSNorm_k(h^k_i)
applied by `nn.scan` over depths, parameters stacked on a leading `depth` axis.

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

from mtp_jax.model.layers import Block, KVCache, Linear, ModelConfig, RMSNorm, remat, scan_unroll

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


class MTPDepth(nn.Module):
    """One sequential depth k. Scan form: (h^{k-1}, emb_k, ...) -> (h^k, (out^k, cache))."""

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        h_prev: Array,
        emb: Array,
        positions: Array,
        segment_ids: Array | None,
        cache: KVCache | None,
    ) -> tuple[Array, tuple[Array, KVCache | None]]:
        """h_prev, emb [B, T, E] (emb = Emb(t[i+k]) at position i) -> h [B, T, E], out [B, T, E]."""
        cfg = self.cfg
        joined = jnp.concatenate(
            [RMSNorm(cfg, name="hidden_norm")(h_prev), RMSNorm(cfg, name="embed_norm")(emb)],
            axis=-1,
        )
        x = Linear(cfg, cfg.d_model, ("mlp", "embed"), name="proj")(joined)
        h, cache = Block(cfg, name="block")(x, positions, segment_ids, cache)
        return h, (RMSNorm(cfg, name="out_norm")(h), cache)


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
        h, cache = Block(self.cfg, name="block")(h0, positions, segment_ids, cache)
        return h0, (RMSNorm(self.cfg, name="out_norm")(h), cache)


def _depth_scan(module_cls: type[nn.Module], cfg: ModelConfig, in_axes: tuple):
    """`module_cls` scanned over cfg.mtp_depth stacked depths, each rematerialised whole
    (norms, concat and projection too, not just the block) by `model.remat_policy`."""
    return nn.scan(
        remat(module_cls, cfg.remat_policy),
        variable_axes={"params": 0},
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
    ) -> tuple[Array, KVCache | None]:
        """h0 [B, T, E] (trunk, pre-norm); embs [D, B, T, E], embs[k-1] = Emb(t[i+k]).

        Returns out [D, B, T, E] (normed hidden of depths 1..D) and the caches [D, ...].
        """
        scan = _depth_scan(MTPDepth, self.cfg, (0, nn.broadcast, nn.broadcast, 0))
        _, (outs, cache) = scan(self.cfg, name="depths")(h0, embs, positions, segment_ids, cache)
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
