"""TPU attention: the Pallas splash-attention kernel that ships with jax, for training forwards.

`splash_attention(q, k, v, segment_ids)` computes causal attention within documents, the same
function as `Attention`'s XLA path, with `jax.experimental.pallas.ops.tpu.splash_attention`:
blockwise, never materialising the [B, N, S, S] scores, skipping fully masked blocks. Pallas
kernels are custom calls that XLA's SPMD partitioner cannot split, so under a mesh the kernel
runs inside `jax.shard_map`, batch over the mesh axes of the logical `batch` axis and heads
over those of `heads` (from the active `nn.logical_axis_rules`). Grouped-query attention
repeats each key/value head for its query heads. Off TPUs (tests on a CPU) the kernel runs in
Pallas' interpret mode: slow, but the same arithmetic.

XLA's `cost_analysis()` does not count the FLOPs inside the kernel: plans take FLOPs from
`model_flops` where the compiled count misses them.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mtp_jax import xla_cpu

Array = jax.Array

BLOCK = 512  # largest q / kv block; the sequence length must be a multiple of MIN_BLOCK
MIN_BLOCK = 128


def supports(seq_len: int) -> bool:
    """Whether the kernel takes sequences of `seq_len` positions."""
    return seq_len % MIN_BLOCK == 0


def _kernel(heads: int, seq_len: int, interpret: bool):
    """A new kernel per trace: its mask tables are arrays, which a cache would leak across
    traces."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    block = math.gcd(seq_len, BLOCK)
    sizes = sa.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    mask = sa.MultiHeadMask([sa.CausalMask((seq_len, seq_len)) for _ in range(heads)])
    return sa.make_splash_mha(
        mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
    )


def _local(q: Array, k: Array, v: Array, segment_ids: Array | None) -> Array:
    """q, k [b, N, T, H], v [b, N, T, Hv] (heads already repeated), segment_ids [b, T]."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    kernel = _kernel(q.shape[1], q.shape[2], xla_cpu.compile_platform() != "tpu")
    if segment_ids is None:
        return jax.vmap(kernel)(q, k, v)
    seg = jax.vmap(lambda s: sa.SegmentIds(q=s, kv=s))(segment_ids)
    return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=s))(q, k, v, seg)


def _mesh_axes(name: str, size: int, mesh) -> str | tuple[str, ...] | None:
    """The mesh axes the logical axis `name` maps to, if they divide `size`; else None."""
    axes = nn.logical_to_mesh_axes((name,))[0]
    if axes is None:
        return None
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    names = tuple(a for a in names if a in mesh.shape)
    total = math.prod(mesh.shape[a] for a in names)
    return names if names and size % total == 0 else None


def splash_attention(
    q: Array, k: Array, v: Array, segment_ids: Array | None, scale: float | None = None
) -> Array:
    """Causal attention within documents. q, k [B, T, N|K, H], v [B, T, K, Hv] (MLA: Hv < H),
    segment_ids [B, T] or None -> [B, T, N, Hv]. Scores are scaled by `scale` (default
    1/sqrt(H)). T must be a multiple of 128 (`supports`)."""
    batch, seq, heads, width = q.shape
    if not supports(seq):
        raise ValueError(f"splash attention needs a multiple of {MIN_BLOCK} positions, got {seq}")
    scale = width**-0.5 if scale is None else scale
    q = jnp.swapaxes(q * scale, 1, 2)  # the kernel does not scale
    k, v = (jnp.repeat(jnp.swapaxes(x, 1, 2), heads // x.shape[2], axis=1) for x in (k, v))
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        out = _local(q, k, v, segment_ids)
    else:
        b_axes, h_axes = _mesh_axes("batch", batch, mesh), _mesh_axes("heads", heads, mesh)
        spec = P(b_axes, h_axes, None, None)
        seg_spec = P(b_axes, None)
        if segment_ids is None:
            fn = lambda q, k, v: _local(q, k, v, None)  # noqa: E731
            args, specs = (q, k, v), (spec, spec, spec)
        else:
            fn, args, specs = _local, (q, k, v, segment_ids), (spec, spec, spec, seg_spec)
        out = jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=spec, check_vma=False)(*args)
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)
