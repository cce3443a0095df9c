"""Smoke config: a tiny byte-level model with a D=2 sequential MTP chain, for CPUs.

Trains on the embedded default corpus (the Python standard library of the running interpreter,
prepared automatically into a tensorstore token store on first use).

Run (one machine, CPU is fine):
    mtp-train --config configs/smoke.py --workdir runs/smoke
Expect on 2 CPU cores: about 25 s for 300 steps (~0.08 s/step, ~25k tokens/s). The next-token
loss (loss/depth_0) falls from 5.6 (ln 259) to about 1.8 (accuracy ~0.53); the depth-1 and
depth-2 losses end close to it (~1.83 / ~1.73: depth k also reads token i+k). The total
loss L0 + 0.3 (L1 + L2) goes from ~8.9 to ~2.9. Peak memory < 2 GiB.
Then sample from it:
    mtp-generate --workdir runs/smoke --prompt "def main(" --max-new-tokens 64
"""

from mtp_jax.config import base_config


def get_config():
    config = base_config()
    config.seed = 0

    m = config.model
    m.vocab_size = 259  # ByteTokenizer: 256 bytes + PAD, BOS, EOS
    m.d_model = 128
    m.n_layers = 2
    m.n_heads = 4
    m.n_kv_heads = 2
    m.head_dim = 32
    m.mlp_dim = 384
    m.mtp_depth = 2
    m.mtp_layout = "sequential"
    m.dtype = "float32"  # bfloat16 is not faster on CPUs
    m.param_dtype = "float32"
    m.remat_policy = "none"

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
