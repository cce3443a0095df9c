"""Per-depth targets and masks, chunked == full loss, and learnability of every depth."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_model_config

import mtp_jax
from mtp_jax.loss import (
    cross_entropy_sums,
    depth_weights,
    draft_agreement,
    mtp_targets,
    weighted_cross_entropy,
    weighted_loss,
)


def test_targets_shift_and_document_mask():
    # One window, S=4, D=2: tokens 10..16; documents [1 1 1 2 2 2 2].
    tokens = jnp.arange(10, 17)[None]
    seg = jnp.array([[1, 1, 1, 2, 2, 2, 2]])
    targets, mask = mtp_targets(tokens, seg, depth=2)
    assert targets.shape == mask.shape == (3, 1, 4)
    np.testing.assert_array_equal(
        targets[:, 0], [[11, 12, 13, 14], [12, 13, 14, 15], [13, 14, 15, 16]]
    )
    # Position 2 is the last token of document 1: every later target is masked.
    np.testing.assert_array_equal(mask[:, 0], [[1, 1, 0, 1], [1, 0, 0, 1], [0, 0, 0, 1]])
    _, mask_nodoc = mtp_targets(tokens, None, depth=2)
    assert bool(mask_nodoc.all())
    _, mask_pad = mtp_targets(tokens, jnp.array([[1, 1, 1, 0, 0, 0, 0]]), depth=0)
    np.testing.assert_array_equal(mask_pad[0, 0], [1, 1, 0, 0, 0, 0])


@pytest.mark.parametrize("with_docs", [False, True])
def test_chunked_loss_equals_full_loss(with_docs):
    depth, batch, seq, emb, vocab = 2, 2, 16, 8, 40
    keys = jax.random.split(jax.random.key(0), 4)
    hidden = jax.random.normal(keys[0], (depth + 1, batch, seq, emb))
    head = jax.random.normal(keys[1], (emb, vocab))
    tokens = jax.random.randint(keys[2], (batch, seq + depth + 1), 0, vocab)
    seg = None
    if with_docs:
        seg = jnp.cumsum(jax.random.bernoulli(keys[3], 0.15, tokens.shape), axis=1) + 1
    targets, mask = mtp_targets(tokens, seg, depth)
    if with_docs:
        assert not bool(mask.all())
    lambdas = jnp.array([0.3, 0.1])

    def reference(h, w):
        sums, pred = cross_entropy_sums(h, w, targets, mask)
        return weighted_loss(sums, lambdas), (sums, pred)

    (full, (s_full, p_full)), g_full = jax.value_and_grad(reference, (0, 1), has_aux=True)(
        hidden, head
    )
    # The training path: one weighted total, one shared head-gradient accumulator.
    weights = depth_weights(lambdas, mask.sum((1, 2)))
    for chunk in (0, 4, 16):
        (total, (sums, pred)), g_chunk = jax.value_and_grad(
            lambda h, w, c=chunk: (lambda t, s, p: (t, (s, p)))(
                *weighted_cross_entropy(h, w, targets, mask, weights, c)
            ),
            (0, 1),
            has_aux=True,
        )(hidden, head)
        np.testing.assert_allclose(total, full, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(s_full), jax.tree.leaves(sums), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5)
        np.testing.assert_array_equal(p_full, pred)
        for a, b in zip(g_full, g_chunk, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # The reference: plain log-softmax cross-entropy, token mean per depth.
    logits = jnp.einsum("dbse,ev->dbsv", hidden, head)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    per_depth = (ce * mask).sum((1, 2)) / mask.sum((1, 2))
    np.testing.assert_allclose(full, per_depth[0] + lambdas @ per_depth[1:], rtol=1e-5)


def test_chunked_loss_keeps_no_full_logits_alive():
    """Under grad, the chunked loss's compiled temp memory is far below one [D+1,B,S,V] tensor."""
    depth, batch, seq, emb, vocab = 2, 4, 512, 64, 8192
    hidden = jnp.ones((depth + 1, batch, seq, emb))
    head = jnp.ones((emb, vocab))
    targets = jnp.zeros((depth + 1, batch, seq), jnp.int32)
    mask = jnp.ones((depth + 1, batch, seq), bool)

    weights = jnp.ones((depth + 1,))

    def temp_bytes(chunk):
        f = jax.grad(lambda h, w: weighted_cross_entropy(h, w, targets, mask, weights, chunk)[0])
        return jax.jit(f).lower(hidden, head).compile().memory_analysis().temp_size_in_bytes

    logits_bytes = (depth + 1) * batch * seq * vocab * 4
    assert temp_bytes(0) >= logits_bytes
    chunk_bytes = logits_bytes // (seq // 64)
    # One chunk's logits and their gradient live at a time: 8 chunks -> well under half.
    assert temp_bytes(64) <= 3 * chunk_bytes < logits_bytes / 2


def test_training_loss_adds_no_logits_buffer_per_depth():
    """The fused training loss works one depth at a time with one head-gradient accumulator:
    two more depths add far less than one chunk of logits to the compiled temp memory."""
    batch, seq, emb, vocab, chunk = 4, 256, 32, 8192, 64

    def temp_bytes(depth):
        hidden = jnp.ones((depth + 1, batch, seq, emb))
        targets = jnp.zeros((depth + 1, batch, seq), jnp.int32)
        mask = jnp.ones((depth + 1, batch, seq), bool)
        weights = jnp.ones((depth + 1,))

        def total(h, w):
            return weighted_cross_entropy(h, w, targets, mask, weights, chunk, with_pred=False)[0]

        f = jax.jit(jax.grad(total, (0, 1)))
        return (
            f.lower(hidden, jnp.ones((emb, vocab))).compile().memory_analysis().temp_size_in_bytes
        )

    chunk_logits = batch * chunk * vocab * 4
    assert temp_bytes(1) >= chunk_logits  # a chunk's logits are there, once
    assert temp_bytes(3) - temp_bytes(1) < chunk_logits / 4


def test_draft_agreement_compares_same_target_token():
    # depth 1 at i predicts token i+2, as does depth 0 at i+1.
    pred = jnp.array([[[5, 6, 7, 8]], [[6, 0, 8, 9]]])  # [D+1=2, B=1, S=4]
    mask = jnp.ones_like(pred, bool)
    agree, count = draft_agreement(pred, mask)
    np.testing.assert_array_equal(agree, [2.0])  # i=0: 6==6, i=1: 0!=7, i=2: 8==8
    np.testing.assert_array_equal(count, [3.0])


def _cycle_walks(key, batch, length, vocab):
    """Rows t[i+1] = f(t[i]) for one fixed random permutation f of the vocab, a single cycle.

    Token i + k + 1 = f^(k+1)(t[i]), a function of the prefix, and f^a != f^b for a != b
    (mod vocab) everywhere, so a depth trained against the wrong shift is wrong everywhere.
    """
    order = np.random.default_rng(0).permutation(vocab)
    successor = np.empty(vocab, np.int32)
    successor[order] = np.roll(order, -1)
    start = jax.random.randint(key, (batch,), 0, vocab)
    cols = [start]
    for _ in range(length - 1):
        cols.append(jnp.asarray(successor)[cols[-1]])
    return jnp.stack(cols, axis=1)


@pytest.mark.parametrize("layout", ["sequential", "parallel"])
def test_every_depth_learns_its_own_shift(layout):
    """A tiny model learns t[i+k+1] at depth k; checked against targets computed here.

    With a wrong target shift in the loss, the model would learn another offset and the
    accuracy measured against window[i + k + 1] below would stay near chance.
    """
    depth, seq, vocab, batch = 2, 12, 17, 64
    cfg = tiny_model_config(
        vocab_size=vocab, mtp_depth=depth, mtp_layout=layout, d_model=64, head_dim=16, mlp_dim=128
    )
    model = mtp_jax.Model(cfg)
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, seq + depth), jnp.int32)))
    params = params["params"]
    opt = optax.adam(3e-3)
    opt_state = opt.init(params)
    lambdas = jnp.ones(depth)

    @jax.jit
    def step(params, opt_state, key):
        window = _cycle_walks(key, batch, seq + depth + 1, vocab)
        grads = jax.grad(
            lambda p: mtp_jax.loss_and_metrics(model, p, {"tokens": window}, lambdas, chunk_size=4)[
                0
            ]
        )(params)
        updates, opt_state = opt.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state

    for i in range(150):
        params, opt_state = step(params, opt_state, jax.random.key(i + 1))

    window = _cycle_walks(jax.random.key(10_000), 256, seq + depth + 1, vocab)
    logits = model.apply({"params": params}, window[:, :-1]).logits
    pred = np.asarray(logits.argmax(-1))  # [D+1, B, S]
    w = np.asarray(window)
    for k in range(depth + 1):
        acc = (pred[k] == w[:, k + 1 : seq + k + 1]).mean()
        assert acc > 0.9, (k, acc)
