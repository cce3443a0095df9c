"""TrainState, the optimizer and its schedules, and initialisation straight into shardings."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from mtp_jax.config import lambda_points, mtp_lambdas
from mtp_jax.model.model import Model, mtp_param_mask
from mtp_jax.sharding import LOGICAL_RULES, logical_shardings, with_shardings
from mtp_jax.window import WindowSpec


@flax.struct.dataclass
class TrainState:
    """step: int32 []; params and opt_state: pytrees of arrays (what checkpoints hold)."""

    step: jax.Array
    params: Any
    opt_state: Any


def lr_decay_start(config: Any) -> int:
    """The step at which the learning rate starts to decay (end of warmup / stable phase)."""
    t = config.train
    if t.schedule == "wsd":
        return t.steps - int(round(t.decay_fraction * t.steps))
    if t.schedule == "cosine":
        return t.warmup_steps
    return t.steps


def lr_schedule(config: Any) -> optax.Schedule:
    """Linear warmup to train.lr, then cosine / warmup-stable-decay / constant."""
    t = config.train
    peak, floor = t.lr, t.lr * t.min_lr_ratio
    warmup = optax.linear_schedule(0.0, peak, max(t.warmup_steps, 1))
    if t.schedule == "cosine":
        rest = optax.cosine_decay_schedule(peak, max(t.steps - t.warmup_steps, 1), t.min_lr_ratio)
        return optax.join_schedules([warmup, rest], [t.warmup_steps])
    if t.schedule == "wsd":
        decay_start = lr_decay_start(config)
        stable = optax.constant_schedule(peak)
        decay = optax.linear_schedule(peak, floor, max(t.steps - decay_start, 1))
        return optax.join_schedules([warmup, stable, decay], [t.warmup_steps, decay_start])
    return optax.join_schedules([warmup, optax.constant_schedule(peak)], [t.warmup_steps])


def lambda_schedule(config: Any):
    """step -> lambdas [D]: loss.mtp_lambda(_per_depth), switched to loss.mtp_lambda_final
    at loss.mtp_lambda_switch_step (-1: when the LR starts to decay), as DeepSeek-V3 did;
    or loss.mtp_lambda_schedule's curriculum (`piecewise_lambdas`)."""
    lo = config.loss
    if lo.mtp_lambda_schedule:
        points = lambda_points(lo.mtp_lambda_schedule, config.model.mtp_depth)
        return piecewise_lambdas(points, config.train.steps)
    initial = jnp.asarray(mtp_lambdas(config), jnp.float32)
    if lo.mtp_lambda_final < 0:
        return lambda step: initial
    switch = lo.mtp_lambda_switch_step
    switch = lr_decay_start(config) if switch < 0 else switch
    final = jnp.full_like(initial, lo.mtp_lambda_final)
    return lambda step: jnp.where(step >= switch, final, initial)


def piecewise_lambdas(points: list[tuple[float, tuple[float, ...]]], steps: int):
    """step -> lambdas [D], linear between the (training fraction, lambdas) `points` (at
    step = fraction * steps), constant before the first and after the last; two points at one
    fraction jump there (the later one holds from that step on).

    modded-nanogpt's record run (D=2; its weights [1, .5, .25->0], then [1, .5->0], then [1]
    over three thirds, the 1 being the next-token loss): MTP early, next-token only at the end:
        ((0, (0.5, 0.25)), (1/3, (0.5, 0.0)), (2/3, (0.0, 0.0)))
    The opposite NTP -> MTP curriculum (BabyLM 2025: helps small models), e.g. next-token only
    for the first half, then a ramp to 0.3 over a tenth of training:
        ((0, (0.0, 0.0)), (0.5, (0.0, 0.0)), (0.6, (0.3, 0.3)))
    """
    xs = [f * steps for f, _ in points]
    ys = [jnp.asarray(w, jnp.float32) for _, w in points]

    def lambdas(step):
        step = jnp.asarray(step, jnp.float32)
        value = ys[0]
        for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:], strict=False):
            # segments in order, each from its first step on (a later one overrides)
            if x1 > x0:
                segment = y0 + jnp.clip((step - x0) / (x1 - x0), 0.0, 1.0) * (y1 - y0)
            else:  # two points at one fraction: a jump
                segment = y1
            value = jnp.where(step >= x0, segment, value)
        return jnp.where(step >= xs[-1], ys[-1], value)

    return lambdas


def _decay_mask(params: Any) -> Any:
    """Weight decay on matrices only: not on norm scales, nor on the MoE balance biases
    (`router_bias`, which only `moe.update_router_biases` moves)."""

    def decays(path, p):
        return p.ndim > 1 and not jax.tree_util.keystr(path).endswith("['router_bias']")

    return jax.tree_util.tree_map_with_path(decays, nn.unbox(params))


def trainable_mask(config: Any, params: Any) -> Any:
    """A tree of bools like the (unboxed) params: which leaves train.trainable updates."""
    params = nn.unbox(params)
    if config.train.trainable == "mtp":
        return mtp_param_mask(params)
    return jax.tree.map(lambda _: True, params)


def make_optimizer(config: Any) -> optax.GradientTransformation:
    """AdamW with the LR schedule and optional global-norm clipping.

    train.trainable='mtp': the same optimizer on the MTP depths only (the clipping norm too);
    the frozen leaves get zero updates and no optimizer state (`optax.MaskedNode`s in place of
    their moments), so the state holds nothing trunk- or vocab-sized.
    """
    t = config.train
    tx = optax.adamw(
        lr_schedule(config),
        b1=t.b1,
        b2=t.b2,
        eps=t.eps,
        weight_decay=t.weight_decay,
        mask=_decay_mask,
    )
    if t.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(t.grad_clip), tx)
    if t.trainable == "all":
        return tx

    def labels(params):
        return jax.tree.map(lambda m: "train" if m else "frozen", trainable_mask(config, params))

    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def _init_fn(model: Model, tx: optax.GradientTransformation, example: jax.Array):
    def init(key):
        params = model.init(key, example)["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    return init


def abstract_state(config: Any, model: Model, tx: optax.GradientTransformation, mesh: Mesh):
    """(abstract unboxed TrainState, its NamedShardings) without allocating anything.

    `sharding.with_shardings(*abstract_state(...))` is the sharded target that compiles and
    restores take.
    """
    example = WindowSpec.from_config(config).example_input()
    boxed = jax.eval_shape(_init_fn(model, tx, example), jax.random.key(0))
    shardings = logical_shardings(boxed, mesh, LOGICAL_RULES)
    return nn.unbox(boxed), shardings


def abstract_params(config: Any, mesh: Mesh) -> Any:
    """The model's parameters as sharded `jax.ShapeDtypeStruct`s on `mesh` (as in training),
    without an optimizer."""
    model = Model(config.model)
    example = WindowSpec.from_config(config).example_input()
    boxed = jax.eval_shape(lambda key: model.init(key, example)["params"], jax.random.key(0))
    return with_shardings(nn.unbox(boxed), logical_shardings(boxed, mesh, LOGICAL_RULES))


def init_state(config: Any, model: Model, tx: optax.GradientTransformation, shardings: Any):
    """A fresh TrainState created directly in its shardings (never whole on one host)."""
    init = _init_fn(model, tx, WindowSpec.from_config(config).example_input())
    return jax.jit(lambda key: nn.unbox(init(key)), out_shardings=shardings)(
        jax.random.key(config.seed)
    )
