"""Device mesh, logical axis rules and the shardings they give.

The model names every parameter and block-boundary activation with logical axes
(`batch`, `length`, `embed`, `heads`, `kv_heads`, `kv`, `q_lora`, `kv_lora`, `mlp`, `vocab`,
`norm`, `layers`, `depth`, `act_embed`, `act_mlp`, `experts`); `LOGICAL_RULES` is the only
mapping from those names to the mesh axes `('data', 'fsdp', 'expert', 'tensor')`.

'expert' is expert parallelism: MoE expert weights are split over it (E / expert per device)
and, like 'data' and 'fsdp', it splits the batch; tokens reach their experts' devices by
all-to-all inside the MoE layer (`mtp_jax.model.moe`). Dense weights are replicated over it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mtp_jax.config import ConfigError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")  # the axes that split the batch

# logical name -> mesh axes (None = replicated). Weights are sharded over fsdp (ZeRO-3) on
# their model dimension and over tensor on heads / mlp / vocab; activations over the batch.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("q_lora", None),
    ("kv_lora", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),
    ("depth", None),
    ("experts", "expert"),
)


def mesh_shape(mesh_cfg: Any, num_devices: int) -> tuple[int, ...]:
    """(data, fsdp, expert, tensor) sizes from `config.mesh` (a missing axis is 1), resolving
    one -1 to the devices left."""
    sizes = {axis: int(getattr(mesh_cfg, axis, 1)) for axis in MESH_AXES}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    free = [axis for axis, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ConfigError(f"config keys {', '.join('mesh.' + a for a in free)}: at most one -1")
    if num_devices % fixed:
        key = next((f"mesh.{a}" for a, v in sizes.items() if v not in (-1, 1)), "mesh.data")
        raise ConfigError(
            f"config key {key!r}: mesh {dict(sizes)} needs a multiple of {fixed} devices, "
            f"but {num_devices} are available"
        )
    if free:
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(
            f"config key 'mesh.data': mesh {sizes} uses {fixed} devices, but {num_devices} are "
            "available; set one of mesh.data/fsdp/tensor to -1"
        )
    return tuple(sizes[axis] for axis in MESH_AXES)


def make_mesh(
    mesh_cfg: Any, devices: Sequence[jax.Device] | None = None, allow_subset: bool = False
) -> Mesh:
    """A ('data', 'fsdp', 'expert', 'tensor') mesh over `devices` (default: all), in
    `jax.devices()` order.

    With `allow_subset` (decoding), a mesh without -1 may use the first devices only, e.g.
    `mesh.data=1` on a machine of 8. Axis types are Auto so that flax's logical constraints
    work.
    """
    devices = list(jax.devices() if devices is None else devices)
    if allow_subset:
        sizes = [int(getattr(mesh_cfg, axis, 1)) for axis in MESH_AXES]
        if -1 not in sizes and math.prod(sizes) < len(devices):
            devices = devices[: math.prod(sizes)]
    shape = mesh_shape(mesh_cfg, len(devices))
    return Mesh(
        np.asarray(devices).reshape(shape),
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
    )


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split (the 'data', 'fsdp' and 'expert' axes)."""
    return math.prod(mesh.shape.get(a, 1) for a in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of batch arrays [B, ...]: rows over ('data', 'fsdp', 'expert')."""
    return NamedSharding(mesh, PartitionSpec(tuple(a for a in BATCH_AXES if a in mesh.shape)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _fit_spec(
    spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh, where: str, dropped: list[str]
) -> PartitionSpec:
    """Drops mesh axes that do not divide their dimension (that dimension is replicated)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        if axes is None:
            fitted.append(None)
            continue
        names = (axes,) if isinstance(axes, str) else tuple(axes)
        size = math.prod(mesh.shape[a] for a in names)
        if dim % size:
            dropped.append(f"{where} dim {dim} over {'x'.join(names)}")
            fitted.append(None)
        else:
            fitted.append(axes)
    return PartitionSpec(*fitted)


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
    """NamedShardings for a tree of (boxed) abstract arrays with logical axis metadata.

    Unboxed leaves without metadata (step counters, optimizer counts) are replicated.
    """
    specs = nn.get_partition_spec(abstract_tree)
    mesh_specs = nn.logical_to_mesh(specs, rules)
    shapes = nn.unbox(abstract_tree)

    dropped: list[str] = []

    def to_sharding(path, spec, leaf):
        spec = spec if isinstance(spec, PartitionSpec) else PartitionSpec()
        where = jax.tree_util.keystr(path)
        return NamedSharding(mesh, _fit_spec(spec, leaf.shape, mesh, where, dropped))

    shardings = jax.tree_util.tree_map_with_path(
        to_sharding, mesh_specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )
    if dropped:
        log.warning(
            "%d array dimensions do not divide their mesh axes and are replicated instead, e.g. %s",
            len(dropped),
            "; ".join(dropped[:3]),
        )
    return shardings


def replicated_fraction(abstract_tree: Any, shardings: Any) -> float:
    """Fraction of parameter bytes that every device holds whole (fully replicated)."""
    total = replicated_bytes = 0
    for leaf, sharding in zip(
        jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings), strict=True
    ):
        nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        total += nbytes
        if sharding.is_fully_replicated:
            replicated_bytes += nbytes
    return replicated_bytes / max(total, 1)


def check_sharded_enough(abstract_params: Any, shardings: Any, mesh: Mesh, limit: float) -> float:
    """The fraction of parameter bytes every device holds whole; raises ConfigError when it
    exceeds `limit` (`mesh.max_replicated_fraction`) on a mesh with fsdp x tensor > 1."""
    frac = replicated_fraction(abstract_params, shardings)
    model_parallel = mesh.shape["fsdp"] * mesh.shape["tensor"]
    if model_parallel > 1 and frac > limit:
        raise ConfigError(
            f"config key 'mesh.max_replicated_fraction' has value {limit}, but "
            f"{100 * frac:.1f}% of parameter bytes are replicated on every device of a mesh with "
            f"fsdp x tensor = {model_parallel}: check that model dimensions divide the mesh "
            "axes (see the warning above), or raise the limit"
        )
    return frac


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """A tree of abstract arrays -> `jax.ShapeDtypeStruct`s that carry `shardings` (what
    `jit(...).lower`, Orbax restores and AOT compiles take)."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
