"""Safetensors directories as Hugging Face writes them: `model.safetensors`, or shards
`model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`
(`{"metadata": {"total_size": bytes}, "weight_map": {name: shard file}}`).
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
from safetensors.numpy import load_file, save_file

from mtp_jax.checks import ConfigError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class SafetensorsError(ConfigError):
    """An unreadable or inconsistent safetensors directory, or a bad size (a ConfigError: the
    directory or size comes from a flag or `init.from_hf`)."""


def parse_size(text: str | int) -> int:
    """'5GB' (10^9, as Hugging Face counts), '500MiB', '1024' -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(text).upper())
    if not m or m.group(2) not in _UNITS:
        raise SafetensorsError(f"size {text!r}: expected e.g. 5GB, 500MB, 2GiB or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def save(tensors: dict[str, np.ndarray], out_dir: str, max_shard_bytes: int) -> list[str]:
    """Writes `tensors` (in their order) into `out_dir`; shards past `max_shard_bytes` (a
    tensor larger than the limit gets a shard of its own). Returns the files written."""
    os.makedirs(out_dir, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, value in tensors.items():
        value = np.ascontiguousarray(value)
        if shards[-1] and size + value.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += value.nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, SINGLE), metadata=meta)
        return [SINGLE]
    files, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, fname), metadata=meta)
        files.append(fname)
        weight_map.update({name: fname for name in shard})
    total = sum(v.nbytes for v in tensors.values())
    with open(os.path.join(out_dir, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return files + [INDEX]


def load(hf_dir: str) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors directory (single file or index + shards)."""
    index = os.path.join(hf_dir, INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        out: dict[str, np.ndarray] = {}
        for fname in sorted(set(weight_map.values())):
            shard = load_file(os.path.join(hf_dir, fname))
            for name, value in shard.items():
                if weight_map.get(name) != fname:
                    raise SafetensorsError(
                        f"{fname} holds {name}, which {INDEX} does not map to it"
                    )
                out[name] = value
        missing = sorted(set(weight_map) - set(out))
        if missing:
            raise SafetensorsError(f"{INDEX} lists tensors no shard holds: {missing[:5]}")
        return out
    single = os.path.join(hf_dir, SINGLE)
    if os.path.isfile(single):
        return load_file(single)
    raise SafetensorsError(f"{hf_dir!r} holds neither {SINGLE} nor {INDEX}")
