"""DeepSeek-V2-Lite-sized MoE + MLA model with D=1 sequential MTP, for a TPU v5p-32 (2x2x4).

Layout as DeepSeek-V2-Lite: vocab 102400, d_model 2048, 27 layers (the first dense, mlp_dim
10944), 16 heads of 128 (+64 RoPE), full-rank queries (q_lora_rank 0), kv_lora_rank 512;
64 routed experts of 1408, top-6, 2 shared experts; plus one sequential MTP depth (MoE).
Routing is what mtp_jax implements, DeepSeek-V3's: sigmoid affinities, gates normalised over
the top-k, auxiliary-loss-free balance bias (V2-Lite itself used softmax routing with
auxiliary balance losses, which this code does not have).

Parameters (`mtp_jax.model.flops`): 15.71 B total / 2.66 B activated per token without the
MTP depth (DeepSeek: 15.7 B / 2.4 B, which leaves out the 0.21 B embedding: 2.45 B here);
with it 16.30 B / 2.75 B. Training FLOPs: 20.0 GFLOP per token (activated, MTP included).

Dropless routing (capacity_factor 0). Mesh fsdp=2 x expert=8 on 16 chips: expert weights
split experts/8 x d_model/2, dense weights over fsdp (replicated over expert). Global batch
64 x 4096 in 2 microbatches (2 sequences per device per microbatch).

Planned on a 2-core CPU host (see README, "Planning a TPU run"):
    mtp-train --config configs/deepseek_v2_lite.py --workdir /tmp/plan --compile_only \\
        --topology v5p:2x2x4
-> fits: 85.03 GiB per chip of 95 (temporaries 66.35 GiB, parameters 6.11, Adam 12.21), model
FLOPs 5.253e15 per step, compile 588 s (contended 2-core host). On v5p:2x2x2 (8 chips, mesh
expert=8, batch 32 in one microbatch) it needs 100.44 GiB: short by 5.44 GiB.
"""

from mtp_jax.config import base_config


def get_config():
    config = base_config()

    m = config.model
    m.vocab_size = 102_400
    m.d_model = 2048
    m.n_layers = 27
    m.n_heads = 16
    m.n_kv_heads = 1  # unused by MLA (must divide n_heads)
    m.head_dim = 128  # MLA: query/key "nope" width and value width
    m.attention = "mla"
    m.q_lora_rank = 0  # full-rank queries, as V2-Lite
    m.kv_lora_rank = 512
    m.qk_rope_head_dim = 64
    m.mlp_dim = 10_944  # the dense first layer
    m.mtp_depth = 1
    m.mtp_layout = "sequential"
    m.dtype = "bfloat16"
    m.param_dtype = "float32"
    m.remat_policy = "full"
    m.tie_embeddings = False

    moe = m.moe
    moe.num_experts = 64
    moe.top_k = 6
    moe.shared_experts = 2
    moe.expert_dim = 1408
    moe.first_dense_layers = 1
    moe.routed_scaling = 1.0
    moe.bias_update_rate = 1e-3
    moe.balance_loss_weight = 1e-4
    moe.capacity_factor = 0.0  # dropless

    config.loss.chunk_size = 512
    config.loss.mtp_lambda = 0.3
    config.loss.mtp_lambda_final = 0.1

    d = config.data
    d.path = "gs://YOUR_BUCKET/stores/corpus"  # prepared with mtp-prepare
    d.tokenizer = "byte"  # replace with your tokenizer (vocab <= model.vocab_size)
    d.seq_len = 4096
    d.batch_size = 64
    d.worker_count = 8

    t = config.train
    t.microbatches = 2  # 2 sequences per device per microbatch
    t.steps = 100_000
    t.lr = 4.2e-4
    t.warmup_steps = 2_000
    t.schedule = "wsd"
    t.log_every = 100
    t.eval_every = 5_000
    t.eval_steps = 10

    config.checkpoint.every = 500
    config.checkpoint.keep = 3
    config.checkpoint.keep_every = 10_000

    config.mesh.data = 1
    config.mesh.fsdp = -1  # 2 on v5p:2x2x4
    config.mesh.expert = 8  # 8 routed experts per expert shard
    return config
