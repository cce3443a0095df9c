"""The pure train and eval steps, and their compilation with shardings.

Metrics come back as sums and token counts per depth, so logged means are exact across
microbatches, devices and hosts.
"""

from __future__ import annotations

import contextlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from mtp_jax.loss import (
    DepthSums,
    accept_length,
    accept_walk,
    depth_weights,
    draft_agreement,
    mtp_loss,
    mtp_targets,
    objective_mask,
)
from mtp_jax.model.config import ModelConfig
from mtp_jax.model.model import Model
from mtp_jax.model.moe import MOE_STATS, balance_loss_sum, routing_metrics, update_router_biases
from mtp_jax.sharding import LOGICAL_RULES, batch_sharding, replicated, with_shardings
from mtp_jax.train.state import TrainState, lambda_schedule, lr_schedule, trainable_mask
from mtp_jax.window import WindowSpec

Batch = dict[str, jax.Array]


def _split_microbatches(tree: Any, n: int, axis: int = 0) -> Any:
    """[..., B, ...] (batch on `axis`) -> [n, ..., B/n, ...]: microbatch m holds rows m, m+n,
    ... of every data shard."""

    def split(x):
        x = jnp.moveaxis(x, axis, 0)
        x = x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1)
        return jnp.moveaxis(x, 1, axis + 1)

    return jax.tree.map(split, tree)


def loss_and_metrics(
    model: Model,
    params: Any,
    batch: Batch,
    lambdas: jax.Array,
    chunk_size: int = 0,
    targets: tuple[jax.Array, jax.Array] | None = None,
    counts: jax.Array | None = None,
    with_pred: bool = True,
    objective: str = "ce",
    mixing_rng: jax.Array | None = None,
    detach_trunk: bool = False,
    router_stats: bool = False,
    balance_rows: int | None = None,
) -> tuple[jax.Array, tuple]:
    """The training objective of one batch: the model's features and head, then the loss.

    batch: {'tokens': [B, S+D+1] int32, 'segment_ids': [B, S+D+1] int32 (optional)};
    targets: (targets, mask) [D+1, B, S] from `mtp_targets` when the caller has them already;
    counts [D+1] overrides the loss denominators (the whole batch's `objective_mask` counts,
    for microbatches); objective: the depths' loss (`loss.mtp_objective`, see `mtp_loss`);
    mixing_rng, detach_trunk: training options of the model's forward (`Model.features`).
    router_stats (MoE models): also return the forward's `moe_stats` collection, and add
    `model.moe.balance_loss_weight` x the sequence-wise balance loss summed over layers and
    divided by `balance_rows` (the whole batch's rows; default: this batch's).
    Returns (loss, (sums, predictions [D+1, B, S] (None without `with_pred`), mask)), with
    the stats as a fourth element of the tuple when `router_stats`.
    """
    tokens, seg = batch["tokens"], batch.get("segment_ids")
    if targets is None:
        targets = mtp_targets(tokens, seg, ModelConfig.from_any(model.config).mtp_depth)
    target, mask = targets
    args = (tokens[:, :-1], None if seg is None else seg[:, :-1], mixing_rng, detach_trunk)
    if router_stats:
        (hidden, head), variables = model.apply(
            {"params": params}, *args, method="features_and_head", mutable=[MOE_STATS]
        )
        stats = variables[MOE_STATS]
    else:
        hidden, head = model.apply({"params": params}, *args, method="features_and_head")
    if counts is None:
        counts = objective_mask(mask, objective).sum((1, 2)).astype(jnp.float32)
    weights = depth_weights(lambdas, counts)
    loss, sums, pred = mtp_loss(
        hidden, head, target, mask, weights, objective, chunk_size, with_pred
    )
    if not router_stats:
        return loss, (sums, pred, mask)
    alpha = ModelConfig.from_any(model.config).moe.balance_loss_weight
    if alpha:
        loss = loss + alpha * balance_loss_sum(stats) / (balance_rows or tokens.shape[0])
    return loss, (sums, pred, mask, stats)


def make_train_step(config: Any, model: Model, tx: optax.GradientTransformation):
    """train_step(state, batch) -> (state, metrics); pure, to be jitted.

    batch: {'tokens': [B, S+D+1] int32, 'segment_ids': [B, S+D+1] int32}.
    metrics: loss, loss_sum/correct/count [D+1], grad/param/update norms, lr, lambdas [D]
    (and objective_sum/objective_count [D+1] with loss.mtp_objective distill or tv),
    nonfinite (1 when the loss or the gradient norm is NaN or infinite). With
    train.on_nonfinite='skip' such a step leaves params and optimizer state as they were.

    train.trainable='mtp': the frozen parameters enter the loss through `stop_gradient` (no
    backward pass through the trunk) and come out of the step unchanged, bit for bit.

    model.mtp_hidden_mixing > 0: the mixing key is fold_in(key(seed), step) (split per
    microbatch), a function of the step alone, so a resumed run draws the same mixing.
    loss.mtp_detach_trunk: the depths' loss reaches neither the trunk nor the embeddings
    the depths read (`Model.features`).
    """
    depth = config.model.mtp_depth
    chunk = config.loss.chunk_size
    objective = config.loss.mtp_objective
    frozen = config.train.trainable != "all"
    n_micro = config.train.microbatches
    skip_nonfinite = config.train.on_nonfinite == "skip"
    mixing = config.model.mtp_hidden_mixing > 0
    detach_trunk = config.loss.mtp_detach_trunk
    lambdas_at = lambda_schedule(config)
    lr_at = lr_schedule(config)
    model_cfg = ModelConfig.from_any(config.model)
    moe = model_cfg.moe.enabled
    bias_rate = config.model.moe.bias_update_rate

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        lambdas = lambdas_at(state.step)
        # Targets and masks once per step. Whole-batch token counts per depth: every
        # microbatch divides by these, so the accumulated gradient is exactly the full batch's.
        targets = mtp_targets(batch["tokens"], batch.get("segment_ids"), depth)
        counts = objective_mask(targets[1], objective).sum((1, 2)).astype(jnp.float32)
        mask = trainable_mask(config, state.params) if frozen else None
        rng = jax.random.fold_in(jax.random.key(config.seed), state.step) if mixing else None

        def grad_of(micro):
            micro_batch, micro_targets, micro_rng = micro

            def loss_fn(params):
                if frozen:
                    params = jax.tree.map(
                        lambda p, m: p if m else jax.lax.stop_gradient(p), params, mask
                    )
                return loss_and_metrics(
                    model,
                    params,
                    micro_batch,
                    lambdas,
                    chunk,
                    micro_targets,
                    counts,
                    with_pred=False,
                    objective=objective,
                    mixing_rng=micro_rng,
                    detach_trunk=detach_trunk,
                    router_stats=moe,
                    balance_rows=config.data.batch_size,
                )

            if "poison" in micro_batch:  # train.nan_batches: a fault drill
                plain_loss_fn = loss_fn

                def loss_fn(params):
                    loss, aux = plain_loss_fn(params)
                    return loss * jnp.max(micro_batch["poison"]), aux

            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
            return loss, (aux[0], aux[3] if moe else None), grads

        if n_micro == 1:
            loss, (sums, stats), grads = grad_of((batch, targets, rng))
        else:

            def accumulate(carry, micro):
                return jax.tree.map(jnp.add, carry, grad_of(micro)), None

            # batch rows on axis 0, targets / masks [D+1, B, S] on axis 1
            micro = (
                _split_microbatches(batch, n_micro),
                _split_microbatches(targets, n_micro, 1),
                None if rng is None else jax.random.split(rng, n_micro),
            )
            first = grad_of(jax.tree.map(lambda x: x[0], micro))
            rest = jax.tree.map(lambda x: x[1:], micro)
            (loss, (sums, stats), grads), _ = jax.lax.scan(accumulate, first, rest)

        new_state, norms = apply_gradients(tx, state, grads)
        if moe:  # auxiliary-loss-free balancing: the bias follows the step's expert loads
            new_state = new_state.replace(
                params=update_router_biases(new_state.params, stats, bias_rate)
            )
        finite = jnp.isfinite(loss) & jnp.isfinite(norms["grad_norm"])
        if skip_nonfinite:  # train.on_nonfinite='skip': a bad batch changes nothing but step
            new_state = jax.tree.map(
                lambda new, old: jnp.where(finite, new, old),
                new_state,
                state.replace(step=state.step + 1),
            )
        if frozen:  # exactly the old values (not p + 0, which would turn -0.0 into 0.0)
            params = jax.tree.map(
                lambda new, old, m: new if m else old, new_state.params, state.params, mask
            )
            new_state = new_state.replace(params=params)
        metrics = {
            "loss": loss,
            "loss_sum": sums.loss,
            "correct": sums.correct,
            "count": sums.count,
            **norms,
            "lr": lr_at(state.step),
            "lambdas": lambdas,
            "nonfinite": (~finite).astype(jnp.int32),
            **objective_metrics(sums),
        }
        if moe:
            metrics["moe"] = routing_metrics(new_state.params, stats, model_cfg)
        return new_state, metrics

    return train_step


def apply_gradients(
    tx: optax.GradientTransformation, state: TrainState, grads: Any
) -> tuple[TrainState, dict[str, jax.Array]]:
    """The optimizer step: (state with updated params, opt_state and step + 1, norms).

    norms: grad_norm, update_norm and param_norm (global L2 norms, of the new params).
    """
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    norms = {
        "grad_norm": optax.tree.norm(grads),
        "update_norm": optax.tree.norm(updates),
        "param_norm": optax.tree.norm(params),
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), norms


def make_eval_step(config: Any, model: Model):
    """eval_step(params, batch) -> sums per depth, draft agreement with depth 0 and, with MTP
    depths, the simulated greedy acceptance length from the same predictions (no extra
    forward pass): `accept_sum` / `accept_count`, the accepted length averaged over every
    position (`loss.accept_length`), and `accept_walk_sum` / `accept_walk_count`, tokens per
    verify step of a greedy decode replayed on the batch (`loss.accept_walk`).

    With `train.microbatches` = n > 1 the batch is evaluated in n slices of rows, as training
    splits it (so evaluation needs no more activation memory than a training step), and the
    sums are added up; a batch whose rows n does not divide is evaluated whole."""
    depth = config.model.mtp_depth
    chunk = config.loss.chunk_size
    objective = config.loss.mtp_objective
    n_micro = config.train.microbatches

    def sums_of(params: Any, batch: Batch) -> dict[str, jax.Array]:
        lambdas = jnp.zeros((depth,), jnp.float32)
        _, (sums, pred, mask) = loss_and_metrics(
            model, params, batch, lambdas, chunk, objective=objective
        )
        agree, agree_count = draft_agreement(pred, mask)
        accept = {}
        if depth:
            accept = dict(zip(("accept_sum", "accept_count"), accept_length(pred, mask)))
            accept.update(zip(("accept_walk_sum", "accept_walk_count"), accept_walk(pred, mask)))
        return {
            "loss_sum": sums.loss,
            "correct": sums.correct,
            "count": sums.count,
            "agree": agree,
            "agree_count": agree_count,
            **accept,
            **objective_metrics(sums),
        }

    def eval_step(params: Any, batch: Batch) -> dict[str, jax.Array]:
        rows = {k: batch[k] for k in ("tokens", "segment_ids") if k in batch}
        if n_micro == 1 or rows["tokens"].shape[0] % n_micro:
            return sums_of(params, rows)
        micro = _split_microbatches(rows, n_micro)

        def add(total, one):
            return jax.tree.map(jnp.add, total, sums_of(params, one)), None

        first = sums_of(params, jax.tree.map(lambda x: x[0], micro))
        total, _ = jax.lax.scan(add, first, jax.tree.map(lambda x: x[1:], micro))
        return total

    return eval_step


@contextlib.contextmanager
def mesh_context(mesh: Mesh):
    """The mesh and logical rules that activation constraints resolve against."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        yield


def compile_steps(config: Any, model: Model, tx, mesh: Mesh, state_shardings: Any, abstract):
    """Jits and AOT-compiles train_step and eval_step with shardings and donation.

    Returns (train_step, eval_step) compiled executables.
    """
    batch_abstract = WindowSpec.from_config(config).abstract_batch(batch_sharding(mesh))
    train_batch = dict(batch_abstract)
    if config.train.nan_batches:  # the drill's per-example loss factor (1 or NaN)
        poison = jax.ShapeDtypeStruct(
            (config.data.batch_size,), jnp.float32, sharding=batch_sharding(mesh)
        )
        train_batch["poison"] = poison
    state_abstract = with_shardings(abstract, state_shardings)
    repl = replicated(mesh)
    bsh = {k: batch_sharding(mesh) for k in batch_abstract}
    train = jax.jit(
        make_train_step(config, model, tx),
        in_shardings=(state_shardings, {k: batch_sharding(mesh) for k in train_batch}),
        out_shardings=(state_shardings, repl),
        donate_argnums=0,
    )
    evaluate = jax.jit(
        make_eval_step(config, model),
        in_shardings=(state_shardings.params, bsh),
        out_shardings=repl,
    )
    with mesh_context(mesh):
        train_c = train.lower(state_abstract, train_batch).compile()
        eval_c = evaluate.lower(state_abstract.params, batch_abstract).compile()
    return train_c, eval_c


def objective_metrics(sums: DepthSums) -> dict[str, jax.Array]:
    """objective_sum / objective_count [D+1] of a drafter objective; {} for 'ce'."""
    if sums.objective is None:
        return {}
    return {"objective_sum": sums.objective, "objective_count": sums.objective_count}


def depth_sums(metrics: dict[str, Any]) -> DepthSums:
    return DepthSums(metrics["loss_sum"], metrics["correct"], metrics["count"])
