"""Per-depth targets and masks, chunked cross-entropy, and the MTP loss.

The loss takes hidden states and the head matrix (`Model.features_and_head`) and runs no
model: the train step runs the model, then `weighted_cross_entropy`.

A training window `w` holds S + D + 1 tokens. The trunk reads w[0:S]; depth k's output at
position i is scored against w[i + k + 1], so depth k's targets are w[k+1 : S+k+1] and every
depth gets S targets. With packed documents, a target in a later document than position i
is masked out.

Losses come back as sums plus token counts per depth, so means stay exact across chunks,
microbatches, depths and hosts. The logits are computed `chunk_size` positions at a time by
a fused loss with a custom VJP, one depth at a time: each chunk's gradients are formed from
its softmax right away, so no [B, S, V] tensor per depth stays alive, no logits are
recomputed, and an extra depth adds no logits buffer (the training loss also shares one
head-gradient accumulator across depths). `mtp_loss` also offers drafter objectives for the
depths (`loss.mtp_objective` distill / tv: scored against the trunk's own distribution),
chunked in the same way (see "drafter objectives" below).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from mtp_jax import xla_cpu
from mtp_jax.config import OBJECTIVES
from mtp_jax.window import WindowSpec

Array = jax.Array


@flax.struct.dataclass
class DepthSums:
    """Per-depth sums over unmasked targets: loss (CE) [D+1], correct [D+1], count [D+1].

    With a drafter objective other than 'ce' (`mtp_loss`), also the objective's sums
    `objective` [D+1] over its `objective_count` [D+1] positions (depth 0: the trunk's CE).
    """

    loss: Array
    correct: Array
    count: Array
    objective: Array | None = None
    objective_count: Array | None = None

    def __add__(self, other: DepthSums) -> DepthSums:
        return jax.tree.map(jnp.add, self, other)


def mtp_targets(tokens: Array, segment_ids: Array | None, depth: int) -> tuple[Array, Array]:
    """tokens, segment_ids [B, S+D+1] -> targets [D+1, B, S] int32, mask [D+1, B, S] bool.

    targets[k, b, i] = tokens[b, i+k+1]; mask[k, b, i] is False when that token lies in a
    later document than position i (segment id 0 marks padding and is always masked).
    """
    seq = WindowSpec.of_window(tokens.shape[1], depth).seq_len
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


def _constrain(x: Array) -> Array:
    """Pins a depth's [B, c, E] slice (and its gradient) to the activation sharding.

    Without it, XLA's SPMD partitioner (jax 0.10.2) mis-partitions the depth scan nested
    around the chunk scan on a (2, 2, 2) mesh: loss values stay right but every gradient
    through the model is wrong (tests/test_train.py's 8-vs-1-device test catches it).
    """
    return nn.with_logical_constraint(x, ("batch", "length", "act_embed"))


def _fused_chunk(
    hidden: Array,
    head: Array,
    targets: Array,
    mask: Array,
    weight: Array,
    with_grad: bool,
    with_pred: bool,
):
    """One chunk of one depth: hidden [B, c, E], head [E, V], targets/mask [B, c], weight [].

    Returns (loss sum [], correct [], pred [B, c] (None without `with_pred`)) and, with
    `with_grad`, the gradients of weight * loss sum: d hidden [B, c, E], d head [E, V] (f32).
    The matmuls run on [B * c, E] rows: 2-D dots (fast weight gradients on CPUs).
    """
    vocab = head.shape[-1]
    rows = hidden.reshape(-1, hidden.shape[-1])
    logits = jnp.dot(rows, head, preferred_element_type=jnp.float32)  # [N, V]
    t, m = targets.reshape(-1), mask.reshape(-1)
    top = jnp.max(logits, axis=-1, keepdims=True)
    lse = top + jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1, keepdims=True))
    target_logit = jnp.take_along_axis(logits, t[:, None], axis=1)[:, 0]
    ce = jnp.where(m, lse[:, 0] - target_logit, 0.0)
    # The accuracy reads "the target's logit is the max" (the same as argmax == target unless
    # logits tie exactly), so a train step needs no argmax: on CPUs that pass over [N, V]
    # costs more than the logits matmul, so it only runs `with_pred` (eval, drafting stats).
    # argmax as "first index of the max": two plain reductions, faster on CPUs than XLA's
    # variadic (value, index) reduce, and equal to jnp.argmax for finite logits.
    ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
    pred = None
    if with_pred:
        pred = jnp.minimum(jnp.min(jnp.where(logits == top, ids, vocab), axis=-1), vocab - 1)
        pred = pred.reshape(targets.shape)
    correct = ((target_logit >= top[:, 0]) & m).sum().astype(jnp.float32)
    out = (ce.sum(), correct, pred)
    if not with_grad:
        return out, None
    # d(sum of CE)/d logits = softmax - onehot(target) on unmasked positions. (exp is
    # recomputed here rather than kept: one [N, V] buffer fewer.)
    probs = jnp.exp(logits - lse)
    dlogits = jnp.where(m[:, None], jnp.where(ids == t[:, None], probs - 1.0, probs), 0.0)
    dlogits = (dlogits * weight).astype(head.dtype)
    d_hidden = jnp.dot(dlogits, head.T, preferred_element_type=jnp.float32)
    d_head = xla_cpu.weight_grad(rows, dlogits)
    return out, (_constrain(d_hidden.astype(hidden.dtype).reshape(hidden.shape)), d_head)


def _chunked(hidden, head, targets, mask, chunk_size, weights, with_grad, with_pred=True):
    """`_fused_chunk` depth by depth (a scan) and, within a depth, chunk by chunk (a scan), so
    only one depth's chunk of logits is alive at a time, whatever D is.

    hidden [D+1, B, S, E], targets/mask [D+1, B, S], weights [D+1] -> (loss [D+1],
    correct [D+1], pred [D+1, B, S] or None) and, with `with_grad`, the gradients of
    sum_k weights[k] * loss_k formed from each chunk's softmax: d hidden [D+1, B, S, E] and
    one d head [E, V] f32 accumulated over all depths (no per-depth copies of the head).
    """
    seq = hidden.shape[2]
    n = seq // chunk_size

    def split(x):  # [B, S, ...] -> [n, B, c, ...]
        return jnp.moveaxis(x.reshape((x.shape[0], n, chunk_size) + x.shape[2:]), 1, 0)

    def merge(x):  # [n, B, c, ...] -> [B, S, ...]
        if x is None:
            return None
        x = jnp.moveaxis(x, 0, 1)
        return x.reshape((x.shape[0], seq) + x.shape[3:])

    def depth(d_head, xs):  # one depth: [B, S, ...] -> its sums, pred [B, S] (, d hidden)
        h, t, m, w = xs

        def chunk(acc, xs):
            (loss, correct, pred), grads = _fused_chunk(
                _constrain(xs[0]), head, *xs[1:], w, with_grad, with_pred
            )
            acc = (acc[0] + loss, acc[1] + correct) + ((acc[2] + grads[1],) if with_grad else ())
            return acc, (pred,) + ((grads[0],) if with_grad else ())

        zero = jnp.zeros((), jnp.float32)
        init = (zero, zero) + ((d_head,) if with_grad else ())
        if n == 1:
            acc, ys = chunk(init, (h, t, m))
        else:
            acc, ys = jax.lax.scan(chunk, init, (split(h), split(t), split(m)))
            ys = tuple(merge(y) for y in ys)
        return (acc[2] if with_grad else d_head), (acc[0], acc[1]) + ys

    # The depth scan carries the shared d head (without gradients, an unused scalar).
    d_head = jnp.zeros(head.shape if with_grad else (), jnp.float32)
    d_head, ys = jax.lax.scan(depth, d_head, (hidden, targets, mask, weights))
    return ys[:3], ((ys[3], d_head) if with_grad else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _fused_weighted_ce(hidden, head, targets, mask, weights, chunk_size, with_pred):
    out = _chunked(hidden, head, targets, mask, chunk_size, weights, False, with_pred)[0]
    loss, correct, pred = out
    return jnp.sum(weights * loss), loss, correct, pred


def _fused_weighted_ce_fwd(hidden, head, targets, mask, weights, chunk_size, with_pred):
    (loss, correct, pred), grads = _chunked(
        hidden, head, targets, mask, chunk_size, weights, True, with_pred
    )
    out = (jnp.sum(weights * loss), loss, correct, pred)
    return out, (grads, jnp.zeros((0,), head.dtype))


def _fused_weighted_ce_bwd(chunk_size, with_pred, residuals, cotangents):
    (d_hidden, d_head), dtype_of_head = residuals
    g = cotangents[0]  # only the weighted total is differentiable
    return (
        d_hidden * g.astype(d_hidden.dtype),
        (d_head * g).astype(dtype_of_head.dtype),
        None,
        None,
        None,
    )


_fused_weighted_ce.defvjp(_fused_weighted_ce_fwd, _fused_weighted_ce_bwd)


def cross_entropy_sums(
    hidden: Array, head: Array, targets: Array, mask: Array
) -> tuple[DepthSums, Array]:
    """The reference cross-entropy of every depth, from one plain [D+1, B, S, V] logits tensor.

    hidden [D+1, B, S, E], head [E, V], targets/mask [D+1, B, S]
    -> (DepthSums with [D+1] leaves, each depth's sum differentiable by autodiff,
    predictions [D+1, B, S] int32 argmax). The training loss is `weighted_cross_entropy`.
    """
    loss, correct, pred = _chunk_sums(hidden, head, targets, mask)
    return DepthSums(loss, correct, mask.sum((1, 2)).astype(jnp.float32)), pred


def weighted_cross_entropy(
    hidden: Array,
    head: Array,
    targets: Array,
    mask: Array,
    weights: Array,
    chunk_size: int = 0,
    with_pred: bool = True,
) -> tuple[Array, DepthSums, Array | None]:
    """sum_k weights[k] * (CE sum of depth k), plus every depth's sums for the metrics.

    hidden [D+1, B, S, E], head [E, V], targets/mask [D+1, B, S], weights [D+1] (constants:
    not differentiated) -> (total [], DepthSums [D+1] (values only, no gradient),
    predictions [D+1, B, S], or None without `with_pred`: a train step skips the argmax).
    Only `total` carries gradients, to hidden and head.

    chunk_size 0: `cross_entropy_sums`'s plain logits, differentiated by autodiff. chunk_size
    > 0: a fused loss that scans over depths and chunks of positions and, when
    differentiated, computes each chunk's gradients (d hidden, and d head into one f32 [E, V]
    accumulator for all depths) in the forward pass from the chunk's softmax, so no logits
    outlive their chunk, none are recomputed, and a depth costs no logits- or head-sized
    buffer; the backward pass only scales them by the cotangent of `total`.
    """
    weights = jax.lax.stop_gradient(weights.astype(jnp.float32))
    if not chunk_size:
        sums, pred = cross_entropy_sums(hidden, head, targets, mask)
        total = jnp.sum(weights * sums.loss)
        return total, jax.lax.stop_gradient(sums), (pred if with_pred else None)
    chunk_size = min(chunk_size, hidden.shape[2])
    if hidden.shape[2] % chunk_size:
        raise ValueError(
            f"chunk_size {chunk_size} does not divide the sequence length {hidden.shape[2]}"
        )
    total, loss, correct, pred = _fused_weighted_ce(
        hidden, head, targets, mask, weights, chunk_size, with_pred
    )
    count = mask.sum((1, 2)).astype(jnp.float32)
    return total, jax.lax.stop_gradient(DepthSums(loss, correct, count)), pred


def depth_weights(lambdas: Array, counts: Array) -> Array:
    """The weight of each depth's CE sum in L = L^0 + sum_k lambda_k L^k, L^k = sum_k / count_k.

    lambdas [D], counts [D+1] -> [1, lambda_1, ..., lambda_D] / max(counts, 1), [D+1] f32.
    """
    ones = jnp.ones((1,), jnp.float32)
    return jnp.concatenate([ones, lambdas.astype(jnp.float32)]) / jnp.maximum(counts, 1.0)


def weighted_loss(sums: DepthSums, lambdas: Array, counts: Array | None = None) -> Array:
    """L = L^0 + sum_k lambda_k L^k, L^k = loss_k / count_k.

    lambdas [D]; `counts` [D+1] overrides the denominators (the whole batch's counts when
    accumulating microbatches, so the accumulated gradient equals the full batch's).
    """
    counts = sums.count if counts is None else counts
    return jnp.sum(depth_weights(lambdas, counts) * sums.loss)


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


def _accepted_prefix(pred: Array, mask: Array) -> tuple[Array, Array]:
    """pred, mask [D+1, B, S] -> (1 + accepted prefix length [B, S-D] int32, origin valid
    [B, S-D] bool): at origin i, how many tokens a greedy verify step emits."""
    depth, seq = pred.shape[0] - 1, pred.shape[2]
    chain = jnp.ones(mask.shape[1:2] + (seq - depth,), bool)
    total = jnp.ones(chain.shape, jnp.int32)
    for k in range(1, depth + 1):
        same = pred[k, :, : seq - depth] == pred[0, :, k : seq - depth + k]
        chain = chain & same & mask[k, :, : seq - depth]
        total = total + chain
    return total, mask[0, :, : seq - depth]


def accept_length(pred: Array, mask: Array) -> tuple[Array, Array]:
    """Simulated acceptance length of greedy self-speculative decoding, averaged over every
    position, under teacher forcing.

    At position i, the drafts of depths 1..D (argmax of depth k at i) are accepted while they
    all equal the trunk's own argmax at i + k (the tokens a greedy verifier emits); a verify
    step then emits 1 + (that prefix's length) tokens. Scored at the positions i where every
    depth has a trunk argmax to compare with (i < S - D) and depth 0's target is valid; a
    depth whose target lies in a later document (mask False) ends the prefix.
    pred, mask [D+1, B, S] -> (sum over those positions of 1 + prefix length [], count []).
    `accept_walk` replays the decoder's own choice of positions instead.
    """
    total, valid = _accepted_prefix(pred, mask)
    return jnp.where(valid, total, 0).sum().astype(jnp.float32), valid.sum().astype(jnp.float32)


def accept_walk(pred: Array, mask: Array) -> tuple[Array, Array]:
    """Greedy self-speculative decoding replayed on teacher-forced predictions: tokens per
    verify step, as the decoder counts them.

    A greedy decoder does not draft from every position: a verify step at origin i emits
    a = 1 + (accepted prefix) tokens and the next step drafts from i + a. Each row is walked
    that way from its first scored position (`accept_length`'s positions; an origin that is
    not scored, such as padding, is stepped over without a verify step). On text that is the
    trunk's own greedy output, scored from the prompt's last position, this is exactly the
    decoder's step sequence, so the ratio equals its measured tokens per step (up to argmax
    ties that the cached and full forward passes break differently). Averaging over every
    position instead (`accept_length`) weighs the steps differently: on repetitive text a
    decoder that locks onto one phase of a repeat can accept much more, or less, than the
    average position does.
    pred, mask [D+1, B, S] -> (tokens emitted [], verify steps []), summed over rows.
    """
    lengths, valid = _accepted_prefix(pred, mask)

    def visit(carry, column):
        origin, tokens, steps = carry
        i, a, v = column
        here = origin == i
        take = here & v
        origin = jnp.where(here, i + jnp.where(v, a, 1), origin)
        return (origin, tokens + jnp.where(take, a, 0), steps + take), None

    zeros = jnp.zeros(lengths.shape[:1], jnp.int32)
    columns = (jnp.arange(lengths.shape[1], dtype=jnp.int32), lengths.T, valid.T)
    (_, tokens, steps), _ = jax.lax.scan(visit, (zeros, zeros, zeros), columns)
    return tokens.sum().astype(jnp.float32), steps.sum().astype(jnp.float32)


# ------------------------------------------------------------------------ drafter objectives
#
# `loss.mtp_objective` chooses what the depths (the drafter) learn; the trunk (depth 0) keeps
# its cross-entropy. Depth k at position i and the trunk at position i + k predict the same
# token t[i+k+1], so the trunk's own next-token distribution p there is what a verifier
# accepts drafts against:
#   ce:      cross-entropy on the data's tokens;
#   distill: KL(p || q_k), p detached (q_k: depth k's distribution at i);
#   tv:      the Bebop acceptance loss over the chain: with alpha_k(i) = sum_v min(p, q_k), the
#            probability that rejection sampling accepts depth k's draft, depth j's term is
#            1 - prod_{k<=j} alpha_k(i) (the chain stops before draft j); with equal lambdas
#            sum_j lambda_j term_j is lambda * gamma * (1 - E[accepted drafts] / gamma).
# Both new objectives run chunk by chunk like the CE: a custom VJP keeps only the hidden
# states and recomputes a chunk's [B, c, V] logits (student and teacher) in the backward pass.


def objective_mask(mask: Array, objective: str) -> Array:
    """The positions each depth's objective scores: mask [D+1, B, S] -> [D+1, B, S] bool.

    'ce': `mask` itself. 'distill' and 'tv' compare depth k at i with the trunk at i + k, so
    they also drop i >= S - k (past the trunk's window); 'tv' scores depth j's term at i only
    where depths 1..j all are (a cumulative AND over depths: the chain stops at the first).
    """
    if objective == "ce":
        return mask
    seq = mask.shape[-1]
    k = jnp.arange(mask.shape[0])[:, None, None]
    out = mask & (jnp.arange(seq)[None, None, :] < seq - k)
    if objective == "tv":
        out = jnp.concatenate([out[:1], jnp.cumprod(out[1:], axis=0).astype(bool)])
    return out


def _rows_log_softmax(x: Array, head: Array) -> tuple[Array, Array]:
    """x [B, c, E] -> (rows [N, E], log-softmax of the logits [N, V] f32)."""
    rows = x.reshape(-1, x.shape[-1])
    logits = jnp.dot(rows, head, preferred_element_type=jnp.float32)
    top = jnp.max(logits, axis=-1, keepdims=True)
    return rows, logits - (top + jnp.log(jnp.sum(jnp.exp(logits - top), -1, keepdims=True)))


def _drafter_chunk(student, teacher, head, targets, mask, objective, with_pred):
    """One chunk of one depth. student, teacher [B, c, E] (teacher: the trunk's normed hidden
    at i + k), head [E, V], targets/mask [B, c] -> (stat [B, c]: KL(p || q) ('distill') or
    sum_v min(p, q) ('tv'); CE sum []; correct []; pred [B, c] or None)."""
    _, log_q = _rows_log_softmax(student, head)
    _, log_p = _rows_log_softmax(teacher, head)
    p = jnp.exp(log_p)
    if objective == "distill":
        stat = jnp.sum(p * (log_p - log_q), axis=-1)
    else:
        stat = jnp.sum(jnp.minimum(p, jnp.exp(log_q)), axis=-1)
    t, m = targets.reshape(-1), mask.reshape(-1)
    target_lq = jnp.take_along_axis(log_q, t[:, None], axis=1)[:, 0]
    top = jnp.max(log_q, axis=-1)
    ce = jnp.where(m, -target_lq, 0.0).sum()
    correct = ((target_lq >= top) & m).sum().astype(jnp.float32)
    pred = None
    if with_pred:
        pred = jnp.argmax(log_q, axis=-1).astype(jnp.int32).reshape(targets.shape)
    return stat.reshape(targets.shape), ce, correct, pred


def _drafter_chunk_grad(student, teacher, head, d_stat, objective):
    """The gradients of sum(d_stat * stat) of one chunk: d student [B, c, E], d head [E, V] f32.

    d stat / d student logits: q - p ('distill'); q * (g - <g, q>) with g = [q < p] ('tv').
    The teacher is detached: no gradient reaches it or, through it, the head.
    """
    rows, log_q = _rows_log_softmax(student, head)
    _, log_p = _rows_log_softmax(teacher, head)
    q, p = jnp.exp(log_q), jnp.exp(log_p)
    if objective == "distill":
        d_logits = q - p
    else:
        below = (q < p).astype(jnp.float32)
        d_logits = q * (below - jnp.sum(below * q, axis=-1, keepdims=True))
    d_logits = (d_logits * d_stat.reshape(-1, 1)).astype(head.dtype)
    d_student = jnp.dot(d_logits, head.T, preferred_element_type=jnp.float32)
    return (
        _constrain(d_student.astype(student.dtype).reshape(student.shape)),
        xla_cpu.weight_grad(rows, d_logits),
    )


def _drafter_scan(student, h0, head, chunk_size, objective, with_pred, xs, d_stat=None):
    """`_drafter_chunk` (forward, `d_stat` None) or `_drafter_chunk_grad` (backward) over
    depths (a scan) and chunks of positions (a scan): one chunk's logits alive at a time.

    student [D, B, S, E], h0 [B, S, E] (the trunk's normed hidden, the teachers' input),
    xs: (targets, mask) [D, B, S] forward, d_stat [D, B, S] backward.
    Forward -> (stat [D, B, S], CE [D], correct [D], pred [D, B, S] or None);
    backward -> (d student [D, B, S, E], d head [E, V] f32).
    """
    depth, seq = student.shape[0], student.shape[2]
    n = seq // chunk_size
    padded = jnp.pad(h0, ((0, 0), (0, depth), (0, 0)))  # teachers past S: ignored positions

    def split(x):  # [B, S, ...] -> [n, B, c, ...]
        return jnp.moveaxis(x.reshape((x.shape[0], n, chunk_size) + x.shape[2:]), 1, 0)

    def merge(x):  # [n, B, c, ...] -> [B, S, ...]
        x = jnp.moveaxis(x, 0, 1)
        return x.reshape((x.shape[0], seq) + x.shape[3:])

    def per_chunk(fn, init, chunks):
        if n == 1:
            return fn(init, tuple(c[0] for c in chunks))
        carry, ys = jax.lax.scan(fn, init, chunks)
        return carry, jax.tree.map(merge, ys)

    def depth_fwd(_, xs):
        s, k, t, m = xs
        teacher = jax.lax.dynamic_slice_in_dim(padded, k, seq, axis=1)

        def chunk(acc, c):
            stat, ce, correct, pred = _drafter_chunk(
                _constrain(c[0]), _constrain(c[1]), head, c[2], c[3], objective, with_pred
            )
            return (acc[0] + ce, acc[1] + correct), (stat, pred)

        zero = jnp.zeros((), jnp.float32)
        (ce, correct), (stat, pred) = per_chunk(
            chunk, (zero, zero), tuple(split(x) for x in (s, teacher, t, m))
        )
        return None, (stat, ce, correct, pred)

    def depth_bwd(d_head, xs):
        s, k, ds = xs
        teacher = jax.lax.dynamic_slice_in_dim(padded, k, seq, axis=1)

        def chunk(acc, c):
            d_s, d_h = _drafter_chunk_grad(
                _constrain(c[0]), _constrain(c[1]), head, c[2], objective
            )
            return acc + d_h, d_s

        return per_chunk(chunk, d_head, tuple(split(x) for x in (s, teacher, ds)))

    ks = jnp.arange(1, depth + 1)
    if d_stat is None:
        _, ys = jax.lax.scan(depth_fwd, None, (student, ks) + tuple(xs))
        return ys
    d_head, d_student = jax.lax.scan(
        depth_bwd, jnp.zeros(head.shape, jnp.float32), (student, ks, d_stat)
    )
    return d_student, d_head


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _drafter_stats(student, h0, head, targets, mask, chunk_size, objective, with_pred):
    """(stat [D, B, S], CE [D], correct [D], pred [D, B, S] or None); only stat has a VJP,
    and it reaches student and head only (h0 is the detached teacher)."""
    return _drafter_scan(student, h0, head, chunk_size, objective, with_pred, (targets, mask))


def _drafter_stats_fwd(student, h0, head, targets, mask, chunk_size, objective, with_pred):
    out = _drafter_stats(student, h0, head, targets, mask, chunk_size, objective, with_pred)
    return out, (student, h0, head)


def _drafter_stats_bwd(chunk_size, objective, with_pred, residuals, cotangents):
    student, h0, head = residuals
    d_student, d_head = _drafter_scan(
        student, h0, head, chunk_size, objective, False, None, d_stat=cotangents[0]
    )
    return d_student, jnp.zeros_like(h0), d_head.astype(head.dtype), None, None


_drafter_stats.defvjp(_drafter_stats_fwd, _drafter_stats_bwd)


def drafter_terms(stat: Array, valid: Array, objective: str) -> Array:
    """Per-position terms of the depths' objective: stat, valid [D, B, S] -> [D, B, S] f32,
    zero where not `valid`. 'distill': the KL itself; 'tv': 1 - prod_{k<=j} alpha_k."""
    if objective == "tv":
        chain, terms = jnp.ones_like(stat[0]), []
        for k in range(stat.shape[0]):
            chain = chain * jnp.where(valid[k], stat[k], 1.0)
            terms.append(1.0 - chain)
        stat = jnp.stack(terms)
    return jnp.where(valid, stat, 0.0)


def mtp_loss(
    hidden: Array,
    head: Array,
    targets: Array,
    mask: Array,
    weights: Array,
    objective: str = "ce",
    chunk_size: int = 0,
    with_pred: bool = True,
) -> tuple[Array, DepthSums, Array | None]:
    """The training loss with the depths' objective `objective` (see `OBJECTIVES`).

    hidden [D+1, B, S, E], head [E, V], targets/mask [D+1, B, S], weights [D+1] (constants:
    depth_weights over the `objective_mask` counts) -> (total [], DepthSums, predictions
    [D+1, B, S] or None). total = weights[0] * (trunk CE sum) + sum_k weights[k] * (depth k's
    objective sum). 'ce' is `weighted_cross_entropy`; for 'distill' and 'tv', DepthSums also
    carries `objective` / `objective_count` [D+1], and its `loss` stays every depth's CE (for
    the logs). chunk_size 0: one chunk of all S positions.
    """
    if objective == "ce":
        return weighted_cross_entropy(hidden, head, targets, mask, weights, chunk_size, with_pred)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r}: expected one of {OBJECTIVES}")
    if hidden.shape[0] < 2:
        raise ValueError(f"objective {objective!r} needs MTP depths; hidden has only depth 0")
    weights = jax.lax.stop_gradient(weights.astype(jnp.float32))
    seq = hidden.shape[2]
    chunk = min(chunk_size or seq, seq)
    if seq % chunk:
        raise ValueError(f"chunk_size {chunk} does not divide the sequence length {seq}")
    total0, sums0, pred0 = weighted_cross_entropy(
        hidden[:1], head, targets[:1], mask[:1], weights[:1], chunk_size, with_pred
    )
    stat, ce, correct, pred = _drafter_stats(
        hidden[1:],
        jax.lax.stop_gradient(hidden[0]),
        head,
        targets[1:],
        mask[1:],
        chunk,
        objective,
        with_pred,
    )
    valid = objective_mask(mask, objective)
    terms = drafter_terms(stat, valid[1:], objective).sum((1, 2))
    total = total0 + jnp.sum(weights[1:] * terms)
    sums = DepthSums(
        loss=jnp.concatenate([sums0.loss, ce]),
        correct=jnp.concatenate([sums0.correct, correct]),
        count=mask.sum((1, 2)).astype(jnp.float32),
        objective=jnp.concatenate([sums0.loss, terms]),
        objective_count=valid.sum((1, 2)).astype(jnp.float32),
    )
    if with_pred:
        pred = jnp.concatenate([pred0, pred])
    return total, jax.lax.stop_gradient(sums), (pred if with_pred else None)
