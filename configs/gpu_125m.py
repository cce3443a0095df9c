"""~125M-parameter (trunk) llama-style model with D=1 sequential MTP, for one GPU.

Data: point `data.corpus` at your text (dir / glob / .jsonl) and `data.tokenizer` at a
tokenizer.json or SentencePiece .model with <= 32,000 ids; the store is prepared on first use.
Run on one GPU:
    mtp-train --config configs/gpu_125m.py --workdir runs/125m \
        --config.data.corpus=/data/text --config.data.tokenizer=/data/tokenizer.json
Plan the memory without a GPU:
    mtp-train --config configs/gpu_125m.py --workdir /tmp/plan --compile_only
Throughput benchmark on synthetic tokens: add --config.data.source=synthetic.
"""

from mtp_jax.config import base_config


def get_config():
    config = base_config()
    m = config.model
    m.vocab_size = 32_000
    m.d_model = 768
    m.n_layers = 12
    m.n_heads = 12
    m.n_kv_heads = 4
    m.head_dim = 64
    m.mlp_dim = 2048
    m.mtp_depth = 1
    m.mtp_layout = "sequential"
    m.dtype = "bfloat16"
    m.param_dtype = "float32"
    m.remat_policy = "dots_no_batch"
    m.tie_embeddings = True
    m.attention_impl = "auto"

    config.loss.chunk_size = 128  # benchmarks/model_memory.py: less memory per depth than 256
    config.loss.mtp_lambda = 0.3
    config.loss.mtp_lambda_final = 0.1  # DeepSeek-V3: 0.3 -> 0.1 when the LR decays

    d = config.data
    d.tokenizer = "byte"  # replace with your tokenizer (vocab <= model.vocab_size)
    d.seq_len = 1024
    d.batch_size = 64
    d.worker_count = 4

    t = config.train
    t.steps = 20_000
    t.lr = 6e-4
    t.warmup_steps = 1_000
    t.schedule = "wsd"
    t.decay_fraction = 0.2
    t.log_every = 50
    t.eval_every = 1_000
    t.eval_steps = 20

    config.checkpoint.every = 1_000
    config.checkpoint.keep = 3
    config.checkpoint.keep_every = 5_000
    return config
