"""`init.from_hf` / `init.from_workdir`: a fresh run's parameters taken from a Hugging Face
safetensors directory or another run's checkpoint.

The source must hold the configured architecture (a different `model.*` value is an error
naming the key). MTP depths come from the source when it has them (then its MTP settings must
match too) and keep their fresh initialisation when it has none. Only the parameters are taken;
the optimizer starts fresh. The source is read whole on each host, then placed into the
training shardings.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from mtp_jax.config import ConfigDict
from mtp_jax.interop import hf, safetensors_io
from mtp_jax.model import layout
from mtp_jax.model.config import ModelConfig


def source_params(config: ConfigDict) -> tuple[dict[str, np.ndarray], str] | None:
    """(flat source parameters {slot: array}, a description) of `config.init`, or None."""
    cfg = ModelConfig.from_any(config.model)
    if config.init.from_hf:
        path = config.init.from_hf
        hf_cfg = read_hf_config(path)
        src = hf.model_config_from_hf(hf_cfg, base=cfg)
        what = f"init.from_hf={path!r}"
        hf.check_matches(cfg, src, what, with_mtp=hf.source_has_mtp(hf_cfg))
        return hf.from_hf(src, hf_cfg, safetensors_io.load(path)), what
    if config.init.from_workdir:
        from mtp_jax.train.checkpoint import load_params, saved_config

        path = config.init.from_workdir
        src_config, step = saved_config(path)
        src = ModelConfig.from_any(src_config.model)
        what = f"init.from_workdir={path!r} (step {step})"
        hf.check_matches(cfg, src, what, with_mtp=src.mtp_depth > 0)
        return layout.flatten(src, load_params(path, step)), what
    return None


def read_hf_config(path: str) -> dict:
    """config.json of an HF directory (ConfigError-style InteropError when missing)."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise hf.InteropError(f"{path!r} has no config.json (a Hugging Face model directory?)")
    with open(file) as f:
        return json.load(f)


def _host_params(params: Any) -> Any:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(params, tiled=True)
    return jax.device_get(params)


def warm_start(config: ConfigDict, params: Any, shardings: Any) -> tuple[Any, str, int]:
    """Fresh `params` (in `shardings`) with the `config.init` source's values put in.

    Returns (params in the same shardings, what was read, parameters kept fresh).
    """
    found = source_params(config)
    if found is None:
        return params, "", 0
    source, what = found
    cfg = ModelConfig.from_any(config.model)
    merged, fresh = hf.merge(layout.flatten(cfg, _host_params(params)), source, what)
    tree = layout.unflatten(cfg, merged)

    def place(x, sharding):
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(place, tree, shardings), what, fresh
