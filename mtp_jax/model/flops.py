"""Training FLOPs per token and parameter counts, counting everything that runs.

MoE layers count what a token activates (router, its top-k routed experts, the shared
experts); MLA counts its real (non-absorbed, training) matmuls (`mtp_jax.model.mla`).
"""

from __future__ import annotations

from typing import Any

from mtp_jax.model.config import ModelConfig


def _attention_flops(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs of one attention layer per token (projections + scores over all keys)."""
    if cfg.attention == "mla":
        from mtp_jax.model.mla import mla_flops_per_token

        return mla_flops_per_token(cfg, seq_len)
    e, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    projections = 2 * e * h * (n + 2 * k) + 2 * n * h * e
    # QK^T and AV over all S keys: XLA computes the full masked product, so count it all.
    return projections + 2 * 2 * seq_len * n * h


def _ffn_flops(cfg: ModelConfig, moe: bool) -> float:
    """Forward FLOPs of one FFN per token: the dense SwiGLU, or what a token activates."""
    e = cfg.d_model
    if not moe:
        return 3 * 2 * e * cfg.mlp_dim
    m = cfg.moe
    router = 2 * e * m.num_experts
    return router + (m.top_k + m.shared_experts) * 3 * 2 * e * m.expert_dim


def _block_flops(cfg: ModelConfig, seq_len: int, moe: bool = False) -> float:
    """Forward FLOPs of one transformer block per token (matmuls + attention scores)."""
    return _attention_flops(cfg, seq_len) + _ffn_flops(cfg, moe)


def model_flops(config: Any, seq_len: int | None = None) -> float:
    """Training (forward + backward) FLOPs per trained token position.

    Counts the trunk's blocks, every MTP depth's block (and, for the sequential layout, its
    2E -> E projection) and D + 1 applications of the output head. Backward = 2x forward.
    MoE blocks count activated FLOPs: router, top-k routed and the shared experts.

    Args:
      config: the full config (uses `model.*` and `data.seq_len`) or `config.model` with
        `seq_len` given.
    """
    from mtp_jax.model.layers import depth_is_moe, layer_is_moe

    model_cfg = config.model if hasattr(config, "model") else config
    if seq_len is None:
        seq_len = config.data.seq_len
    cfg = ModelConfig.from_any(model_cfg)
    head = 2 * cfg.d_model * cfg.vocab_size
    forward = head + sum(
        _block_flops(cfg, seq_len, layer_is_moe(cfg, i)) for i in range(cfg.n_layers)
    )
    if cfg.mtp_depth:
        per_depth = _block_flops(cfg, seq_len, depth_is_moe(cfg)) + head
        if cfg.mtp_layout == "sequential":
            per_depth += 2 * (2 * cfg.d_model) * cfg.d_model
        forward += cfg.mtp_depth * per_depth
    return 3.0 * forward


def _attention_params(cfg: ModelConfig) -> int:
    if cfg.attention == "mla":
        from mtp_jax.model.mla import mla_param_count

        return mla_param_count(cfg)
    e, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    return e * h * (n + 2 * k) + n * h * e


def _ffn_params(cfg: ModelConfig, moe: bool, activated: bool) -> int:
    e = cfg.d_model
    if not moe:
        return 3 * e * cfg.mlp_dim
    m = cfg.moe
    routed = (m.top_k if activated else m.num_experts) * 3 * e * m.expert_dim
    router = e * m.num_experts + m.num_experts  # weights and balance bias
    return router + routed + m.shared_experts * 3 * e * m.expert_dim


def _count(cfg: ModelConfig, activated: bool) -> int:
    from mtp_jax.model.layers import depth_is_moe, layer_is_moe

    e, v = cfg.d_model, cfg.vocab_size

    def block(moe: bool) -> int:
        return _attention_params(cfg) + _ffn_params(cfg, moe, activated) + 2 * e

    total = v * e + e + (0 if cfg.tie_embeddings else e * v)
    total += sum(block(layer_is_moe(cfg, i)) for i in range(cfg.n_layers))
    if cfg.mtp_depth:
        depth = block(depth_is_moe(cfg)) + e
        if cfg.mtp_layout == "sequential":
            depth += 2 * e * e + 2 * e
        total += (1 if cfg.mtp_share_depths else cfg.mtp_depth) * depth
    return total


def param_count(config: Any) -> int:
    """Number of parameters of the model described by `config.model` (or a ModelConfig)."""
    return _count(ModelConfig.from_any(config.model if hasattr(config, "model") else config), False)


def activated_param_count(config: Any) -> int:
    """Parameters one token uses: as `param_count`, with each MoE layer's routed experts
    counted top_k times instead of num_experts times (router and shared experts in full)."""
    return _count(ModelConfig.from_any(config.model if hasattr(config, "model") else config), True)
