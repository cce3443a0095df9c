"""Drafters on a frozen trunk: train.trainable=mtp and the drafter objectives (distill, tv)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CONFIGS, tiny_train_config

from mtp_jax.config import ConfigError, load_config
from mtp_jax.inference.decode import Sampler
from mtp_jax.inference.speculative import accept
from mtp_jax.loss import depth_weights, mtp_loss, mtp_targets, objective_mask

DEPTH, BATCH, SEQ, EMB, VOCAB = 2, 2, 8, 8, 17


def direct_loss(hidden, head, targets, mask, lambdas, objective):
    """The objective written plainly: full [D+1, B, S, V] logits, autodiff, no chunks.

    L = CE^0 + sum_k lambda_k L^k with, for depth k at position i and the trunk's detached
    distribution p at i + k (positions with i + k >= S or a masked target left out):
    distill: L^k = mean KL(p || q_k); tv: L^k = mean (1 - prod_{j<=k} sum_v min(p_j, q_j))
    over the positions where depths 1..k are all scored.
    """
    seq = hidden.shape[2]
    log_q = jax.nn.log_softmax(jnp.einsum("dbse,ev->dbsv", hidden, head), axis=-1)
    ce0 = -jnp.take_along_axis(log_q[0], targets[0][..., None], -1)[..., 0]
    total = jnp.sum(jnp.where(mask[0], ce0, 0.0)) / mask[0].sum()
    trunk = jax.lax.stop_gradient(log_q[0])
    chain, alive = 1.0, jnp.ones(mask.shape[1:], bool)
    for k in range(1, hidden.shape[0]):
        log_p = jnp.concatenate([trunk[:, k:], jnp.zeros_like(trunk[:, :k])], axis=1)
        valid = mask[k] & (jnp.arange(seq) + k < seq)
        if objective == "distill":
            term = jnp.sum(jnp.exp(log_p) * (log_p - log_q[k]), -1)
        else:
            alive = alive & valid
            valid = alive
            alpha = jnp.sum(jnp.minimum(jnp.exp(log_p), jnp.exp(log_q[k])), -1)
            chain = chain * jnp.where(valid, alpha, 1.0)
            term = 1.0 - chain
        total += lambdas[k - 1] * jnp.sum(jnp.where(valid, term, 0.0)) / valid.sum()
    return total


@pytest.mark.parametrize("objective", ["distill", "tv"])
@pytest.mark.parametrize("with_docs", [False, True])
def test_objective_value_and_gradient_match_direct(objective, with_docs):
    keys = jax.random.split(jax.random.key(1), 4)
    hidden = jax.random.normal(keys[0], (DEPTH + 1, BATCH, SEQ, EMB))
    head = jax.random.normal(keys[1], (EMB, VOCAB))
    tokens = jax.random.randint(keys[2], (BATCH, SEQ + DEPTH + 1), 0, VOCAB)
    seg = None
    if with_docs:  # a document boundary inside each row: masked targets, shorter chains
        seg = jnp.array([[1] * 5 + [2] * 6, [1] * 9 + [2] * 2])
    targets, mask = mtp_targets(tokens, seg, DEPTH)
    lambdas = jnp.array([0.3, 0.7])
    want, want_grad = jax.value_and_grad(direct_loss, (0, 1))(
        hidden, head, targets, mask, lambdas, objective
    )
    counts = objective_mask(mask, objective).sum((1, 2))
    assert counts[2] < counts[1] < counts[0]
    assert bool(counts[0] < BATCH * SEQ) == with_docs
    weights = depth_weights(lambdas, counts)
    for chunk in (0, 4):

        def total(h, w, c=chunk):
            return mtp_loss(h, w, targets, mask, weights, objective, c, with_pred=False)[0]

        got, got_grad = jax.value_and_grad(total, (0, 1))(hidden, head)
        np.testing.assert_allclose(got, want, rtol=1e-5)
        for a, b in zip(got_grad, want_grad, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # The gradient reaches the depths' hidden states, and the trunk's only through its CE.
    assert float(jnp.abs(want_grad[0][1:]).max()) > 0
    ce_only = jax.grad(lambda h: direct_loss(h, head, targets, mask, 0 * lambdas, objective))
    np.testing.assert_allclose(got_grad[0][0], ce_only(hidden)[0], rtol=1e-4, atol=1e-6)
    # The metrics: every depth's CE and accuracy, and each objective's sums.
    _, sums, pred = mtp_loss(hidden, head, targets, mask, weights, objective, 4)
    logits = jnp.einsum("dbse,ev->dbsv", hidden, head)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(sums.loss, (ce * mask).sum((1, 2)), rtol=1e-5)
    np.testing.assert_array_equal(pred, logits.argmax(-1))
    np.testing.assert_array_equal(sums.objective_count, counts)


@pytest.mark.parametrize("objective", ["distill", "tv"])
def test_objective_keeps_no_full_logits_alive(objective):
    """Under grad, the chunked objective's compiled temp memory stays below half of one
    depth's [B, S, V] logits (the unchunked one holds several such tensors)."""
    depth, batch, seq, emb, vocab = 2, 2, 512, 32, 8192
    hidden, head = jnp.ones((depth + 1, batch, seq, emb)), jnp.ones((emb, vocab))
    targets = jnp.zeros((depth + 1, batch, seq), jnp.int32)
    mask = jnp.ones((depth + 1, batch, seq), bool)

    def temp_bytes(chunk):
        def total(h, w):
            return mtp_loss(h, w, targets, mask, jnp.ones(depth + 1), objective, chunk, False)[0]

        f = jax.jit(jax.grad(total, (0, 1))).lower(hidden, head).compile()
        return f.memory_analysis().temp_size_in_bytes

    depth_logits = batch * seq * vocab * 4
    assert temp_bytes(0) > 2 * depth_logits
    assert temp_bytes(64) < depth_logits / 2


def test_tv_is_one_minus_acceptance():
    """Hand-built p and q on 3 tokens: the tv terms are 1 - P(drafts 1..k accepted), and
    their mean over the chain is 1 - E[accepted drafts] / gamma, with E[accepted] measured
    by the decoder's own rejection sampler (`speculative.accept`)."""
    p1, q1 = jnp.array([0.5, 0.3, 0.2]), jnp.array([0.2, 0.3, 0.5])  # sum min = 0.7
    p2, q2 = jnp.array([0.1, 0.6, 0.3]), jnp.array([0.1, 0.1, 0.8])  # sum min = 0.5
    uniform = jnp.full(3, 1 / 3)
    # head = identity, hidden = log-probabilities: logits are log p / log q themselves.
    # S = 3: the trunk at positions 1, 2 gives p1, p2; depth 1 at 0 drafts with q1, depth 2
    # at 0 with q2. Depth 1 at position 1 copies the trunk at 2 (alpha = 1, term 0).
    trunk = jnp.stack([uniform, p1, p2])
    depth1 = jnp.stack([q1, p2, uniform])
    depth2 = jnp.stack([q2, uniform, uniform])
    hidden = jnp.log(jnp.stack([trunk, depth1, depth2]))[:, None]  # [3, 1, 3, 3]
    targets = jnp.zeros((3, 1, 3), jnp.int32)
    mask = jnp.ones((3, 1, 3), bool)
    weights = jnp.ones(3)
    _, sums, _ = mtp_loss(hidden, jnp.eye(3), targets, mask, weights, "tv", 0)
    np.testing.assert_allclose(sums.objective_count, [3, 2, 1])
    np.testing.assert_allclose(sums.objective[1:], [1 - 0.7, 1 - 0.7 * 0.5], rtol=1e-6)
    bebop = (sums.objective[1] + sums.objective[2]) / 2  # position 0, gamma = 2
    expected_accepted = 0.7 + 0.7 * 0.5
    np.testing.assert_allclose(bebop, 1 - expected_accepted / 2, rtol=1e-6)
    # The rejection sampler accepts 0.7 + 0.35 drafts on average with these p and q.
    rows = 40_000
    keys = jax.random.split(jax.random.key(0), 3)
    q = jnp.broadcast_to(jnp.stack([q1, q2]), (rows, 2, 3))
    drafts = jax.random.categorical(keys[0], jnp.log(q), axis=-1)
    logits = jnp.broadcast_to(jnp.log(jnp.stack([p1, p2, uniform])), (rows, 3, 3))
    m, _ = accept(Sampler(temperature=1.0), drafts, q, logits, keys[1])
    np.testing.assert_allclose(float(m.mean()), expected_accepted, atol=0.015)


def test_config_checks():
    base = tiny_train_config("unused")
    assert base.train.trainable == "all" and base.loss.mtp_objective == "ce"
    for key, value in (("train.trainable", "mtp"), ("loss.mtp_objective", "tv")):
        with pytest.raises(ConfigError, match=f"'{key}'.*model.mtp_depth=0"):
            tiny_train_config("unused", "model.mtp_depth=0", f"{key}={value}")
    with pytest.raises(ConfigError, match="'loss.mtp_objective'.*'distill'"):
        tiny_train_config("unused", "loss.mtp_objective=kl")
    assert (
        load_config(
            CONFIGS / "smoke.py", ["train.trainable=mtp", "loss.mtp_objective=distill"]
        ).train.trainable
        == "mtp"
    )


class _Stop(Exception):
    pass


def _initial_params(config):
    from mtp_jax.model import Model
    from mtp_jax.sharding import make_mesh
    from mtp_jax.train.state import abstract_state, init_state, make_optimizer

    model, tx = Model(config.model), make_optimizer(config)
    mesh = make_mesh(config.mesh, jax.devices()[:1])
    return init_state(config, model, tx, abstract_state(config, model, tx, mesh)[1])


def test_trainable_mtp_freezes_trunk_and_resumes(code_store, tmp_path):
    from mtp_jax.model.model import mtp_param_mask
    from mtp_jax.train import load_checkpoint, train
    from mtp_jax.train.metrics import read_metrics

    config = tiny_train_config(
        code_store,
        "train.trainable=mtp",
        "loss.mtp_objective=tv",
        "model.vocab_size=259",
        "train.steps=6",
        "checkpoint.every=3",
    )
    one = jax.devices()[:1]
    start = _initial_params(config)  # what a fresh run starts from (seeded)
    straight = train(config, str(tmp_path / "straight"), devices=one, progress=False)
    mask = mtp_param_mask(start.params)
    flat = jax.tree.leaves_with_path(start.params)
    end = jax.tree.leaves(straight.state.params)
    changed = {jax.tree_util.keystr(p): not np.array_equal(a, b) for (p, a), b in zip(flat, end)}
    for (path, _), trains in zip(flat, jax.tree.leaves(mask), strict=True):
        assert changed[jax.tree_util.keystr(path)] == trains, path  # trunk frozen, depths move
    assert sum(jax.tree.leaves(mask)) < len(flat)
    # Optimizer state: Adam's two moments of the depth parameters, and nothing else array-sized.
    depth_size = sum(x.size for x, m in zip(end, jax.tree.leaves(mask)) if m)
    opt = [x for x in jax.tree.leaves(straight.state.opt_state) if x.ndim]
    assert sum(x.size for x in opt) == 2 * depth_size
    emb = start.params["embed"]["embedding"]
    assert not any(x.shape == emb.shape for x in opt)
    last = read_metrics(str(tmp_path / "straight"))[-1]
    for key in ("loss/depth_0", "loss/depth_2", "accuracy/depth_1", "objective/depth_2"):
        assert key in last, key
    assert 0 < last["objective/depth_1"] < last["objective/depth_2"] < 1  # 1 - P(accepted)

    # Resume in this mode: stop after the step-3 checkpoint, resume, end where straight did.
    def stop_at_4(step):
        if step == 4:
            raise _Stop

    resumed = tmp_path / "resumed"
    with pytest.raises(_Stop):
        train(config, str(resumed), devices=one, progress=False, on_step=stop_at_4)
    _, partial = load_checkpoint(str(resumed))
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(partial), end, strict=True))
    result = train(config, str(resumed), devices=one, progress=False)
    assert result.step == 6
    for a, b in zip(jax.tree.leaves(result.state), jax.tree.leaves(straight.state), strict=True):
        np.testing.assert_array_equal(a, b)
