"""MTP training variants (issue 16): hidden-state mixing, trunk-detached depths, per-depth
lambda curricula, and the simulated acceptance length `eval/accept_len`."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CONFIGS, TINY_TRAIN, tiny_model_config

from mtp_jax.config import ConfigDict, ConfigError, load_config
from mtp_jax.loss import (
    accept_length,
    accept_walk,
    draft_agreement,
    mtp_targets,
    weighted_cross_entropy,
)
from mtp_jax.model import Model
from mtp_jax.model.mtp import MTPDepth, mixed_input
from mtp_jax.sharding import make_mesh
from mtp_jax.train.metrics import eval_summary
from mtp_jax.train.state import (
    TrainState,
    abstract_state,
    init_state,
    lambda_schedule,
    make_optimizer,
)
from mtp_jax.train.step import apply_gradients, loss_and_metrics, make_eval_step, make_train_step


def _config(*overrides):
    """The tiny smoke config on synthetic tokens (no store needed)."""
    return load_config(
        CONFIGS / "smoke.py", [*TINY_TRAIN, "data.source=synthetic", "data.path=", *overrides]
    )


def _state_and_batch(config, seed=0, params=None):
    model = Model(config.model)
    tx = make_optimizer(config)
    mesh = make_mesh(ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}), jax.devices()[:1])
    _, shardings = abstract_state(config, model, tx, mesh)
    state = init_state(config, model, tx, shardings)
    if params is not None:
        state = TrainState(step=state.step, params=params, opt_state=tx.init(params))
    state = state.replace(step=jnp.asarray(2, jnp.int32))  # past step 0's zero warmup LR
    shape = (config.data.batch_size, config.data.seq_len + config.model.mtp_depth + 1)
    tokens = jax.random.randint(jax.random.key(seed + 7), shape, 0, config.model.vocab_size)
    return model, tx, state, {"tokens": tokens}


def _init(cfg, seq=8, batch=2):
    model = Model(cfg)
    tokens = jax.random.randint(jax.random.key(1), (batch, seq + cfg.mtp_depth), 0, 97)
    return model, nn.unbox(model.init(jax.random.key(0), tokens))["params"], tokens


def _equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _differ(a, b) -> bool:
    return any(
        not np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


# ------------------------------------------------------------------------ hidden-state mixing


def test_mixing_off_is_the_plain_step_bit_for_bit():
    """p = 0: the train step equals the plain objective (no rng) + the optimizer, bit for bit;
    p > 0 changes it (the test can fail both ways)."""
    config = _config()
    model, tx, state, batch = _state_and_batch(config)
    new, metrics = jax.jit(make_train_step(config, model, tx))(state, batch)

    def plain(state, batch):
        lambdas = lambda_schedule(config)(state.step)

        def loss_fn(p):
            return loss_and_metrics(model, p, batch, lambdas, config.loss.chunk_size)[0]

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return apply_gradients(tx, state, grads)[0], loss

    ref, ref_loss = jax.jit(plain)(state, batch)
    np.testing.assert_array_equal(metrics["loss"], ref_loss)
    _equal(new.params, ref.params)
    mixed_config = _config("model.mtp_hidden_mixing=0.5")
    mixed_step = jax.jit(make_train_step(mixed_config, Model(mixed_config.model), tx))
    _, mixed_metrics = mixed_step(state, batch)
    # (Adam's first update is about lr * sign(g), so compare the loss, not the parameters.)
    assert mixed_metrics["loss"] != metrics["loss"]


def test_mixing_draws_earlier_states_uniformly():
    """The reservoir over depths: at depth k the input is h^{k-1} with probability 1 - p, else
    one of h^0..h^{k-2}, uniformly. States are labelled by their index (h^j = j)."""
    p, depth, n = 0.4, 4, 200_000
    shape = (n, 1)
    h, pool = jnp.zeros(shape), jnp.zeros(shape)
    keys = jax.random.split(jax.random.key(3), depth)
    for k in range(1, depth + 1):
        x, pool = mixed_input(h, pool, keys[k - 1], jnp.asarray(k), p)
        freq = np.bincount(np.asarray(x[:, 0], int), minlength=depth) / n
        expect = np.zeros(depth)
        expect[k - 1] = 1.0 if k == 1 else 1 - p
        if k >= 2:
            expect[: k - 1] += p / (k - 1)
        np.testing.assert_allclose(freq, expect, atol=0.006)
        h = jnp.full(shape, float(k))  # h^k, labelled k
    # p = 0: the input is h^{k-1} itself, bit for bit.
    x, _ = mixed_input(h, pool, keys[0], jnp.asarray(3), 0.0)
    np.testing.assert_array_equal(x, h)


def test_mixing_feeds_depth_2_the_trunk_state_and_never_mixes_in_eval():
    """Constructed case: p = 1, D = 2: depth 2 always reads h^0 in place of h^1 (at every
    position); depth 1 is untouched. Without a key (eval, decoding) nothing is mixed."""
    cfg = tiny_model_config(mtp_depth=2, mtp_hidden_mixing=1.0)
    plain_cfg = tiny_model_config(mtp_depth=2)
    model, params, tokens = _init(cfg)
    seq = tokens.shape[1] - 2
    mixed = model.apply({"params": params}, tokens, None, jax.random.key(5), method="features")
    plain = Model(plain_cfg).apply({"params": params}, tokens, method="features")
    # no key (eval / decoding): exactly the model without mixing
    _equal(model.apply({"params": params}, tokens, method="features"), plain)
    np.testing.assert_array_equal(mixed[:2], plain[:2])
    assert not np.allclose(mixed[2], plain[2], atol=1e-3)

    positions = jnp.broadcast_to(jnp.arange(seq), (tokens.shape[0], seq))

    def h0_of(m):
        return m.trunk(m.embed(tokens[:, :seq]), positions)[0]

    h0 = model.apply({"params": params}, method=h0_of)
    emb2 = model.apply({"params": params}, tokens[:, 2 : 2 + seq], method="embed_tokens")
    depth2 = jax.tree.map(lambda p: p[1], params["mtp"]["depths"])
    _, (out2, _) = MTPDepth(plain_cfg).apply({"params": depth2}, h0, emb2, positions, None, None)
    np.testing.assert_allclose(mixed[2], out2, rtol=1e-5, atol=1e-5)


def test_mixing_never_in_eval_or_decoding():
    from mtp_jax.inference import speculative_generate

    cfg = tiny_model_config(mtp_depth=2, mtp_hidden_mixing=0.5)
    model, params, _ = _init(cfg)
    prompt, lengths = np.array([[5, 6, 7, 8]], np.int32), np.array([4])
    with_p = speculative_generate(model, params, prompt, lengths, max_new_tokens=6)
    plain = speculative_generate(
        Model(tiny_model_config(mtp_depth=2)), params, prompt, lengths, max_new_tokens=6
    )
    np.testing.assert_array_equal(with_p.tokens, plain.tokens)
    assert with_p.stats["acceptance"] == plain.stats["acceptance"]
    config = _config("model.mtp_hidden_mixing=0.5")
    model, _, state, batch = _state_and_batch(config)
    out = jax.jit(make_eval_step(config, model))(state.params, batch)
    plain_config = _config()
    ref = jax.jit(make_eval_step(plain_config, Model(plain_config.model)))(state.params, batch)
    _equal(out, ref)


def test_mixing_resume_is_bit_identical():
    """The mixing key is a function of (seed, step): steps 0, 1, 2 in one go equal steps 0, 1,
    then a fresh process-like restart (state through host memory, a new jit) and step 2."""
    config = _config("model.mtp_hidden_mixing=0.5")
    model, tx, state, batch = _state_and_batch(config)
    step = jax.jit(make_train_step(config, model, tx))
    s1, _ = step(state, batch)
    s2, _ = step(s1, batch)
    s3, m3 = step(s2, batch)
    restored = jax.device_put(jax.device_get(s2))
    fresh = jax.jit(make_train_step(config, Model(config.model), tx))
    r3, rm3 = fresh(restored, batch)
    _equal(r3, s3)
    np.testing.assert_array_equal(m3["loss"], rm3["loss"])
    # The draws do depend on the step: step 2's update from s2 with step counter 1 differs.
    _, other = fresh(s2.replace(step=s2.step - 1), batch)
    assert other["loss"] != m3["loss"]


# ------------------------------------------------------------------------ trunk-detached depths


@pytest.mark.parametrize("layout", ["sequential", "parallel"])
@pytest.mark.parametrize("detach", [True, False])
def test_detached_trunk_gets_no_gradient_from_the_depths(layout, detach):
    """The depths' loss alone (weights [0, 1, 1]), untied head: detached, every trunk and
    embedding gradient is exactly zero while the depths and the shared head still learn; not
    detached, the trunk and embedding do get gradient."""
    cfg = tiny_model_config(mtp_depth=2, mtp_layout=layout, tie_embeddings=False)
    model, params, _ = _init(cfg)
    window = jax.random.randint(jax.random.key(2), (2, 8 + 3), 0, 97)
    targets, mask = mtp_targets(window, None, 2)

    def depth_loss(p):
        hidden, head = model.apply(
            {"params": p}, window[:, :-1], None, None, detach, method="features_and_head"
        )
        weights = jnp.array([0.0, 1.0, 1.0])
        return weighted_cross_entropy(hidden, head, targets, mask, weights, chunk_size=4)[0]

    grads = jax.grad(depth_loss)(params)

    def zero(tree):
        return all(not np.any(np.asarray(g)) for g in jax.tree.leaves(tree))

    for name in ("embed", "trunk"):
        assert zero(grads[name]) == detach, name
    assert zero(grads["final_norm"])  # the chain reads h^0 before the final norm
    assert np.any(np.asarray(grads["head"]))
    assert all(np.any(np.asarray(g)) for g in jax.tree.leaves(grads["mtp"]))


def test_detached_loss_trains_the_trunk_by_its_own_loss_only():
    """Detached, the trunk and embedding gradients equal those of the trunk's loss alone
    (lambdas 0); with the depths' loss attached it differs."""
    config = _config("model.tie_embeddings=false")
    model, _, state, batch = _state_and_batch(config)

    def loss_fn(p, lambdas, detach):
        return loss_and_metrics(
            model, p, batch, lambdas, config.loss.chunk_size, detach_trunk=detach
        )[0]

    grads_of = jax.jit(jax.grad(loss_fn), static_argnums=2)
    lam = jnp.array([0.3, 0.3])
    detached = grads_of(state.params, lam, True)
    trunk_only = grads_of(state.params, jnp.zeros(2), False)
    attached = grads_of(state.params, lam, False)
    for name in ("embed", "trunk"):
        for a, b in zip(jax.tree.leaves(detached[name]), jax.tree.leaves(trunk_only[name])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
        assert _differ(attached[name], trunk_only[name])
    assert _differ(detached["mtp"], trunk_only["mtp"])  # the depths do learn


def test_detach_needs_depths():
    with pytest.raises(ConfigError, match="loss.mtp_detach_trunk.*model.mtp_depth=0"):
        _config("loss.mtp_detach_trunk=true", "model.mtp_depth=0")


# ------------------------------------------------------------------------ lambda curricula

MODDED_NANOGPT = "((0.0, (0.5, 0.25)), (0.3333, (0.5, 0.0)), (0.6667, (0.0, 0.0)))"
NTP_TO_MTP = "((0.0, (0.0, 0.0)), (0.5, (0.0, 0.0)), (0.6, (0.3, 0.3)))"


def test_lambda_curricula_at_chosen_steps():
    """modded-nanogpt's [1, .5, .25->0] / [1, .5->0] / [1] over thirds, NTP -> MTP, a jump."""
    cfg = _config("train.steps=300", f"loss.mtp_lambda_schedule={MODDED_NANOGPT}")
    lam = lambda_schedule(cfg)
    x1, x2 = 0.3333 * 300, 0.6667 * 300  # the thirds, as written
    expected = {
        0: (0.5, 0.25),
        50: (0.5, 0.25 * (1 - 50 / x1)),
        99: (0.5, 0.25 * (1 - 99 / x1)),
        150: (0.5 * (1 - (150 - x1) / (x2 - x1)), 0.0),
        201: (0.0, 0.0),
        299: (0.0, 0.0),
        400: (0.0, 0.0),
    }
    for step, value in expected.items():
        np.testing.assert_allclose(lam(step), value, rtol=1e-5, atol=1e-7, err_msg=str(step))
    lam = lambda_schedule(_config("train.steps=100", f"loss.mtp_lambda_schedule={NTP_TO_MTP}"))
    for step, value in {0: 0.0, 50: 0.0, 55: 0.15, 60: 0.3, 99: 0.3}.items():
        np.testing.assert_allclose(lam(step), (value, value), rtol=1e-5, atol=1e-7)
    jump = "((0.0, (0.3, 0.3)), (0.5, (0.3, 0.3)), (0.5, (0.1, 0.0)))"
    lam = lambda_schedule(_config("train.steps=10", f"loss.mtp_lambda_schedule={jump}"))
    np.testing.assert_allclose(lam(4), (0.3, 0.3), rtol=1e-6)
    np.testing.assert_allclose(lam(5), (0.1, 0.0), rtol=1e-6)


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["loss.mtp_lambda_final=0.1"], "loss.mtp_lambda_final.*loss.mtp_lambda_schedule"),
        (["loss.mtp_lambda_switch_step=5"], "loss.mtp_lambda_switch_step.*mtp_lambda_schedule"),
        (["loss.mtp_lambda_per_depth=(0.1, 0.2)"], "loss.mtp_lambda_per_depth.*mtp_lambda_sch"),
        (["model.mtp_depth=3"], "loss.mtp_lambda_schedule.*model.mtp_depth=3"),
        (["model.mtp_depth=0"], "loss.mtp_lambda_schedule.*model.mtp_depth=0"),
    ],
)
def test_lambda_schedule_config_errors_name_both_keys(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        _config(f"loss.mtp_lambda_schedule={MODDED_NANOGPT}", *overrides)
    with pytest.raises(ConfigError, match="loss.mtp_lambda_schedule.*not decreasing"):
        _config("loss.mtp_lambda_schedule=((0.5, (0.1, 0.1)), (0.2, (0.0, 0.0)))")


def test_schedule_ending_at_next_token_only_steps_like_d0():
    """At the end of modded-nanogpt's curriculum (lambdas 0), a D=2 train step gives the D=0
    model's loss and trunk update on the same trunk parameters and tokens."""
    config = _config("train.steps=30", f"loss.mtp_lambda_schedule={MODDED_NANOGPT}")
    model, tx, state, batch = _state_and_batch(config)
    state = state.replace(step=jnp.asarray(25, jnp.int32))
    new, metrics = jax.jit(make_train_step(config, model, tx))(state, batch)
    np.testing.assert_array_equal(metrics["lambdas"], [0.0, 0.0])

    config0 = _config("train.steps=30", "model.mtp_depth=0")
    trunk = {k: v for k, v in state.params.items() if k != "mtp"}
    model0, tx0, state0, _ = _state_and_batch(config0, params=trunk)
    state0 = state0.replace(step=state.step)
    batch0 = {"tokens": batch["tokens"][:, : config.data.seq_len + 1]}
    new0, metrics0 = jax.jit(make_train_step(config0, model0, tx0))(state0, batch0)
    np.testing.assert_allclose(metrics["loss"], metrics0["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics["loss_sum"][0], metrics0["loss_sum"][0], rtol=1e-6)
    for name in trunk:
        for a, b in zip(jax.tree.leaves(new.params[name]), jax.tree.leaves(new0.params[name])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # ... while early in the curriculum the depths' loss counts.
    _, early = jax.jit(make_train_step(config, model, tx))(
        state.replace(step=state.step * 0), batch
    )
    assert early["loss"] > metrics["loss"] + 0.5


# ------------------------------------------------------------------------ accept_len


def _brute_accept(pred, mask):
    depth, batch, seq = pred.shape
    depth -= 1
    total = count = 0
    for b in range(batch):
        for i in range(seq - depth):
            if not mask[0, b, i]:
                continue
            n = 0
            for k in range(1, depth + 1):
                if mask[k, b, i] and pred[k, b, i] == pred[0, b, i + k]:
                    n += 1
                else:
                    break
            total, count = total + 1 + n, count + 1
    return total, count


def _brute_walk(pred, mask):
    """A greedy decoder's steps, row by row: draft from i, emit 1 + accepted, move on."""
    depth, batch, seq = pred.shape
    depth -= 1
    tokens = steps = 0
    for b in range(batch):
        i = 0
        while i < seq - depth:
            if not mask[0, b, i]:
                i += 1
                continue
            n = 0
            while n < depth and mask[n + 1, b, i] and pred[n + 1, b, i] == pred[0, b, i + n + 1]:
                n += 1
            tokens, steps, i = tokens + 1 + n, steps + 1, i + 1 + n
    return tokens, steps


@pytest.mark.parametrize("depth", [1, 3])
def test_accept_len_equals_brute_force_count(depth):
    """Hand-built logits over a 3-token vocabulary (many agreements), packed documents."""
    logits = jax.random.normal(jax.random.key(depth), (depth + 1, 3, 12, 3))
    pred = np.asarray(jnp.argmax(logits, -1))
    tokens = jax.random.randint(jax.random.key(9), (3, 12 + depth + 1), 0, 3)
    seg = np.ones((3, 12 + depth + 1), np.int32)
    seg[1, 6:] = 2  # a document boundary in row 1
    seg[2, 10:] = 0  # padding at the end of row 2
    _, mask = mtp_targets(tokens, jnp.asarray(seg), depth)
    total, count = accept_length(jnp.asarray(pred), mask)
    expect = _brute_accept(pred, np.asarray(mask))
    assert (float(total), float(count)) == expect
    assert 1.0 < expect[0] / expect[1] < depth + 1  # neither extreme: the check can fail
    tokens, steps = jax.jit(accept_walk)(jnp.asarray(pred), mask)
    walked = _brute_walk(pred, np.asarray(mask))
    assert (float(tokens), float(steps)) == walked
    assert walked[1] < expect[1]  # the walk skips the positions a step emits past
    # D = 1: 1 + depth 1's agreement (a draft across a document boundary is never accepted).
    if depth == 1:
        agree, agree_count = draft_agreement(jnp.asarray(pred), mask)
        assert float(total) == float(count + agree[0])
        assert float(agree_count[0]) < float(count)  # the boundary: scored, never accepted


def _fibonacci(key, shape, mod=12):
    """Rows t[j+1] = t[j] + t[j-1] (mod `mod`) from random starting pairs: [B, L] int32."""
    cols = list(jax.random.randint(key, (2, shape[0]), 0, mod))
    while len(cols) < shape[1]:
        cols.append((cols[-1] + cols[-2]) % mod)
    return jnp.stack(cols, 1).astype(jnp.int32)


def test_accept_len_matches_measured_greedy_tokens_per_step():
    """A tiny D=2 model trained briefly on Fibonacci sequences mod 12 (partly learnt: the
    drafts are accepted sometimes, not always). On the model's own greedy continuations:
    - the decoder's steps replayed on one teacher-forced forward (`simulated_acceptance`,
      `loss.accept_walk`) give exactly self-speculative decoding's measured tokens per step;
    - the eval step's accept_len (every position) is within 10% of it."""
    from mtp_jax.inference import generate, simulated_acceptance, speculative_generate
    from mtp_jax.inference.speculative import speculative_decode_state

    overrides = ("model.mtp_depth=2", "model.vocab_size=97")
    config = _config(*overrides, "train.steps=200", "train.lr=1e-2")
    model, tx, state, _ = _state_and_batch(config)
    state = state.replace(step=state.step * 0)
    step = jax.jit(make_train_step(config, model, tx))
    shape = (config.data.batch_size, config.data.seq_len + 3)
    for i in range(200):
        state, _ = step(state, {"tokens": _fibonacci(jax.random.key(100 + i), shape)})
    prompts = np.asarray(_fibonacci(jax.random.key(8), (16, 3)))
    lengths = np.full(16, 3)
    plain = generate(model, state.params, prompts, lengths, max_new_tokens=64 + 3)
    spec = speculative_generate(model, state.params, prompts, lengths, max_new_tokens=64)
    np.testing.assert_array_equal(spec.tokens, plain.tokens[:, :64])
    measured = spec.stats["mean_accepted"]
    assert 1.2 < measured < 2.8, measured  # neither extreme: the comparison means something
    text = np.concatenate([prompts, np.asarray(plain.tokens)], axis=1)  # [16, 3 + 67]
    replay = simulated_acceptance(model, state.params, text, lengths, max_new_tokens=64)
    assert replay["tokens_per_step"] == pytest.approx(measured, rel=1e-6)
    loop, _, _ = speculative_decode_state(model, state.params, prompts, lengths, max_new_tokens=64)
    assert replay["steps"] == int(loop.row_steps)  # the same verify steps, summed over rows
    with pytest.raises(ValueError, match="max_new_tokens 64"):
        simulated_acceptance(model, state.params, text[:, :-1], lengths, max_new_tokens=64)

    eval_config = _config(*overrides, "loss.chunk_size=0")
    sums = make_eval_step(eval_config, model)(state.params, {"tokens": jnp.asarray(text)})
    simulated = float(sums["accept_sum"] / sums["accept_count"])
    logged = eval_summary(jax.device_get(sums))  # what the training loop logs
    assert logged["eval/accept_len"] == pytest.approx(simulated)
    walk = float(sums["accept_walk_sum"] / sums["accept_walk_count"])
    assert logged["eval/accept_len_walk"] == pytest.approx(walk)
    assert 1.0 < walk < 3.0
    print(
        f"accept_len simulated {simulated:.3f}, replayed {replay['tokens_per_step']:.3f}, "
        f"measured tokens/step {measured:.3f}"
    )
    assert abs(simulated - measured) <= 0.1 * measured, (simulated, measured)


def test_eval_in_microbatches_adds_up_to_the_whole_batch():
    """train.microbatches also slices evaluation: the same sums (counts exact, float sums to
    rounding), the accept walks of every row included."""
    config = _config("model.mtp_depth=2", "loss.chunk_size=0")
    model, _, state, batch = _state_and_batch(config)
    assert batch["tokens"].shape[0] % 2 == 0
    whole = jax.jit(make_eval_step(config, model))(state.params, batch)
    config.train.microbatches = 2
    sliced = jax.jit(make_eval_step(config, model))(state.params, batch)
    assert whole.keys() == sliced.keys()
    for key in whole:
        np.testing.assert_allclose(sliced[key], whole[key], rtol=1e-6, err_msg=key)
    assert float(whole["accept_walk_count"]) > batch["tokens"].shape[0]  # several steps per row
