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

from mtp_jax.model.layers import (
    Block,
    KVCache,
    ModelConfig,
    RMSNorm,
    _init,
    dense_dot_general,
    remat,
    scan_unroll,
)

Array = jax.Array


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
        x = nn.Dense(
            cfg.d_model,
            use_bias=False,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.weight_dtype,
            kernel_init=_init(cfg, ("mlp", "embed")),
            dot_general=dense_dot_general,
            name="proj",
        )(joined.reshape(-1, joined.shape[-1]))  # on [B*T, 2E] rows: a 2-D weight gradient
        x = x.reshape(joined.shape[:-1] + (cfg.d_model,))
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
