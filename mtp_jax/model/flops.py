"""Training FLOPs per token, counting everything that runs."""

from __future__ import annotations

from typing import Any

from mtp_jax.model.config import ModelConfig


def _block_flops(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs of one transformer block per token (matmuls + attention scores)."""
    e, n, k, h, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim
    projections = 2 * e * h * (n + 2 * k) + 2 * n * h * e
    mlp = 3 * 2 * e * f
    # QK^T and AV over all S keys: XLA computes the full masked product, so count it all.
    attention = 2 * 2 * seq_len * n * h
    return projections + mlp + attention


def model_flops(config: Any, seq_len: int | None = None) -> float:
    """Training (forward + backward) FLOPs per trained token position.

    Counts the trunk's blocks, every MTP depth's block (and, for the sequential layout, its
    2E -> E projection) and D + 1 applications of the output head. Backward = 2x forward.

    Args:
      config: the full config (uses `model.*` and `data.seq_len`) or `config.model` with
        `seq_len` given.
    """
    model_cfg = config.model if hasattr(config, "model") else config
    if seq_len is None:
        seq_len = config.data.seq_len
    cfg = ModelConfig.from_any(model_cfg)
    block = _block_flops(cfg, seq_len)
    head = 2 * cfg.d_model * cfg.vocab_size
    forward = cfg.n_layers * block + head
    if cfg.mtp_depth:
        per_depth = block + head
        if cfg.mtp_layout == "sequential":
            per_depth += 2 * (2 * cfg.d_model) * cfg.d_model
        forward += cfg.mtp_depth * per_depth
    return 3.0 * forward


def param_count(config: Any) -> int:
    """Number of parameters of the model described by `config.model` (or a ModelConfig)."""
    cfg = ModelConfig.from_any(config.model if hasattr(config, "model") else config)
    e, n, k, h, f, v = (
        cfg.d_model,
        cfg.n_heads,
        cfg.n_kv_heads,
        cfg.head_dim,
        cfg.mlp_dim,
        cfg.vocab_size,
    )
    block = e * h * (n + 2 * k) + n * h * e + 3 * e * f + 2 * e
    total = v * e + cfg.n_layers * block + e + (0 if cfg.tie_embeddings else e * v)
    if cfg.mtp_depth:
        depth = block + e
        if cfg.mtp_layout == "sequential":
            depth += 2 * e * e + 2 * e
        total += (1 if cfg.mtp_share_depths else cfg.mtp_depth) * depth
    return total
