"""The model: its settings, layers, trunk, MTP depths, the composed `Model` and its decoding API.

Names are imported on first use (PEP 562), so that `mtp_jax.config` can read `ModelConfig`
without importing flax.
"""

from __future__ import annotations

from mtp_jax.lazy import lazy_exports

_EXPORTS = {
    "ModelConfig": "mtp_jax.model.config",
    "KVCache": "mtp_jax.model.layers",
    "LatentCache": "mtp_jax.model.mla",
    "Model": "mtp_jax.model.model",
    "ModelOutput": "mtp_jax.model.model",
    "Decoder": "mtp_jax.model.decoding",
    "DecodeCache": "mtp_jax.model.decoding",
    "DecodeParams": "mtp_jax.model.decoding",
    "init_cache": "mtp_jax.model.decoding",
    "model_flops": "mtp_jax.model.flops",
    "param_count": "mtp_jax.model.flops",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports("mtp_jax.model", globals(), _EXPORTS)
