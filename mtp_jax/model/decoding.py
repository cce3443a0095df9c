"""The model's decoding API: prefill and cached steps of the trunk and of each MTP depth.

```
dec = Decoder(cfg)                       # or model.decoder()
p = dec.prepare(params)                  # once, outside any decode loop
cache = dec.init_cache(batch, slots)     # DecodeCache: a KVCache (MLA: LatentCache) per layer
h0, logits, trunk = dec.trunk_step(p, tokens, positions, cache.trunk)   # [B, T, E], [B, T, V]
h, out_k, cache_k = dec.depth_step(p, k, h_prev, seq, positions, cache.mtp[k - 1])
```
Every step is the same arithmetic as `Model.__call__` on the same parameter tree (the tests
pin cached == full forward): `Block`, `MTPDepth` and `ParallelHead` applied one layer / depth
at a time, the depth-k shift from `mtp.depth_tokens`. Layers run unrolled, each with its own
cache arrays [B, L, K, H] (MLA: [B, L, C] and [B, L, R]): a scan over layers would put an XLA
while loop inside every decode step, and a stacked [n_layers, ...] cache would be sliced and
restacked (copied) each step. On XLA:CPU `prepare` also copies each layer's weights out of the
stacked arrays once (`xla_cpu.unstack_before_decoding`).

A cache call writes its T new keys at `positions[:, 0] + [0, T)` of each row and attends to
slots at or before each query, so rolling back is decoding again from an earlier position.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtp_jax import xla_cpu
from mtp_jax.model.config import ModelConfig
from mtp_jax.model.layers import Block, KVCache, RMSNorm, layer_is_moe
from mtp_jax.model.mla import LatentCache
from mtp_jax.model.model import Model
from mtp_jax.model.mtp import MTPDepth, ParallelHead, depth_tokens

Array = jax.Array
LayerCache = KVCache | LatentCache
Caches = tuple[LayerCache, ...]


class DecodeCache(NamedTuple):
    """Caches for decoding, one per trunk layer and per MTP depth: KVCache(k, v [B, L, K, H]),
    or with `model.attention='mla'` LatentCache(latent [B, L, C], rope_key [B, L, R])."""

    trunk: Caches
    mtp: Caches


class DecodeParams(NamedTuple):
    """The parameter tree in the form the decode steps read (made by `Decoder.prepare`).

    layers / depths: a tuple of per-layer (per-depth) trees, or the stacked [n, ...] tree that
    the steps slice themselves.
    """

    shared: dict[str, Any]  # embedding and (untied) output head
    final_norm: Any
    layers: Any
    depths: Any

    def layer(self, i: int) -> Any:
        return _pick(self.layers, i)

    def depth(self, k: int) -> Any:
        """Depth k's (1-based) parameters."""
        return _pick(self.depths, k - 1)


def _pick(tree: Any, i: int) -> Any:
    if isinstance(tree, tuple):
        return tree[i]
    return jax.tree.map(lambda x: x[i], tree)


def _unstacked(tree: Any, n: int) -> tuple[Any, ...]:
    return tuple(_pick(tree, i) for i in range(n))


def unwrap_params(params: Any) -> Any:
    """Accepts `params`, `{'params': params}` or boxed (`nn.Partitioned`) trees -> plain params."""
    params = nn.unbox(params)
    if isinstance(params, dict) and set(params) == {"params"}:
        params = params["params"]
    return params


@dataclasses.dataclass(frozen=True)
class Decoder:
    """Prefill and cached steps of a `Model` with config `cfg` (see the module docstring)."""

    cfg: ModelConfig

    @property
    def model(self) -> Model:
        return Model(self.cfg)

    # ------------------------------------------------------------------ parameters, caches

    def view(self, params: Any, with_depths: bool = True) -> DecodeParams:
        """The parameters as `DecodeParams` with the stacked trees left stacked (no copies)."""
        cfg = self.cfg
        params = unwrap_params(params)
        trunk = params["trunk"]
        if cfg.scan_layers and "dense_layers" in trunk:  # model.moe.first_dense_layers: 2 stacks
            dense = trunk["dense_layers"]["block"]
            layers = _unstacked(dense, cfg.moe.first_dense_layers) + _unstacked(
                trunk["layers"]["block"], cfg.n_layers - cfg.moe.first_dense_layers
            )
        elif cfg.scan_layers:
            layers = trunk["layers"]["block"]  # stacked [n_layers, ...]
        else:
            layers = tuple(trunk[f"layers_{i}"] for i in range(cfg.n_layers))
        depths = ()
        if with_depths and cfg.mtp_depth:
            (depths,) = params["mtp"].values()  # 'depths' (sequential) or 'heads' (parallel)
            if cfg.mtp_share_depths:  # one depth module, applied at every depth
                depths = (depths,) * cfg.mtp_depth
        shared = {k: params[k] for k in ("embed", "head") if k in params}
        return DecodeParams(shared, params["final_norm"], layers, depths)

    def prepare(self, params: Any, with_depths: bool = True) -> DecodeParams:
        """The model's parameters (any of the forms `unwrap_params` takes, sharded or not) as
        the decode steps read them; `with_depths=False` leaves the MTP depths out (plain
        decoding). Call it once, outside jitted loops."""
        view = self.view(params, with_depths)
        if not xla_cpu.unstack_before_decoding():
            return view
        depths = self.cfg.mtp_depth if with_depths else 0
        return _unstacker(self.cfg.n_layers, depths)(view)

    def init_cache(self, batch: int, length: int, with_depths: bool = True) -> DecodeCache:
        """Zeroed caches for `batch` rows of `length` positions."""
        cfg = self.cfg

        def zeros(*shape: int) -> Array:
            return jnp.zeros((batch, length, *shape), cfg.compute_dtype)

        if cfg.attention == "mla":  # the compressed latent and the shared RoPE key
            one = LatentCache(zeros(cfg.kv_lora_rank), zeros(cfg.qk_rope_head_dim))
        else:
            kv = zeros(cfg.n_kv_heads, cfg.head_dim)
            one = KVCache(kv, kv)
        depths = cfg.mtp_depth if with_depths else 0
        return DecodeCache((one,) * cfg.n_layers, (one,) * depths)

    # ------------------------------------------------------------------ shared embedding / head

    def embed(self, params: DecodeParams, tokens: Array) -> Array:
        """tokens [...] -> the trunk's embeddings [..., E]."""
        return self.model.apply({"params": params.shared}, tokens, method="embed_tokens")

    def logits(self, params: DecodeParams, normed: Array) -> Array:
        """normed hidden [..., E] -> logits [..., V] float32 through the shared head."""
        return self.model.apply({"params": params.shared}, normed, method="logits")

    # ------------------------------------------------------------------ the trunk

    def trunk_step(
        self, params: DecodeParams, tokens: Array, positions: Array, caches: Caches
    ) -> tuple[Array, Array, Caches]:
        """The trunk over T new tokens per row.

        tokens, positions [B, T] -> (h0 [B, T, E], logits [B, T, V] f32, caches). h0 is what
        the MTP depths read (`model.mtp_chain_input`): the trunk's output before the final
        norm ('trunk') or after it ('normed').
        """
        cfg = self.cfg
        x = self.embed(params, tokens)
        new = []
        for i, cache in enumerate(caches):
            block = Block(cfg, layer_is_moe(cfg, i))
            x, cache = block.apply({"params": params.layer(i)}, x, positions, None, cache)
            new.append(cache)
        normed = RMSNorm(cfg).apply({"params": params.final_norm}, x)
        h0 = normed if cfg.mtp_chain_input == "normed" else x
        return h0, self.logits(params, normed), tuple(new)

    def prefill(
        self, params: DecodeParams, tokens: Array, slots: int
    ) -> tuple[Array, Array, Caches]:
        """The trunk over tokens [B, P] at positions 0..P-1 into fresh caches of `slots` slots.

        Returns (h0 [B, P, E], logits [B, P, V], trunk caches).
        """
        batch, plen = tokens.shape
        caches = self.init_cache(batch, slots, with_depths=False).trunk
        return self.trunk_step(params, tokens, prompt_positions(batch, plen), caches)

    # ------------------------------------------------------------------ the MTP depths

    def depth_step(
        self,
        params: DecodeParams,
        k: int,
        h_prev: Array,
        tokens: Array | None,
        positions: Array,
        cache: LayerCache,
    ) -> tuple[Array, Array, LayerCache]:
        """MTP depth k (1-based) at positions [B, T].

        Sequential: h_prev = h^{k-1} [B, T, E] (h^0: `trunk_step`'s h0) and tokens =
        the row buffers [B, L] that `depth_tokens` shifts by k; parallel: h_prev = h^0, tokens
        unused. Returns (h^k [B, T, E] for the next depth, out^k [B, T, E] (normed: `logits`
        turns it into depth k's logits), cache).
        """
        cfg = self.cfg
        p = {"params": params.depth(k)}
        if cfg.mtp_layout == "sequential":
            emb = self.embed(params, depth_tokens(tokens, k, positions))
            h, (normed, cache) = MTPDepth(cfg).apply(p, h_prev, emb, positions, None, cache)
        else:
            _, (normed, cache) = ParallelHead(cfg).apply(p, h_prev, positions, None, cache)
            h = h_prev
        return h, normed, cache

    def mtp_step(
        self,
        params: DecodeParams,
        h0: Array,
        tokens: Array | None,
        positions: Array,
        caches: Caches,
    ) -> tuple[Array, Caches]:
        """Every depth at positions [B, T] (see `depth_step`) -> (logits [D, B, T, V], caches)."""
        h, out, new = h0, [], []
        for k, cache in enumerate(caches, start=1):
            h, normed, cache = self.depth_step(params, k, h, tokens, positions, cache)
            out.append(normed)
            new.append(cache)
        return self.logits(params, jnp.stack(out)), tuple(new)


def prompt_positions(batch: int, length: int) -> Array:
    """Positions 0 .. length-1 of every row, [batch, length] int32."""
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))


@functools.cache
def _unstacker(n_layers: int, n_depths: int):
    """A jitted DecodeParams -> DecodeParams with every stacked tree split into a tuple."""

    def unstack(v: DecodeParams) -> DecodeParams:
        layers = v.layers if isinstance(v.layers, tuple) else _unstacked(v.layers, n_layers)
        return v._replace(layers=layers, depths=_unstacked(v.depths, n_depths) if n_depths else ())

    return jax.jit(unstack)


def init_cache(cfg: ModelConfig | Any, batch: int, length: int) -> DecodeCache:
    """Zeroed decode caches of the model `cfg` (a ModelConfig or `config.model`)."""
    return Decoder(ModelConfig.from_any(cfg)).init_cache(batch, length)
