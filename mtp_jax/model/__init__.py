"""The model: layers, trunk, MTP depths and the composed `Model`."""

from mtp_jax.model.flops import model_flops, param_count
from mtp_jax.model.layers import KVCache, ModelConfig
from mtp_jax.model.model import DecodeCache, Model, ModelOutput, init_cache

__all__ = [
    "DecodeCache",
    "KVCache",
    "Model",
    "ModelConfig",
    "ModelOutput",
    "init_cache",
    "model_flops",
    "param_count",
]
