"""MoE smoke config: a tiny byte-level DeepSeek-V3-shaped model (MoE + MLA + D=1 MTP) for CPUs.

Layer 0 keeps the dense MLP; layers 1-2 are DeepSeekMoE (8 routed experts, top-2, one shared
expert, auxiliary-loss-free balancing); attention is multi-head latent attention. Trains on
the embedded default corpus (the running interpreter's standard library).

Run (one machine, CPU is fine):
    mtp-train --config configs/moe_smoke.py --workdir runs/moe_smoke
    mtp-generate --workdir runs/moe_smoke --prompt "def main(" --max-new-tokens 64
Per-layer routing metrics (moe/layer_<i>/load_max, load_min, dropped, bias_norm) go to
metrics.jsonl and TensorBoard with the losses.
"""

from mtp_jax.config import base_config


def get_config():
    config = base_config()
    config.seed = 0

    m = config.model
    m.vocab_size = 259  # ByteTokenizer: 256 bytes + PAD, BOS, EOS
    m.d_model = 128
    m.n_layers = 3
    m.n_heads = 4
    m.head_dim = 32  # MLA: query/key "nope" width and value width
    m.attention = "mla"
    m.q_lora_rank = 0  # full-rank queries (DeepSeek-V2-Lite); V3 uses a low-rank query
    m.kv_lora_rank = 64
    m.qk_rope_head_dim = 16
    m.mlp_dim = 384  # the dense first layer
    m.mtp_depth = 1  # DeepSeek-V3's single MTP depth, with the trunk's block type (MoE)
    m.mtp_layout = "sequential"
    m.dtype = "float32"
    m.param_dtype = "float32"

    moe = m.moe
    moe.num_experts = 8
    moe.top_k = 2
    moe.shared_experts = 1
    moe.expert_dim = 96
    moe.first_dense_layers = 1
    moe.routed_scaling = 1.0
    moe.bias_update_rate = 1e-3
    moe.balance_loss_weight = 1e-4
    moe.capacity_factor = 0.0  # dropless

    config.loss.chunk_size = 128

    d = config.data
    d.source = "store"
    d.corpus = "stdlib"
    d.tokenizer = "byte"
    d.seq_len = 128
    d.batch_size = 16

    t = config.train
    t.steps = 300
    t.lr = 3e-3
    t.warmup_steps = 30
    t.schedule = "cosine"
    t.log_every = 25
    t.eval_every = 100
    t.eval_steps = 4

    config.checkpoint.every = 100
    config.checkpoint.keep = 2
    return config
