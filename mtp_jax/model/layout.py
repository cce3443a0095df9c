"""The parameter tree as flat named slots, so that export, import and warm starts never index
the tree themselves (the model owns its layout).

A slot names one parameter of one layer / depth, independently of how it is stored:

    embed.embedding              [V, E]      head           [E, V] (untied only)
    final_norm.scale             [E]
    layers.{i}.<block>           trunk block i (0-based), scanned or not
    depths.{k}.<depth>           sequential depth k (1-based); with model.mtp_share_depths the
                                 one shared depth module is `depths.1.*` only
    heads.{k}.<head>             parallel head k (1-based)

<block> is `attn_norm.scale`, `attn.{query,key,value}` [E, N|K, H], `attn.out` [N, H, E],
`mlp_norm.scale`, `mlp.{gate,up}.kernel` [E, F], `mlp.down.kernel` [F, E]; with MLA
(`model.attention='mla'`) `attn.{query [E, N, H+R] | q_down [E, Q], q_norm.scale, q_up
[Q, N, H+R]}`, `attn.kv_down` [E, C+R], `attn.kv_norm.scale`, `attn.{k_up,v_up}` [C, N, H],
`attn.out`; a MoE block's FFN is `mlp.router` [E, n], `mlp.router_bias` [n],
`mlp.{wi_gate,wi_up}` [n, E, F], `mlp.wo` [n, F, E], `mlp.shared.{gate,up,down}.kernel`
(`layers.{i}` is trunk layer i, in the scanned `dense_layers` stack or `layers`); <depth> is
`hidden_norm.scale`, `embed_norm.scale`, `proj.kernel` [2E, E] (rows: hidden first, then
embedding), `block.<block>`, `out_norm.scale`; <head> is `block.<block>`, `out_norm.scale`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax.model.config import ModelConfig
from mtp_jax.model.model import Model


@dataclasses.dataclass(frozen=True)
class Slot:
    """One named parameter: `params[path][index]` (index on a stacked axis, or None)."""

    name: str
    path: tuple[str, ...]
    index: int | None
    shape: tuple[int, ...]
    dtype: Any


def _leaves(tree: Any, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    if isinstance(tree, dict):
        out = []
        for k in sorted(tree):
            out.extend(_leaves(tree[k], prefix + (k,)))
        return out
    return [(prefix, tree)]


@functools.cache
def slots(cfg: ModelConfig) -> tuple[Slot, ...]:
    """Every parameter slot of the model `cfg`, in a stable order (see the module docstring)."""
    example = jnp.zeros((1, 1 + cfg.mtp_depth), jnp.int32)
    abstract = jax.eval_shape(lambda k: Model(cfg).init(k, example)["params"], jax.random.key(0))
    # Scanned trunk stacks: `dense_layers` (model.moe.first_dense_layers) then `layers`.
    first = {"dense_layers": 0, "layers": cfg.moe.first_dense_layers if cfg.moe.enabled else 0}
    out = []
    for path, leaf in _leaves(nn.unbox(abstract)):
        shape, dtype = tuple(leaf.shape), leaf.dtype
        stacked = path[0] == "trunk" and path[1] in first and path[2:3] == ("block",)
        rest = ".".join(path[3:] if stacked else path[2:])
        if stacked:
            n0 = first[path[1]]
            out += [
                Slot(f"layers.{n0 + i}.{rest}", path, i, shape[1:], dtype) for i in range(shape[0])
            ]
        elif path[0] == "trunk":  # unscanned: trunk/layers_{i}/...
            i = int(path[1].removeprefix("layers_"))
            out.append(Slot(f"layers.{i}.{rest}", path, None, shape, dtype))
        elif path[0] == "mtp":
            kind = path[1]  # 'depths' or 'heads'
            if cfg.mtp_share_depths:
                out.append(Slot(f"{kind}.1.{rest}", path, None, shape, dtype))
            else:
                out += [
                    Slot(f"{kind}.{k + 1}.{rest}", path, k, shape[1:], dtype)
                    for k in range(shape[0])
                ]
        else:
            out.append(Slot(".".join(path), path, None, shape, dtype))
    return tuple(out)


def flatten(cfg: ModelConfig, params: Any) -> dict[str, np.ndarray]:
    """The model's parameters (any form `Decoder` accepts) -> {slot name: host array}."""
    from mtp_jax.model.decoding import unwrap_params

    tree = unwrap_params(params)
    out = {}
    for s in slots(cfg):
        node = tree
        for key in s.path:
            node = node[key]
        value = np.asarray(jax.device_get(node))
        out[s.name] = value if s.index is None else value[s.index]
    return out


class LayoutError(ValueError):
    """Flat parameters that do not fit the model's layout (a name missing, unknown or misshapen)."""


def unflatten(cfg: ModelConfig, values: dict[str, np.ndarray]) -> dict[str, Any]:
    """{slot name: array} (every slot exactly once, right shape) -> the params tree (numpy),
    cast to `model.param_dtype`."""
    known = {s.name: s for s in slots(cfg)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise LayoutError(f"parameters the model has no place for: {', '.join(unknown[:8])}")
    missing = [n for n in known if n not in values]
    if missing:
        raise LayoutError(f"parameters missing: {', '.join(missing[:8])}")
    stacked: dict[tuple[str, ...], dict[int, np.ndarray]] = {}
    tree: dict[str, Any] = {}
    for name, s in known.items():
        value = np.asarray(values[name])
        if value.shape != s.shape:
            raise LayoutError(
                f"parameter {name} has shape {value.shape}; the model needs {s.shape}"
            )
        value = value.astype(s.dtype)
        if s.index is None:
            _put(tree, s.path, value)
        else:
            stacked.setdefault(s.path, {})[s.index] = value
    for path, parts in stacked.items():
        _put(tree, path, np.stack([parts[i] for i in range(len(parts))]))
    return tree


def _put(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def is_mtp(name: str) -> bool:
    """Whether slot `name` belongs to an MTP depth / head (not the trunk or shared parts)."""
    return name.startswith(("depths.", "heads."))
