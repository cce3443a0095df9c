"""`mtp-export --workdir W [--step N] --out DIR`: a run's checkpoint as a Hugging Face directory.

Writes `config.json` (Llama fields for dense GQA models, DeepSeek-V3's for MLA / MoE ones,
`num_nextn_predict_layers` for sequential depths, our `mtp_jax` section),
`model.safetensors` (or shards past --max-shard-size with `model.safetensors.index.json`)
and the run's tokenizer files. The naming, the eh_proj column order, the rope permutation and
the h^0 convention are in `mtp_jax/interop/hf.py`. Every parameter is written exactly once;
the count is printed. `--no-mtp` leaves the MTP depths out (and says how many
tensors); `--engine-copies` adds the per-depth `embed_tokens` / `shared_head.head` copies the
released DeepSeek-V3 files carry.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from collections.abc import Sequence

PROG = "mtp-export"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0].strip("`"))
    p.add_argument("--workdir", required=True, help="the training run's directory")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--no-mtp", action="store_true", help="leave the MTP depths out")
    p.add_argument(
        "--engine-copies",
        action="store_true",
        help="also write each depth layer's embed_tokens / shared_head.head copies "
        "(as the released DeepSeek-V3 files do)",
    )
    p.add_argument(
        "--max-shard-size", default="5GB", help="shard past this size (5GB, 500MB, bytes)"
    )
    return p.parse_args(argv)


def write_tokenizer(spec: str, vocab_size: int, out: str) -> str:
    """Copies the run's tokenizer file into `out` (or describes the byte tokenizer);
    returns what was written."""
    if spec == "byte":
        from mtp_jax.data.tokenizer import ByteTokenizer

        t = ByteTokenizer()
        note = {
            "tokenizer": "byte",
            "description": "UTF-8 bytes as ids 0..255, then PAD=256, BOS=257, EOS=258",
            "vocab_size": t.vocab_size,
            "pad_token_id": t.pad_id,
            "bos_token_id": t.bos_id,
            "eos_token_id": t.eos_id,
            "model_vocab_size": vocab_size,
        }
        with open(os.path.join(out, "mtp_jax_tokenizer.json"), "w") as f:
            json.dump(note, f, indent=2)
        return "mtp_jax_tokenizer.json (byte tokenizer)"
    if not os.path.isfile(spec):
        return f"nothing: the run's tokenizer {spec!r} is not on this machine"
    name = "tokenizer.model" if spec.endswith(".model") else "tokenizer.json"
    shutil.copyfile(spec, os.path.join(out, name))
    return name


def run(args: argparse.Namespace) -> dict:
    from mtp_jax.interop import hf, safetensors_io
    from mtp_jax.model.config import ModelConfig
    from mtp_jax.train.checkpoint import load_params, saved_config

    max_bytes = safetensors_io.parse_size(args.max_shard_size)
    config, step = saved_config(args.workdir, args.step)
    cfg = ModelConfig.from_any(config.model)
    exported = hf.to_hf(
        cfg, load_params(args.workdir, step), include_mtp=not args.no_mtp,
        engine_copies=args.engine_copies,
    )  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    files = safetensors_io.save(exported.tensors, args.out, max_bytes)
    hf_cfg = hf.hf_config(cfg, include_mtp=not args.no_mtp, max_positions=config.data.seq_len)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2)
    tokenizer = write_tokenizer(config.data.tokenizer, cfg.vocab_size, args.out)
    return {"step": step, "exported": exported, "files": files, "tokenizer": tokenizer, "cfg": cfg}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `mtp-export`; returns the exit status (2 on a usage error)."""
    args = parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)
    from mtp_jax.checks import ConfigError
    from mtp_jax.interop.safetensors_io import SafetensorsError
    from mtp_jax.train.checkpoint import CheckpointError

    try:
        out = run(args)
    except (CheckpointError, ConfigError, SafetensorsError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    ex, cfg = out["exported"], out["cfg"]
    print(
        f"wrote {ex.parameters} tensors from step {out['step']} to {args.out} "
        f"({len(out['files'])} files: {', '.join(out['files'])})"
    )
    if ex.copies:
        print(f"  plus {ex.copies} engine copies of the shared embedding / head")
    if args.no_mtp:
        print(f"  --no-mtp: left out {ex.left_out} MTP tensors ({cfg.mtp_depth} depths)")
    print(f"  tokenizer: {out['tokenizer']}")
    if cfg.mtp_depth and not args.no_mtp and cfg.mtp_layout == "sequential":
        if cfg.mtp_chain_input == "trunk":
            print(
                "  note: this model's depths read the trunk state before the final norm; "
                "vLLM/SGLang feed them the normed state, so they draft differently there "
                "(train with model.mtp_chain_input='normed' to match)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
