"""`Model`: trunk + shared embedding/head + MTP depths (sequential chain or parallel heads).

Depth 0 is the trunk's next-token head; depths 1..D are MTP depths. With `tokens [B, S+D]`,
the trunk reads tokens[:, :S] and `logits[k, b, i]` predicts window token `i + k + 1`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from mtp_jax.model.config import ModelConfig
from mtp_jax.model.layers import RMSNorm, _init
from mtp_jax.model.mtp import ParallelHeads, SequentialMTP, all_depth_tokens
from mtp_jax.model.transformer import Embed, Trunk

Array = jax.Array


@flax.struct.dataclass
class ModelOutput:
    """logits [D+1, B, S, V] (float32) and the normed hidden states [D+1, B, S, E]."""

    logits: Array
    hidden: Array


class Model(nn.Module):
    """The MTP language model. `config` is `cfg.model` (ConfigDict) or a ModelConfig."""

    config: Any

    def setup(self):
        cfg = self.cfg = ModelConfig.from_any(self.config)
        self.embed = Embed(cfg)
        self.trunk = Trunk(cfg)
        self.final_norm = RMSNorm(cfg)
        if not cfg.tie_embeddings:
            self.head = self.param(
                "head",
                _init(cfg, ("embed", "vocab")),
                (cfg.d_model, cfg.vocab_size),
                cfg.weight_dtype,
            )
        if cfg.mtp_depth:
            layout = SequentialMTP if cfg.mtp_layout == "sequential" else ParallelHeads
            self.mtp = layout(cfg)

    # --------------------------------------------------------------------------- training

    def __call__(self, tokens: Array, segment_ids: Array | None = None) -> ModelOutput:
        """tokens [B, S+D] int32, segment_ids [B, S+D] -> ModelOutput (logits [D+1, B, S, V])."""
        hidden = self.features(tokens, segment_ids)
        return ModelOutput(logits=self.logits(hidden), hidden=hidden)

    def features(
        self,
        tokens: Array,
        segment_ids: Array | None = None,
        mixing_rng: Array | None = None,
        detach_trunk: bool = False,
    ) -> Array:
        """tokens [B, S+D] -> normed hidden states [D+1, B, S, E] (depth 0 = trunk).

        Training options (eval and decoding use neither):
        mixing_rng: the key of hidden-state mixing (`model.mtp_hidden_mixing`, sequential).
        detach_trunk (`loss.mtp_detach_trunk`): the depths read the trunk's h^0 and the
          embeddings Emb(t[i+k]) through `stop_gradient`, so their loss trains the depths and
          the shared output head only: the trunk, and the embedding table by its input path,
          get no gradient from it (with tied embeddings the table still gets the depths'
          gradient as the head, as it does the trunk's).
        """
        cfg = self.cfg
        depth = cfg.mtp_depth
        seq = tokens.shape[1] - depth
        if seq < 1:
            raise ValueError(
                f"tokens has length {tokens.shape[1]}; a model with mtp_depth={depth} needs "
                f"S + {depth} tokens with S >= 1"
            )
        positions = jnp.broadcast_to(jnp.arange(seq), (tokens.shape[0], seq))
        seg = None if segment_ids is None else segment_ids[:, :seq]
        h0, _ = self.trunk(self.embed(tokens[:, :seq]), positions, seg)
        out0 = self.final_norm(h0)[None]
        if not depth:
            return out0
        if cfg.mtp_chain_input == "normed":
            h0 = out0[0]
        stop = jax.lax.stop_gradient if detach_trunk else (lambda x: x)
        h0 = stop(h0)
        if cfg.mtp_layout == "sequential":
            shifted = all_depth_tokens(tokens, depth, seq)  # [D, B, S]
            embs = stop(self.embed(shifted))
            outs, _ = self.mtp(h0, embs, positions, seg, mixing_rng=mixing_rng)
        else:
            outs, _ = self.mtp(h0, positions, seg)
        return jnp.concatenate([out0, outs], axis=0)

    def features_and_head(
        self,
        tokens: Array,
        segment_ids: Array | None = None,
        mixing_rng: Array | None = None,
        detach_trunk: bool = False,
    ) -> tuple[Array, Array]:
        """(features [D+1, B, S, E], head_matrix [E, V]): what the chunked loss needs."""
        features = self.features(tokens, segment_ids, mixing_rng, detach_trunk)
        return features, self.head_matrix()

    def head_matrix(self) -> Array:
        """The shared output head [E, V] in the compute dtype (tied: embedding transposed)."""
        if self.cfg.tie_embeddings:
            return self.embed.embedding.T.astype(self.cfg.compute_dtype)
        return self.head.astype(self.cfg.compute_dtype)

    def logits(self, hidden: Array) -> Array:
        """hidden [..., E] (normed) -> logits [..., V] float32, through the shared head."""
        if self.cfg.tie_embeddings:
            return self.embed.attend(hidden)
        return jnp.einsum(
            "...e,ev->...v", hidden, self.head_matrix(), preferred_element_type=jnp.float32
        )

    # --------------------------------------------------------------------------- decoding

    def embed_tokens(self, tokens: Array) -> Array:
        """tokens [...] -> embeddings [..., E] (the trunk's own embedding)."""
        return self.embed(tokens)

    def decoder(self):
        """The decoding API on this model's parameter tree (`mtp_jax.model.decoding.Decoder`)."""
        from mtp_jax.model.decoding import Decoder

        return Decoder(ModelConfig.from_any(self.config))


def mtp_param_mask(params: Any) -> Any:
    """A tree of bools shaped like the (unboxed) `params`: True on the MTP depths' own
    parameters, False on the trunk and on what the depths share with it (embedding, head)."""
    return {name: jax.tree.map(lambda _, n=name: n == "mtp", sub) for name, sub in params.items()}
