"""~1.1B-parameter llama-style model with D=1 sequential MTP, for one 8-GPU node (FSDP).

Run on one node of 8 GPUs (one process, 8 local devices):
    mtp-train --config configs/gpu_1b.py --workdir /ckpt/1b \
        --config.data.corpus=/data/text --config.data.tokenizer=/data/tokenizer.json
On a SLURM cluster: sbatch launch/slurm_gpu.sbatch configs/gpu_1b.py /ckpt/1b
Memory plan without GPUs: --compile_only.
"""

from mtp_jax.config import base_config


def get_config():
    config = base_config()
    m = config.model
    m.vocab_size = 32_000
    m.d_model = 2048
    m.n_layers = 20
    m.n_heads = 16
    m.n_kv_heads = 8
    m.head_dim = 128
    m.mlp_dim = 5632
    m.mtp_depth = 1
    m.mtp_layout = "sequential"
    m.dtype = "bfloat16"
    m.param_dtype = "float32"
    m.remat_policy = "dots_no_batch"
    m.attention_impl = "auto"

    config.loss.chunk_size = 512
    config.loss.mtp_lambda = 0.3
    config.loss.mtp_lambda_final = 0.1

    d = config.data
    d.tokenizer = "byte"  # replace with your tokenizer (vocab <= model.vocab_size)
    d.seq_len = 2048
    d.batch_size = 256
    d.worker_count = 8

    t = config.train
    t.steps = 50_000
    t.lr = 3e-4
    t.warmup_steps = 2_000
    t.schedule = "wsd"
    t.log_every = 100
    t.eval_every = 2_000
    t.eval_steps = 20

    config.checkpoint.every = 1_000
    config.checkpoint.keep = 3
    config.checkpoint.keep_every = 10_000

    config.mesh.data = 1
    config.mesh.fsdp = -1
    return config
