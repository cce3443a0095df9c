"""The trunk (embed -> scanned blocks -> hidden states) and the shared embedding / output head."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtp_jax.model.layers import (
    Block,
    KVCache,
    ModelConfig,
    ScanBlock,
    layer_is_moe,
    remat,
    scan_unroll,
)
from mtp_jax.model.moe import MOE_STATS

Array = jax.Array


class Embed(nn.Module):
    """Token embedding [V, E]; `attend` is the tied output head."""

    cfg: ModelConfig

    def setup(self):
        self.embedding = self.param(
            "embedding",
            # Small: it is also the tied output head; pre-norm blocks rescale the inputs.
            nn.with_logical_partitioning(
                nn.initializers.normal(self.cfg.init_std), ("vocab", "embed")
            ),
            (self.cfg.vocab_size, self.cfg.d_model),
            self.cfg.weight_dtype,
        )

    def __call__(self, tokens: Array) -> Array:
        """tokens [...] int -> [..., E] in the compute dtype."""
        return jnp.take(self.embedding, tokens, axis=0).astype(self.cfg.compute_dtype)

    def attend(self, x: Array) -> Array:
        """x [..., E] -> logits [..., V] in float32."""
        return jnp.einsum(
            "...e,ve->...v",
            x,
            self.embedding.astype(self.cfg.compute_dtype),
            preferred_element_type=jnp.float32,
        )


class Trunk(nn.Module):
    """The decoder stack: n_layers pre-norm blocks over embedded inputs.

    Returns the residual stream *before* the final norm (DeepSeek-V3's MTP chain starts from
    it); the final norm is the model's depth-0 output norm.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        x: Array,
        positions: Array,
        segment_ids: Array | None = None,
        cache: KVCache | None = None,
    ) -> tuple[Array, KVCache | None]:
        """x [B, T, E], positions [B, T] -> (h [B, T, E], cache with leaves [n_layers, ...])."""
        cfg = self.cfg
        if cfg.scan_layers:
            # Dense leading layers (model.moe.first_dense_layers) are their own stack.
            dense = cfg.moe.first_dense_layers if cfg.moe.enabled else 0
            caches = []
            for name, start, stop in (("dense_layers", 0, dense), ("layers", dense, cfg.n_layers)):
                if stop == start:
                    continue
                stack = nn.scan(
                    ScanBlock,
                    variable_axes={"params": 0, MOE_STATS: 0},
                    split_rngs={"params": True},
                    in_axes=(nn.broadcast, nn.broadcast, 0),
                    length=stop - start,
                    unroll=scan_unroll(cfg, stop - start),
                    metadata_params={nn.PARTITION_NAME: "layers"},
                )
                part = (
                    None
                    if cache is None
                    else jax.tree.map(lambda c, a=start, b=stop: c[a:b], cache)
                )
                x, part = stack(cfg, layer_is_moe(cfg, start), name=name)(
                    x, positions, segment_ids, part
                )
                caches.append(part)
            if cache is None:
                return x, None
            return x, jax.tree.map(lambda *c: jnp.concatenate(c), *caches)
        layers = []
        for i in range(cfg.n_layers):
            layer_cache = None if cache is None else jax.tree.map(lambda c, i=i: c[i], cache)
            x, layer_cache = remat(Block, cfg.remat_policy)(
                cfg, layer_is_moe(cfg, i), name=f"layers_{i}"
            )(x, positions, segment_ids, layer_cache)
            layers.append(layer_cache)
        if cache is None:
            return x, None
        return x, jax.tree.map(lambda *c: jnp.stack(c), *layers)
