"""mtp_jax: pretraining language models with multi-token prediction in JAX/Flax.

The public API (what notebooks and tools use), re-exported here:

    cfg = mtp_jax.load_config("configs/smoke.py", ["model.mtp_depth=3"])
    model = mtp_jax.Model(cfg.model)                  # a flax.linen Module
    variables = model.init(jax.random.key(0), tokens) # tokens: int32 [B, S+D]
    out = model.apply(variables, tokens)              # out.logits: [D+1, B, S, V]
    config, params = mtp_jax.load_checkpoint("runs/smoke")      # parameters only, one device
    params = mtp_jax.load_params("runs/big", mesh=mesh)         # ... or sharded over a mesh
    result = mtp_jax.speculative_generate(model, params, prompts, lengths, max_new_tokens=64)
    dec = model.decoder()      # prefill / cached trunk and depth steps (mtp_jax.model.decoding)
    records = mtp_jax.read_metrics("runs/smoke")      # metrics.jsonl, one dict per step

Axis names used in shapes throughout the package:
  B  batch (examples)              S  positions scored per example (data.seq_len)
  D  MTP depths (model.mtp_depth)  T  new positions in one decode call
  E  model width (d_model)         V  vocabulary size
  N  query heads                   K  key/value heads
  H  head width                    F  MLP hidden width
  L  KV-cache length               k  an MTP depth (1..D; 0 = the next-token head)

A training window holds S + D + 1 tokens; `Model` reads the first S + D of them and
`logits[k, b, i]` predicts window token i + k + 1.
"""

from __future__ import annotations

from mtp_jax.lazy import lazy_exports

# name -> module that defines it. Imported on first use, so that light entry points
# (mtp-prepare and its worker processes) do not pay for flax and the model.
_EXPORTS = {
    "ConfigError": "mtp_jax.config",
    "load_config": "mtp_jax.config",
    "Model": "mtp_jax.model",
    "ModelConfig": "mtp_jax.model",
    "ModelOutput": "mtp_jax.model",
    "Decoder": "mtp_jax.model",
    "init_cache": "mtp_jax.model",
    "model_flops": "mtp_jax.model",
    "param_count": "mtp_jax.model",
    "WindowSpec": "mtp_jax.window",
    "weighted_cross_entropy": "mtp_jax.loss",
    "mtp_targets": "mtp_jax.loss",
    "draft_agreement": "mtp_jax.loss",
    "loss_and_metrics": "mtp_jax.train.step",
    "get_tokenizer": "mtp_jax.data",
    "load_checkpoint": "mtp_jax.train.checkpoint",
    "load_params": "mtp_jax.train.checkpoint",
    "read_metrics": "mtp_jax.train.metrics",
    "train": "mtp_jax.train.loop",
    "generate": "mtp_jax.inference",
    "speculative_generate": "mtp_jax.inference",
    "DecodeResult": "mtp_jax.inference",
    "load_study": "mtp_jax.study.report",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports("mtp_jax", globals(), _EXPORTS)
