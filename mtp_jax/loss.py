"""Per-depth targets and masks, chunked cross-entropy, and the MTP loss.

A training window `w` holds S + D + 1 tokens. The trunk reads w[0:S]; depth k's output at
position i is scored against w[i + k + 1], so depth k's targets are w[k+1 : S+k+1] and every
depth gets S targets. With packed documents, a target in a later document than position i
is masked out.

Losses come back as sums plus token counts per depth, so means stay exact across chunks,
microbatches, depths and hosts. The logits are computed `chunk_size` positions at a time
under `jax.checkpoint`: the backward pass recomputes each chunk's [D+1, B, c, V] logits
instead of keeping a [B, S, V] tensor per depth alive.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from mtp_jax.model.layers import ModelConfig

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """chunk_size: positions per logits chunk (0 = one full [D+1, B, S, V] tensor)."""

    chunk_size: int = 0


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


def cross_entropy_sums(
    hidden: Array, head: Array, targets: Array, mask: Array, chunk_size: int = 0
) -> tuple[DepthSums, Array]:
    """Chunked cross-entropy of every depth.

    hidden [D+1, B, S, E], head [E, V], targets/mask [D+1, B, S]
    -> (DepthSums with [D+1] leaves, predictions [D+1, B, S] int32 argmax).
    """
    count = mask.sum((1, 2)).astype(jnp.float32)
    seq = hidden.shape[2]
    if not chunk_size or chunk_size >= seq:
        loss, correct, pred = _chunk_sums(hidden, head, targets, mask)
        return DepthSums(loss, correct, count), pred
    if seq % chunk_size:
        raise ValueError(f"chunk_size {chunk_size} does not divide the sequence length {seq}")
    n = seq // chunk_size

    def split(x):  # [D+1, B, S, ...] -> [n, D+1, B, c, ...]
        x = x.reshape(x.shape[:2] + (n, chunk_size) + x.shape[3:])
        return jnp.moveaxis(x, 2, 0)

    body = jax.checkpoint(
        lambda h, t, m: _chunk_sums(h, head, t, m),
        policy=jax.checkpoint_policies.nothing_saveable,
    )

    def step(acc, xs):
        loss, correct, pred = body(*xs)
        return (acc[0] + loss, acc[1] + correct), pred

    zeros = jnp.zeros(hidden.shape[0], jnp.float32)
    (loss, correct), preds = jax.lax.scan(
        step, (zeros, zeros), (split(hidden), split(targets), split(mask))
    )
    pred = jnp.moveaxis(preds, 0, 2).reshape(targets.shape)
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
