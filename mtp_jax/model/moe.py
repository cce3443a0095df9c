"""DeepSeekMoE feed-forward: sigmoid routing with auxiliary-loss-free balancing, shared experts,
dropless (sorted tokens, grouped matmuls) or capacity-limited dispatch, and expert parallelism.

For a token x_t with affinities s_{i,t} = sigmoid(x_t . r_i) to the E routed experts:
    selected = top-k of s_{i,t} + b_i          (the balance bias b: selection only; with
               `model.moe.n_group` > 1, among the experts of the token's `topk_group` best
               groups, a group scored by the sum of its top-2 s + b: `limit_groups`)
    g_{i,t}  = routed_scaling * s_{i,t} / sum_{j in selected} s_{j,t}   for i in selected
    y_t      = sum_{i in selected} g_{i,t} FFN_i(x_t) + sum_shared FFN_s(x_t)
b is a parameter the optimizer never touches (its gradient is stopped and weight decay skips
it): after each step, `update_router_biases` moves it by `gamma * sign(mean load - load)`, so
it lives in the train state and the checkpoint with the rest of the parameters.

Dispatch (`model.moe.capacity_factor`):
- 0, dropless: the T*k (token, expert) assignments are sorted by expert and the experts run as
  grouped matmuls (`jax.lax.ragged_dot`) over the sorted rows: nothing is dropped.
- > 0: each expert takes at most C = ceil(cf * T * k / E) assignments per device, in token
  order; the rest are dropped (their routed output is 0; the shared experts still run).
  At cf >= E / k nothing can be dropped and the result equals the dropless one. Capacity
  limits training and eval forwards (same memory); cached decoding steps route dropless, so
  they equal a dropless full forward token by token.

Expert parallelism: under a mesh (`jax.set_mesh`), the FFN runs in `jax.shard_map` with the
tokens split over the batch axes ('data', 'fsdp', 'expert') and expert weights over 'expert'
(E / expert experts per device; their hidden width over 'tensor', all-gathered over 'fsdp').
Tokens travel to the devices of their experts by `all_to_all` over 'expert' and back:
- capacity mode exchanges the [E, C, d] dispatch buffer (GShard);
- dropless mode exchanges, to each of the `ep` devices, a buffer of T*k rows, the most it
  could receive (XLA:CPU has no ragged all-to-all), so its exchange is ep x the rows sent.

Statistics for balancing and metrics go to the `moe_stats` collection when it is mutable
(training): `load` [E] (assignments per expert, whole batch), `dropped` [] and `assigned` []
(assignment counts) and `balance` [] (the sequence-wise balance loss summed over rows).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mtp_jax.model.config import ModelConfig

Array = jax.Array

MOE_STATS = "moe_stats"
BATCH_AXES = ("data", "fsdp", "expert")  # mesh axes that split the tokens
EXPERT_AXIS = "expert"
TENSOR_AXIS = "tensor"


class Routing(NamedTuple):
    """experts [T, k] int32 (selected ids), gates [T, k] f32, scores [T, E] f32 (affinities)."""

    experts: Array
    gates: Array
    scores: Array


class ExpertWeights(NamedTuple):
    """SwiGLU experts: gate, up [E, d, F]; down [E, F, d]."""

    gate: Array
    up: Array
    down: Array


def route(
    logits: Array,
    bias: Array,
    top_k: int,
    scaling: float,
    n_group: int = 1,
    topk_group: int = 1,
) -> Routing:
    """Sigmoid affinities; top-k by affinity + bias (inside the `topk_group` best of `n_group`
    expert groups); gates normalised over the selected.

    logits [T, E] (float32), bias [E] -> Routing. The bias decides the selection only.
    """
    scores = jax.nn.sigmoid(logits.astype(jnp.float32))
    choice = scores + bias.astype(jnp.float32)
    if n_group > 1 and topk_group < n_group:
        choice = limit_groups(choice, n_group, topk_group)
    _, experts = jax.lax.top_k(choice, top_k)
    chosen = jnp.take_along_axis(scores, experts, axis=-1)
    gates = scaling * chosen / jnp.sum(chosen, axis=-1, keepdims=True)
    return Routing(experts.astype(jnp.int32), gates, scores)


def limit_groups(choice: Array, n_group: int, topk_group: int) -> Array:
    """DeepSeek-V3's group-limited selection (`noaux_tc`, as vLLM's `grouped_topk` computes
    it): the E experts form n_group consecutive groups; a group's score is the sum of its two
    best affinity + bias values; outside the topk_group best groups, choice is -inf (HF
    transformers writes 0 there: the same selection unless kept choices fall below 0).

    choice [T, E] (affinity + bias) -> [T, E].
    """
    t, e = choice.shape
    grouped = choice.reshape(t, n_group, e // n_group)
    group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)  # [T, G]
    _, kept = jax.lax.top_k(group_scores, topk_group)  # [T, topk_group]
    keep = jnp.any(kept[..., None] == jnp.arange(n_group), axis=-2)  # [T, G]
    return jnp.where(keep[..., None], grouped, -jnp.inf).reshape(t, e)


def balance_loss(routing: Routing, rows: int, num_experts: int) -> Array:
    """DeepSeek-V3's sequence-wise balance loss, summed over rows: sum_b sum_i f_i P_i with
    f_i = E / (k S) * #(tokens of row b sending to i), P_i = mean_t s_{i,t} / sum_j s_{j,t}.

    routing of T = rows * S tokens (row-major) -> [] float32.
    """
    t, k = routing.experts.shape
    seq = t // rows
    picked = jax.nn.one_hot(routing.experts, num_experts, dtype=jnp.float32).sum(1)  # [T, E]
    f = picked.reshape(rows, seq, num_experts).sum(1) * num_experts / (k * seq)
    norm = routing.scores / jnp.sum(routing.scores, axis=-1, keepdims=True)
    p = norm.reshape(rows, seq, num_experts).mean(1)
    return jnp.sum(f * p)


def _grouped_ffn(xs: Array, group_sizes: Array, w: ExpertWeights) -> Array:
    """SwiGLU experts on rows sorted by expert: xs [N, d], group_sizes [E] -> [N, d]
    (rows past sum(group_sizes) come out 0)."""
    gate = jax.lax.ragged_dot(xs, w.gate, group_sizes)
    up = jax.lax.ragged_dot(xs, w.up, group_sizes)
    return jax.lax.ragged_dot(nn.silu(gate) * up, w.down, group_sizes)


def _batched_ffn(buf: Array, w: ExpertWeights) -> Array:
    """SwiGLU experts on per-expert buffers: buf [E, C, d] -> [E, C, d]."""
    gate = jnp.einsum("ecd,edf->ecf", buf, w.gate)
    up = jnp.einsum("ecd,edf->ecf", buf, w.up)
    return jnp.einsum("ecf,efd->ecd", nn.silu(gate) * up, w.down)


def _psum_tensor(x: Array, axes: dict[str, int]) -> Array:
    """Sums the partial expert outputs of the 'tensor' shards (hidden width split)."""
    return jax.lax.psum(x, TENSOR_AXIS) if axes.get(TENSOR_AXIS, 1) > 1 else x


def capacity(tokens: int, cfg: ModelConfig) -> int:
    """Slots per expert (per device) in capacity mode: ceil(cf * T * k / E)."""
    m = cfg.moe
    return max(1, math.ceil(m.capacity_factor * tokens * m.top_k / m.num_experts))


def _dropless(x: Array, r: Routing, w: ExpertWeights, axes: dict[str, int], e: int):
    """x [T, d] -> (routed output [T, d], dropped count 0)."""
    t, k = r.experts.shape
    flat = r.experts.reshape(-1)  # [N = T*k]
    order = jnp.argsort(flat, stable=True)
    sorted_e = flat[order]
    xs = x[order // k]  # [N, d], grouped by expert
    ep = axes.get(EXPERT_AXIS, 1)
    if ep == 1:
        out_sorted = _psum_tensor(_grouped_ffn(xs, jnp.bincount(flat, length=e), w), axes)
    else:
        out_sorted = _dropless_exchange(xs, sorted_e, w, axes, e)
    out = jnp.zeros_like(out_sorted).at[order].add(out_sorted)  # back to assignment order
    y = jnp.sum(out.reshape(t, k, -1) * r.gates[..., None].astype(out.dtype), axis=1)
    return y, jnp.zeros((), jnp.int32)


def _dropless_exchange(xs: Array, sorted_e: Array, w: ExpertWeights, axes: dict[str, int], e: int):
    """Expert-parallel dropless FFN inside shard_map: rows xs [N, d] sorted by their experts
    sorted_e [N] go to the devices holding them (all_to_all over 'expert'), run, come back."""
    n, d = xs.shape
    ep = axes[EXPERT_AXIS]
    local = e // ep
    dest = sorted_e // local  # [N], non-decreasing
    counts = jnp.bincount(dest, length=ep)
    starts = jnp.cumsum(counts) - counts
    rows = jnp.arange(n)
    idx = starts[:, None] + rows[None, :]  # [ep, N]
    valid = rows[None, :] < counts[:, None]
    safe = jnp.minimum(idx, n - 1)
    send_x = jnp.where(valid[..., None], xs[safe], 0)  # [ep, N, d]
    dest_base = jnp.arange(ep)[:, None] * local
    send_e = jnp.where(valid, sorted_e[safe] - dest_base, local)  # local id there; local = pad
    recv_x = jax.lax.all_to_all(send_x, EXPERT_AXIS, 0, 0)  # [ep (source), N, d]
    recv_e = jax.lax.all_to_all(send_e, EXPERT_AXIS, 0, 0)
    flat_e = recv_e.reshape(-1)
    order = jnp.argsort(flat_e, stable=True)
    sizes = jnp.bincount(flat_e, length=local + 1)[:local]  # padding rows sort last, unused
    out = _grouped_ffn(recv_x.reshape(ep * n, d)[order], sizes, w)
    out = _psum_tensor(out, axes)
    back = jnp.zeros_like(out).at[order].add(out).reshape(ep, n, d)
    ret = jax.lax.all_to_all(back, EXPERT_AXIS, 0, 0)  # ret[j]: results of rows sent to j
    return ret[dest, rows - starts[dest]]


def _with_capacity(x: Array, r: Routing, w: ExpertWeights, axes: dict[str, int], e: int, cap: int):
    """x [T, d] -> (routed output [T, d], dropped count): at most `cap` per expert, in token
    order."""
    t, k = r.experts.shape
    d = x.shape[-1]
    flat = r.experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=e)
    starts = jnp.cumsum(sizes) - sizes
    rank_sorted = jnp.arange(t * k) - starts[flat[order]]
    rank = jnp.zeros_like(rank_sorted).at[order].add(rank_sorted)  # [N] slot within expert
    keep = rank < cap
    slot = jnp.where(keep, flat * cap + rank, e * cap)  # e * cap: a discarded row
    token = jnp.arange(t * k) // k
    buf = jnp.zeros((e * cap + 1, d), x.dtype).at[slot].add(x[token])[:-1].reshape(e, cap, d)
    ep = axes.get(EXPERT_AXIS, 1)
    if ep == 1:
        out = _psum_tensor(_batched_ffn(buf, w), axes)
    else:
        local = e // ep
        recv = jax.lax.all_to_all(buf.reshape(ep, local, cap, d), EXPERT_AXIS, 0, 0)
        recv = recv.transpose(1, 0, 2, 3).reshape(local, ep * cap, d)  # per local expert
        out = _psum_tensor(_batched_ffn(recv, w), axes)
        out = out.reshape(local, ep, cap, d).transpose(1, 0, 2, 3)
        out = jax.lax.all_to_all(out, EXPERT_AXIS, 0, 0).reshape(e, cap, d)
    flat_out = jnp.concatenate([out.reshape(e * cap, d), jnp.zeros((1, d), out.dtype)])
    y = flat_out[slot].reshape(t, k, d)
    y = jnp.sum(y * r.gates[..., None].astype(y.dtype), axis=1)
    return y, jnp.sum(~keep).astype(jnp.int32)


def routed_experts(
    cfg: ModelConfig,
    x: Array,
    router: Array,
    bias: Array,
    w: ExpertWeights,
    axes: dict[str, int] | None = None,
    reduce_axes: tuple[str, ...] = (),
    dropless: bool = False,
) -> tuple[Array, dict[str, Array]]:
    """The routed part of the MoE FFN on local tokens. x [B, S, d] -> (y [B, S, d], stats).

    dropless: ignore `model.moe.capacity_factor` (decoding).

    axes: mesh axis name -> size inside shard_map (None: no mesh); reduce_axes: the axes the
    token-count statistics are summed over (the batch axes), so stats are whole-batch values.
    """
    axes = axes or {}
    m = cfg.moe
    b, s, d = x.shape
    flat_x = x.reshape(b * s, d)
    logits = jnp.einsum(
        "td,de->te", flat_x, router.astype(flat_x.dtype), preferred_element_type=jnp.float32
    )
    r = route(logits, bias, m.top_k, m.routed_scaling, m.n_group, m.topk_group)
    if m.capacity_factor > 0 and not dropless:
        y, dropped = _with_capacity(flat_x, r, w, axes, m.num_experts, capacity(b * s, cfg))
    else:
        y, dropped = _dropless(flat_x, r, w, axes, m.num_experts)
    stats = {
        "load": jnp.bincount(r.experts.reshape(-1), length=m.num_experts).astype(jnp.float32),
        "dropped": dropped.astype(jnp.float32),
        "assigned": jnp.asarray(b * s * m.top_k, jnp.float32),
        "balance": balance_loss(r, b, m.num_experts),
    }
    if reduce_axes:
        stats = jax.tree.map(lambda v: jax.lax.psum(v, reduce_axes), stats)
    return y.reshape(b, s, d).astype(x.dtype), stats


def _mesh_axes() -> dict[str, int]:
    """The current mesh's axis sizes ({} without a mesh, or a mesh of one device)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return {}
    return dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))


def sharded_routed_experts(
    cfg: ModelConfig, x: Array, router: Array, bias: Array, w: ExpertWeights, dropless: bool
) -> tuple[Array, dict[str, Array]]:
    """`routed_experts` over the current mesh: in `shard_map` (tokens over the batch axes,
    experts over 'expert', hidden width over 'tensor'), or directly without a mesh (or when
    the batch does not split over the batch axes, e.g. decoding one row)."""
    axes = _mesh_axes()
    batch_axes = tuple(a for a in BATCH_AXES if axes.get(a, 1) > 1)
    ways = math.prod(axes.get(a, 1) for a in batch_axes)
    if not axes or x.shape[0] % ways:
        return routed_experts(cfg, x, router, bias, w, dropless=dropless)
    expert = EXPERT_AXIS if axes.get(EXPERT_AXIS, 1) > 1 else None
    tensor = TENSOR_AXIS if axes.get(TENSOR_AXIS, 1) > 1 else None
    rows = P(batch_axes or None)
    w_spec = ExpertWeights(P(expert, None, tensor), P(expert, None, tensor), P(expert, tensor))

    def local(x, router, bias, w):
        return routed_experts(cfg, x, router, bias, w, axes, batch_axes, dropless)

    stats_spec = {"load": P(), "dropped": P(), "assigned": P(), "balance": P()}
    return jax.shard_map(
        local,
        in_specs=(rows, P(), P(), w_spec),
        out_specs=(rows, stats_spec),
        check_vma=False,
    )(x, router, bias, w)


class MoE(nn.Module):
    """DeepSeekMoE FFN: [B, S, E] -> [B, S, E] (see the module docstring).

    Parameters: router [E_model, num_experts], router_bias [num_experts] (float32, balance
    bias), wi_gate / wi_up [num_experts, E_model, expert_dim], wo [num_experts, expert_dim,
    E_model], and `shared` (one SwiGLU of width shared_experts * expert_dim: the shared
    experts side by side).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Array, decoding: bool = False) -> Array:
        """x [B, S, E] -> [B, S, E]; decoding (cached steps): dropless whatever the
        capacity factor."""
        from mtp_jax.model.layers import Mlp, _init

        cfg = self.cfg
        m = cfg.moe
        e, d, f = m.num_experts, cfg.d_model, m.expert_dim
        router = self.param("router", _init(cfg, ("embed", None)), (d, e), cfg.weight_dtype)
        bias = self.param(
            "router_bias",
            nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
            (e,),
            jnp.float32,
        )
        names_in, names_out = ("experts", "embed", "mlp"), ("experts", "mlp", "embed")
        w = ExpertWeights(
            self.param("wi_gate", _init(cfg, names_in), (e, d, f), cfg.weight_dtype),
            self.param("wi_up", _init(cfg, names_in), (e, d, f), cfg.weight_dtype),
            self.param("wo", _init(cfg, names_out), (e, f, d), cfg.weight_dtype),
        )
        w = jax.tree.map(lambda a: a.astype(cfg.compute_dtype), w)
        x = x.astype(cfg.compute_dtype)
        training = self.is_mutable_collection(MOE_STATS) and not self.is_initializing()
        y, stats = sharded_routed_experts(
            cfg, x, router, jax.lax.stop_gradient(bias), w, dropless=decoding
        )
        if training:
            for name, value in stats.items():
                self.variable(MOE_STATS, name, lambda v=value: v).value = value
        if m.shared_experts:
            y = y + Mlp(cfg, width=m.shared_experts * f, name="shared")(x)
        return y


# ------------------------------------------------------------------ balancing after a step


def _walk(params: Any, stats: Any, fn) -> Any:
    """Applies fn(bias, stats_of_its_module) to every `router_bias` leaf with stats."""
    if not isinstance(params, dict):
        return params
    out = {}
    for key, value in params.items():
        if key == "router_bias" and isinstance(stats, dict) and "load" in stats:
            out[key] = fn(value, stats)
        else:
            sub = stats.get(key) if isinstance(stats, dict) else None
            out[key] = _walk(value, sub, fn)
    return out


def _load_like(load: Array, bias: Array) -> Array:
    """load [..., E] summed over leading axes the bias lacks (a depth module shared by D)."""
    while load.ndim > bias.ndim:
        load = load.sum(0)
    return load


def update_router_biases(params: Any, stats: Any, rate: float) -> Any:
    """Auxiliary-loss-free balancing: every router_bias += rate * sign(mean load - load).

    params: the (unboxed) parameter tree; stats: the `moe_stats` collection of the step's
    forward (same module paths; leaves stacked like the parameters over layers / depths).
    """
    if not rate:
        return params

    def step(bias, s):
        load = _load_like(s["load"], bias)
        target = jnp.mean(load, axis=-1, keepdims=True)
        return bias + rate * jnp.sign(target - load).astype(bias.dtype)

    return _walk(params, stats, step)


def routing_metrics(params: Any, stats: Any, cfg: ModelConfig) -> dict[str, Array]:
    """Per MoE layer, scalars named moe/layer_<i>/... (trunk layer i, 0-based) and
    moe/depth_<k>/... (MTP depth k): load_max and load_min (expert load relative to uniform),
    dropped (fraction of assignments dropped) and bias_norm (L2 norm of the balance bias)."""
    out: dict[str, Array] = {}

    def names(path: tuple[str, ...], n: int) -> list[str]:
        if path[0] == "mtp":
            return [f"depth_{k + 1}" for k in range(n)]
        if path[-1].startswith("layers_"):  # unscanned trunk layer
            return [f"layer_{path[-1].split('_')[1]}"]
        return [f"layer_{cfg.moe.first_dense_layers + i}" for i in range(n)]

    def visit(p, s, path):
        if not isinstance(p, dict):
            return
        for key, value in p.items():
            sub = s.get(key) if isinstance(s, dict) else None
            if key == "router_bias" and isinstance(s, dict) and "load" in s:
                load = s["load"].reshape(-1, s["load"].shape[-1])  # [L, E]
                rel = load / jnp.maximum(jnp.mean(load, axis=-1, keepdims=True), 1e-9)
                bias = value.astype(jnp.float32).reshape(-1, value.shape[-1])
                values = {
                    "load_max": jnp.max(rel, axis=-1),
                    "load_min": jnp.min(rel, axis=-1),
                    "dropped": (s["dropped"] / jnp.maximum(s["assigned"], 1.0)).reshape(-1),
                    "bias_norm": jnp.broadcast_to(jnp.sqrt(jnp.sum(bias**2, -1)), (load.shape[0],)),
                }
                module = tuple(part for part in path if part not in ("block", "mlp"))
                for i, name in enumerate(names(module, load.shape[0])):
                    for metric, v in values.items():
                        out[f"moe/{name}/{metric}"] = v[i]
            else:
                visit(value, sub, (*path, key))

    visit(params, stats, ())
    return out


def balance_loss_sum(stats: Any) -> Array:
    """Sum over every MoE layer of the sequence-wise balance loss (summed over rows)."""
    total = jnp.zeros((), jnp.float32)
    for path, leaf in jax.tree_util.tree_leaves_with_path(stats):
        if jax.tree_util.keystr(path).endswith("['balance']"):
            total = total + jnp.sum(leaf)
    return total
