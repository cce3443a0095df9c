"""~7B-parameter llama-style model with D=1 sequential MTP, for a TPU v5p pod slice.

Target slice v5p-128 (64 chips, topology 4x4x4), FSDP over all chips.
Launch on the pod (every worker runs the same command):
    launch/tpu_pod.sh NAME ZONE PROJECT configs/tpu_7b.py gs://BUCKET/runs/7b
Plan it from a laptop (compiles the real step for the slice, prints per-chip memory):
    mtp-train --config configs/tpu_7b.py --workdir /tmp/plan --compile_only --topology v5p:4x4x4
"""

from mtp_jax.config import base_config


def get_config():
    config = base_config()
    m = config.model
    m.vocab_size = 32_000
    m.d_model = 4096
    m.n_layers = 32
    m.n_heads = 32
    m.n_kv_heads = 8
    m.head_dim = 128
    m.mlp_dim = 14_336
    m.mtp_depth = 1
    m.mtp_layout = "sequential"
    m.dtype = "bfloat16"
    m.param_dtype = "float32"
    m.remat_policy = "full"
    m.tie_embeddings = False

    config.loss.chunk_size = 512
    config.loss.mtp_lambda = 0.3
    config.loss.mtp_lambda_final = 0.1

    d = config.data
    d.path = "gs://YOUR_BUCKET/stores/corpus"  # prepared with mtp-prepare
    d.tokenizer = "byte"  # replace with your tokenizer (vocab <= model.vocab_size)
    d.seq_len = 4096
    d.batch_size = 256
    d.worker_count = 8

    t = config.train
    t.steps = 100_000
    t.lr = 3e-4
    t.warmup_steps = 2_000
    t.schedule = "wsd"
    t.log_every = 100
    t.eval_every = 5_000
    t.eval_steps = 10

    config.checkpoint.every = 500
    config.checkpoint.keep = 3
    config.checkpoint.keep_every = 10_000

    config.mesh.data = 1
    config.mesh.fsdp = -1
    return config
