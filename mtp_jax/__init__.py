"""mtp_jax: pretraining language models with multi-token prediction in JAX/Flax.

Axis names used in shapes throughout the package:
  B  batch (examples)            S  positions scored per example (data.seq_len)
  D  MTP depths (model.mtp_depth) T  new positions in one decode call
  E  model width (d_model)        V  vocabulary size
  N  query heads                  K  key/value heads
  H  head width                   F  MLP hidden width
  L  KV-cache length              k  an MTP depth (1..D; 0 = next-token head)

A training window holds S + D + 1 tokens; `Model` reads the first S + D of them and
`logits[k, b, i]` predicts window token i + k + 1.
"""

from mtp_jax.config import ConfigError, load_config
from mtp_jax.loss import LossConfig, loss_and_metrics, mtp_targets
from mtp_jax.model import Model, ModelConfig, ModelOutput, init_cache, model_flops, param_count

__all__ = [
    "ConfigError",
    "LossConfig",
    "Model",
    "ModelConfig",
    "ModelOutput",
    "init_cache",
    "load_config",
    "loss_and_metrics",
    "model_flops",
    "mtp_targets",
    "param_count",
]
