"""DeepSeek-V3 at full size: MLA + DeepSeekMoE (256 routed experts, top-8) + D=1 sequential MTP.

Layout as the paper / HF config: vocab 129280, d_model 7168, 61 layers (the first 3 dense,
mlp_dim 18432), 128 heads of 128 (+64 RoPE), q_lora_rank 1536, kv_lora_rank 512; 256 routed
experts of 2048 with top-8 sigmoid routing inside each token's best 4 of 8 expert groups
(n_group 8, topk_group 4), 1 shared expert, routed_scaling 2.5,
auxiliary-loss-free balancing (bias update 1e-3) plus the sequence-wise balance loss (1e-4).

Parameters (`mtp_jax.model.flops`): 671.03 B total / 37.55 B activated per token for the main
model (DeepSeek: 671 B / 37 B); with the MTP depth 682.64 B / 38.24 B. Our MTP depth shares the
embedding and the output head with the trunk (11.6 B of its own), where the released
checkpoint stores copies (its MTP module: 14 B, 685 B in all). Training FLOPs: 291.8 GFLOP per
token (activated, MTP included).

Capacity mode (`model.moe.capacity_factor=1.25`): the dropless expert-parallel exchange sends
every expert shard a worst-case buffer of T*k rows (XLA:CPU has no ragged all-to-all, so the
exchange is written without one), mesh.expert x T x 8 x 7168 bf16 values per layer: tens of
GB per device at this size. Capacity limits training and eval forwards alike; only cached
decoding routes dropless.

State: float32 parameters + Adam's two moments are ~8 TB (+ float32 gradients), so the slice
is a v5p-1024 (8x8x8, 512 chips, 95 GiB each): fsdp=8 x expert=8 x tensor=8. Expert weights
[256, 7168, 2048] split experts/8 x d_model/8 x width/8 (every device a 1/512 share); dense
weights (MLA, shared experts, the dense layers, embedding, head) over fsdp x tensor (1/64;
MLA's q_up, k_up and v_up over tensor only, 1/8). tensor=8 also splits MLA's [B, 128/8
heads, S, S] float32 scores (MLA runs XLA attention under attention_impl=auto: with
model.attention_impl=splash the plan needs 82.53 GiB, 3.9 GiB more). Global batch 512 x
4096 (2.1M tokens) in 8 microbatches: 1 sequence per device per microbatch. Eval takes the
batch in the same 8 slices, in capacity mode as training (when eval ran the batch whole and
routed dropless, batch 512 on fsdp=4 x expert=32 x tensor=4 needed 186 GiB of temporaries per
device in the eval step).

Planned on a 2-core CPU host (see README, "Planning a TPU run"):
    mtp-train --config configs/deepseek_v3.py --workdir /tmp/plan --compile_only \\
        --topology v5p:8x8x8
-> fits: 78.64 GiB per chip of 95 (temporaries 55.34 GiB, parameters 7.66, Adam 15.33), model
FLOPs 6.120e17 per step, compile 182 s (0.5.0: group-limited routing, eval in 8 slices; 2-core
host shared with a test run, 6.4 GB of RAM; the same memory as plain top-8 routing with eval
whole, which compiled in 381 s under more load). Batch 128 in 2 microbatches (planned before
0.5.0): 85.47 GiB; in 1: 97.27 GiB (short by 2.27).
"""

from mtp_jax.config import base_config


def get_config():
    config = base_config()

    m = config.model
    m.vocab_size = 129_280
    m.d_model = 7168
    m.n_layers = 61
    m.n_heads = 128
    m.n_kv_heads = 1  # unused by MLA (must divide n_heads)
    m.head_dim = 128  # MLA: query/key "nope" width and value width
    m.attention = "mla"
    m.q_lora_rank = 1536
    m.kv_lora_rank = 512
    m.qk_rope_head_dim = 64
    m.mlp_dim = 18_432  # the three dense first layers
    m.mtp_depth = 1
    m.mtp_layout = "sequential"
    m.dtype = "bfloat16"
    m.param_dtype = "float32"
    m.remat_policy = "full"
    m.tie_embeddings = False

    moe = m.moe
    moe.num_experts = 256
    moe.top_k = 8
    moe.shared_experts = 1
    moe.expert_dim = 2048
    moe.first_dense_layers = 3
    moe.n_group = 8  # group-limited routing, as the released model (and its HF config.json)
    moe.topk_group = 4
    moe.routed_scaling = 2.5
    moe.bias_update_rate = 1e-3
    moe.balance_loss_weight = 1e-4
    moe.capacity_factor = 1.25

    config.loss.chunk_size = 512
    config.loss.mtp_lambda = 0.3
    config.loss.mtp_lambda_final = 0.1

    d = config.data
    d.path = "gs://YOUR_BUCKET/stores/corpus"  # prepared with mtp-prepare
    d.tokenizer = "byte"  # replace with your tokenizer (vocab <= model.vocab_size)
    d.seq_len = 4096
    d.batch_size = 512
    d.worker_count = 8

    t = config.train
    t.microbatches = 8  # 1 sequence per device per microbatch (see the docstring)
    t.steps = 100_000
    t.lr = 2.2e-4
    t.warmup_steps = 2_000
    t.schedule = "wsd"
    t.log_every = 100
    t.eval_every = 5_000
    t.eval_steps = 10

    config.checkpoint.every = 500
    config.checkpoint.keep = 3
    config.checkpoint.keep_every = 10_000

    config.mesh.data = 1
    config.mesh.fsdp = -1  # 8 on v5p:8x8x8
    config.mesh.expert = 8  # 32 routed experts per expert shard
    config.mesh.tensor = 8  # heads, MLP and expert hidden widths, vocab
    return config
