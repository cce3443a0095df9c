"""Per-depth targets and masks, chunked cross-entropy, and the MTP loss.

A training window `w` holds S + D + 1 tokens. The trunk reads w[0:S]; depth k's output at
position i is scored against w[i + k + 1], so depth k's targets are w[k+1 : S+k+1] and every
depth gets S targets. With packed documents, a target in a later document than position i
is masked out.

Losses come back as sums plus token counts per depth, so means stay exact across chunks,
microbatches, depths and hosts. The logits are computed `chunk_size` positions at a time by
a fused loss with a custom VJP: each chunk's gradients are formed from its softmax right
away, so no [B, S, V] tensor per depth stays alive and no logits are recomputed.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from mtp_jax.model.layers import ModelConfig

Array = jax.Array


@flax.struct.dataclass
class DepthSums:
    """Per-depth sums over unmasked targets: loss (CE) [D+1], correct [D+1], count [D+1]."""

    loss: Array
    correct: Array
    count: Array

    def __add__(self, other: DepthSums) -> DepthSums:
        return jax.tree.map(jnp.add, self, other)


def mtp_targets(tokens: Array, segment_ids: Array | None, depth: int) -> tuple[Array, Array]:
    """tokens, segment_ids [B, S+D+1] -> targets [D+1, B, S] int32, mask [D+1, B, S] bool.

    targets[k, b, i] = tokens[b, i+k+1]; mask[k, b, i] is False when that token lies in a
    later document than position i (segment id 0 marks padding and is always masked).
    """
    seq = tokens.shape[1] - depth - 1
    if seq < 1:
        raise ValueError(f"windows of length {tokens.shape[1]} are too short for D={depth}")
    targets = jnp.stack([tokens[:, k + 1 : seq + k + 1] for k in range(depth + 1)])
    if segment_ids is None:
        return targets.astype(jnp.int32), jnp.ones(targets.shape, bool)
    here = segment_ids[:, :seq]
    mask = jnp.stack(
        [(segment_ids[:, k + 1 : seq + k + 1] == here) & (here != 0) for k in range(depth + 1)]
    )
    return targets.astype(jnp.int32), mask


def _chunk_sums(hidden: Array, head: Array, targets: Array, mask: Array):
    """hidden [D+1, B, c, E], head [E, V], targets/mask [D+1, B, c] -> sums and argmax."""
    logits = jnp.einsum("dbce,ev->dbcv", hidden, head, preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    ce = jnp.where(mask, lse - target_logit, 0.0)
    pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    correct = (pred == targets) & mask
    return ce.sum((1, 2)), correct.sum((1, 2)).astype(jnp.float32), pred


def _fused_chunk(hidden: Array, head: Array, targets: Array, mask: Array, with_grad: bool):
    """One chunk of the fused loss: hidden [D+1, B, c, E], head [E, V], targets/mask [D+1, B, c].

    Returns (loss [D+1], correct [D+1], pred [D+1, B, c]) and, with `with_grad`, the
    gradients of each depth's loss sum: d hidden [D+1, B, c, E], d head [D+1, E, V] (f32).
    The matmuls run on [D+1 * B * c, E] rows: 2-D dots (fast weight gradients on CPUs).
    """
    depths, emb, vocab = hidden.shape[0], hidden.shape[-1], head.shape[-1]
    rows = hidden.reshape(-1, emb)
    logits = jnp.dot(rows, head, preferred_element_type=jnp.float32)  # [N, V]
    t, m = targets.reshape(-1), mask.reshape(-1)
    top = jnp.max(logits, axis=-1, keepdims=True)
    lse = top + jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1, keepdims=True))
    target_logit = jnp.take_along_axis(logits, t[:, None], axis=1)[:, 0]
    ce = jnp.where(m, lse[:, 0] - target_logit, 0.0).reshape(targets.shape)
    # argmax as "first index of the max": two plain reductions, much faster on CPUs than
    # XLA's variadic (value, index) reduce, and equal to jnp.argmax for finite logits. The
    # accuracy reads "the target's logit is the max" (the same unless logits tie exactly), so
    # a train step, which does not use `pred`, never computes it.
    ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
    pred = jnp.minimum(jnp.min(jnp.where(logits == top, ids, vocab), axis=-1), vocab - 1)
    pred = pred.reshape(targets.shape)
    hit = (target_logit >= top[:, 0]).reshape(targets.shape)
    correct = (hit & mask).sum((1, 2)).astype(jnp.float32)
    out = (ce.sum((1, 2)), correct, pred)
    if not with_grad:
        return out, None
    # d(sum of CE)/d logits = softmax - onehot(target) on unmasked positions. (exp is
    # recomputed here rather than kept: one [N, V] buffer fewer.)
    probs = jnp.exp(logits - lse)
    is_target = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) == t[:, None]
    dlogits = jnp.where(m[:, None], jnp.where(is_target, probs - 1.0, probs), 0.0)
    dlogits = dlogits.astype(head.dtype)
    d_hidden = jnp.dot(dlogits, head.T, preferred_element_type=jnp.float32)
    d_head = jnp.einsum(
        "dne,dnv->dev",
        rows.reshape(depths, -1, emb),
        dlogits.reshape(depths, -1, vocab),
        preferred_element_type=jnp.float32,
    )
    return out, (d_hidden.astype(hidden.dtype).reshape(hidden.shape), d_head)


def _chunked(hidden, head, targets, mask, chunk_size, with_grad):
    """Scans `_fused_chunk` over S / chunk_size chunks; accumulates sums (and d head)."""
    seq = hidden.shape[2]
    n = seq // chunk_size

    def split(x):  # [D+1, B, S, ...] -> [n, D+1, B, c, ...]
        x = x.reshape(x.shape[:2] + (n, chunk_size) + x.shape[3:])
        return jnp.moveaxis(x, 2, 0)

    def merge(x):  # [n, D+1, B, c, ...] -> [D+1, B, S, ...]
        x = jnp.moveaxis(x, 0, 2)
        return x.reshape(x.shape[:2] + (seq,) + x.shape[4:])

    depths = hidden.shape[0]

    def step(acc, xs):
        h, t, m = xs
        (loss, correct, pred), grads = _fused_chunk(h, head, t, m, with_grad)
        if not with_grad:
            return (acc[0] + loss, acc[1] + correct), (pred,)
        return (acc[0] + loss, acc[1] + correct, acc[2] + grads[1]), (pred, grads[0])

    zeros = jnp.zeros(depths, jnp.float32)
    init = (zeros, zeros)
    if with_grad:
        init += (jnp.zeros((depths,) + head.shape, jnp.float32),)
    if n == 1:
        acc, ys = step(init, (hidden, targets, mask))
        ys = jax.tree.map(lambda y: y[None], ys)
    else:
        acc, ys = jax.lax.scan(step, init, (split(hidden), split(targets), split(mask)))
    pred = merge(ys[0])
    if not with_grad:
        return (acc[0], acc[1], pred), None
    return (acc[0], acc[1], pred), (merge(ys[1]), acc[2])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused_ce(hidden, head, targets, mask, chunk_size):
    return _chunked(hidden, head, targets, mask, chunk_size, with_grad=False)[0]


def _fused_ce_fwd(hidden, head, targets, mask, chunk_size):
    out, grads = _chunked(hidden, head, targets, mask, chunk_size, with_grad=True)
    return out, (grads, jnp.zeros((0,), head.dtype))  # an empty array carries the dtype


def _fused_ce_bwd(chunk_size, residuals, cotangents):
    (d_hidden, d_head), dtype_of_head = residuals
    g = cotangents[0]  # only the loss sums are differentiable
    d_hidden = d_hidden * g[:, None, None, None].astype(d_hidden.dtype)
    d_head = jnp.einsum("d,dev->ev", g, d_head).astype(dtype_of_head.dtype)
    return d_hidden, d_head, None, None


_fused_ce.defvjp(_fused_ce_fwd, _fused_ce_bwd)


def cross_entropy_sums(
    hidden: Array, head: Array, targets: Array, mask: Array, chunk_size: int = 0
) -> tuple[DepthSums, Array]:
    """Chunked cross-entropy of every depth.

    hidden [D+1, B, S, E], head [E, V], targets/mask [D+1, B, S]
    -> (DepthSums with [D+1] leaves, predictions [D+1, B, S] int32 argmax).

    chunk_size 0: one plain [D+1, B, S, V] logits tensor, differentiated by autodiff (the
    reference). chunk_size > 0: a fused loss that scans over chunks of positions and, when
    differentiated, computes each chunk's gradients (d hidden, d head per depth) in the
    forward pass from the chunk's softmax, so no logits outlive their chunk and none are
    recomputed; the backward pass only scales them by each depth's loss cotangent.
    """
    count = mask.sum((1, 2)).astype(jnp.float32)
    seq = hidden.shape[2]
    if not chunk_size:
        loss, correct, pred = _chunk_sums(hidden, head, targets, mask)
        return DepthSums(loss, correct, count), pred
    chunk_size = min(chunk_size, seq)
    if seq % chunk_size:
        raise ValueError(f"chunk_size {chunk_size} does not divide the sequence length {seq}")
    loss, correct, pred = _fused_ce(hidden, head, targets, mask, chunk_size)
    return DepthSums(loss, correct, count), pred


def weighted_loss(sums: DepthSums, lambdas: Array, counts: Array | None = None) -> Array:
    """L = L^0 + sum_k lambda_k L^k, L^k = loss_k / count_k.

    lambdas [D]; `counts` [D+1] overrides the denominators (the whole batch's counts when
    accumulating microbatches, so the accumulated gradient equals the full batch's).
    """
    counts = sums.count if counts is None else counts
    per_depth = sums.loss / jnp.maximum(counts, 1.0)
    weights = jnp.concatenate([jnp.ones((1,), per_depth.dtype), lambdas.astype(per_depth.dtype)])
    return jnp.sum(weights * per_depth)


def draft_agreement(pred: Array, mask: Array) -> tuple[Array, Array]:
    """How often depth k's argmax at i equals the next-token head's argmax at i + k.

    Both predict token i + k + 1, so this is the acceptance a greedy drafter would see.
    pred, mask [D+1, B, S] -> (agree [D], count [D]) sums.
    """
    depth = pred.shape[0] - 1
    agree, count = [], []
    for k in range(1, depth + 1):
        valid = mask[k, :, : pred.shape[2] - k]
        same = pred[k, :, : pred.shape[2] - k] == pred[0, :, k:]
        agree.append((same & valid).sum())
        count.append(valid.sum())
    if not depth:
        return jnp.zeros((0,), jnp.float32), jnp.zeros((0,), jnp.float32)
    return jnp.stack(agree).astype(jnp.float32), jnp.stack(count).astype(jnp.float32)


def loss_and_metrics(
    model: Any,
    params: Any,
    batch: dict[str, Array],
    lambdas: Array,
    chunk_size: int = 0,
    counts: Array | None = None,
) -> tuple[Array, tuple[DepthSums, Array, Array]]:
    """The training objective of one batch.

    batch: {'tokens': [B, S+D+1] int32, 'segment_ids': [B, S+D+1] int32 (optional)}.
    Returns (loss, (sums, predictions [D+1, B, S], mask [D+1, B, S])).
    """
    depth = ModelConfig.from_any(model.config).mtp_depth
    tokens = batch["tokens"]
    seg = batch.get("segment_ids")
    targets, mask = mtp_targets(tokens, seg, depth)
    hidden, head = model.apply(
        {"params": params},
        tokens[:, :-1],
        None if seg is None else seg[:, :-1],
        method="features_and_head",
    )
    sums, pred = cross_entropy_sums(hidden, head, targets, mask, chunk_size)
    return weighted_loss(sums, lambdas, counts), (sums, pred, mask)
