"""`mtp-import --hf DIR --out W [--config FILE] [--config.a.b=v ...]`: a Hugging Face
Llama/Qwen2-style or DeepSeek-V3 (MLA + MoE) checkpoint (or an `mtp-export` directory) as a
workdir W.

W holds a step-0 Orbax checkpoint of the parameters (with a fresh optimizer state) and the
config, as training writes them: `mtp-generate --workdir W`, `load_params(W)` and
`init.from_workdir=W` read it. The architecture comes from config.json; every other setting
from --config (default: the base config) and overrides, including the MTP depths added, freshly
initialised, when the source has none, and the MoE training settings (bias_update_rate,
balance_loss_weight, capacity_factor). A config.json field we cannot represent exactly (rope
scaling, sliding windows, biases, softmax routing) is an error naming it.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from collections.abc import Sequence

PROG = "mtp-import"


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--hf", required=True, help="Hugging Face model directory")
    p.add_argument("--out", required=True, help="workdir to write (must hold no checkpoint)")
    p.add_argument("--config", default=None, help="config file for everything but the shape")
    args, rest = p.parse_known_args(argv)
    bad = [r for r in rest if not r.startswith("--config.")]
    if bad:
        p.error(f"unrecognised arguments: {' '.join(bad)}")
    return args, rest


def _config(path: str | None, overrides: list[str], hf_dir: str, model_values: dict):
    from mtp_jax.config import (
        ConfigDict,
        apply_overrides,
        load_config,
        merge_into_base,
        validate,
    )

    if path:
        config = load_config(path, overrides)
        config = ConfigDict(config.to_dict())
    else:
        config = merge_into_base(ConfigDict())
        apply_overrides(config, overrides)
    config.model.update(model_values)
    config.init.from_hf = os.path.abspath(hf_dir)
    config.init.from_workdir = ""
    for name in ("tokenizer.json", "tokenizer.model"):
        if os.path.isfile(os.path.join(hf_dir, name)):
            config.data.tokenizer = name  # rewritten to W's copy by `run`
    if os.path.isfile(os.path.join(hf_dir, "mtp_jax_tokenizer.json")):
        config.data.tokenizer = "byte"
    config.lock()
    validate(config)
    return config


def run(args: argparse.Namespace, overrides: list[str]) -> dict:
    import dataclasses

    import jax

    from mtp_jax.config import ConfigDict
    from mtp_jax.interop import hf
    from mtp_jax.model.config import ModelConfig
    from mtp_jax.model.model import Model
    from mtp_jax.sharding import make_mesh
    from mtp_jax.train.checkpoint import Checkpointer, checkpoint_dir
    from mtp_jax.train.state import abstract_state, init_state, make_optimizer
    from mtp_jax.train.warm_start import read_hf_config, warm_start

    hf_cfg = read_hf_config(args.hf)
    probe = _config(args.config, overrides, args.hf, {})
    cfg = hf.model_config_from_hf(hf_cfg, base=ModelConfig.from_any(probe.model))
    config = _config(args.config, overrides, args.hf, dataclasses.asdict(cfg))
    if os.path.isdir(os.fspath(checkpoint_dir(args.out))):
        raise hf.InteropError(f"{args.out!r} already holds checkpoints; choose a new --out")
    os.makedirs(args.out, exist_ok=True)
    if config.data.tokenizer in ("tokenizer.json", "tokenizer.model"):
        name = config.data.tokenizer
        shutil.copyfile(os.path.join(args.hf, name), os.path.join(args.out, name))
        config.unlock()
        config.data.tokenizer = os.path.abspath(os.path.join(args.out, name))
        config.lock()

    mesh = make_mesh(ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}), jax.devices()[:1])
    model, tx = Model(config.model), make_optimizer(config)
    _, shardings = abstract_state(config, model, tx, mesh)
    state = init_state(config, model, tx, shardings)
    params, _, fresh = warm_start(config, state.params, shardings.params)
    state = state.replace(params=params)
    checkpointer = Checkpointer(args.out, config)
    checkpointer.save(0, state, force=True)
    checkpointer.close()
    count = sum(x.size for x in jax.tree.leaves(params))
    return {"cfg": cfg, "fresh": fresh, "count": count, "has_mtp": hf.source_has_mtp(hf_cfg)}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `mtp-import`; returns the exit status (2 on a usage error)."""
    args, overrides = parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)
    from mtp_jax.checks import ConfigError
    from mtp_jax.interop.safetensors_io import SafetensorsError
    from mtp_jax.train.checkpoint import CheckpointError

    try:
        out = run(args, overrides)
    except (ConfigError, SafetensorsError, CheckpointError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    cfg = out["cfg"]
    print(f"wrote {args.out}: step-0 checkpoint, {out['count']:,} parameters")
    if cfg.mtp_depth and not out["has_mtp"]:
        print(f"  {cfg.mtp_depth} new MTP depths ({out['fresh']} tensors) freshly initialised")
    return 0


if __name__ == "__main__":
    sys.exit(main())
