"""Inference: cached decoding == full forward, speculative == plain greedy, rejection sampling
keeps the trunk's distribution, caches roll back, and the CLI's error paths.

One model shape (vocab 31, D=3) per layout serves every test: its D=1 and D=2 variants are the
same parameters with the depth axis sliced, and the randomly initialised and the briefly
trained parameters share the compiled decode loops.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_model_config

import mtp_jax
from mtp_jax.cli import generate as cli
from mtp_jax.inference import DecodeResult, Sampler, generate, speculative_generate
from mtp_jax.inference.decode import _COMPILED
from mtp_jax.inference.speculative import draft_tokens, speculative_decode_state
from mtp_jax.model.layers import KVCache


def _stacked(caches) -> KVCache:
    """Per-layer KVCaches [B, L, K, H] -> one with leaves [n, B, L, K, H]."""
    return KVCache(jnp.stack([c.k for c in caches]), jnp.stack([c.v for c in caches]))


VOCAB, DEPTH, PROMPT, NEW = 31, 3, 8, 16
LENGTHS = np.array([8, 5, 2])
CFG = dict(vocab_size=VOCAB, d_model=64, head_dim=16, mlp_dim=128, mtp_depth=DEPTH)


def _successor() -> np.ndarray:
    """A fixed random cyclic permutation f of the vocabulary (one cycle)."""
    order = np.random.default_rng(0).permutation(VOCAB)
    successor = np.empty(VOCAB, np.int32)
    successor[order] = np.roll(order, -1)
    return successor


def _cycle_walks(key, batch: int, length: int) -> jax.Array:
    """[batch, length] rows with t[i+1] = f(t[i])."""
    start = jax.random.randint(key, (batch,), 0, VOCAB)
    succ = jnp.asarray(_successor())
    cols = [start]
    for _ in range(length - 1):
        cols.append(succ[cols[-1]])
    return jnp.stack(cols, axis=1)


def _init(cfg, seed: int = 0, init_std: float = 0.3):
    """Random parameters drawn like `Model.init`'s (norm scales 1, embedding N(0, 1), kernels
    N(0, init_std)) without its slow eager init. A large init_std gives varied greedy outputs
    (with the default 0.02 the tied embedding makes a random model repeat its last token)."""
    tokens = jnp.zeros((1, 4 + cfg.mtp_depth), jnp.int32)
    shapes = nn.unbox(jax.eval_shape(mtp_jax.Model(cfg).init, jax.random.key(0), tokens))
    leaves, tree = jax.tree_util.tree_flatten_with_path(shapes["params"])
    keys = jax.random.split(jax.random.key(seed), len(leaves))

    def draw(path, leaf, key):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return jnp.ones(leaf.shape, leaf.dtype)
        std = 1.0 if "embedding" in name else init_std
        return std * jax.random.normal(key, leaf.shape, leaf.dtype)

    return jax.tree.unflatten(tree, [draw(p, x, k) for (p, x), k in zip(leaves, keys)])


def _train(cfg, steps: int = 150, seq: int = PROMPT + NEW, batch: int = 32):
    """A few Adam steps on cycle walks: every depth learns t[i+k+1] = f^(k+1)(t[i])."""
    model = mtp_jax.Model(cfg)
    params = _init(cfg, init_std=0.02)
    opt = optax.adam(3e-3)
    lambdas = jnp.ones(cfg.mtp_depth)

    def loss(p, window):
        return mtp_jax.loss_and_metrics(model, p, {"tokens": window}, lambdas)[0]

    @jax.jit
    def run(params):
        def step(carry, key):
            params, opt_state = carry
            grads = jax.grad(loss)(params, _cycle_walks(key, batch, seq + cfg.mtp_depth + 1))
            updates, opt_state = opt.update(grads, opt_state)
            return (optax.apply_updates(params, updates), opt_state), None

        keys = jax.random.split(jax.random.key(1), steps)
        return jax.lax.scan(step, (params, opt.init(params)), keys)[0][0]

    return run(params)


def _sliced(cfg, params, depth: int):
    """The same model with only its first `depth` MTP depths (or heads)."""
    sub = jax.tree.map(lambda p: p[:depth], params["mtp"])
    return mtp_jax.Model(dataclasses.replace(cfg, mtp_depth=depth)), {**params, "mtp": sub}


@pytest.fixture(scope="module", params=["sequential", "parallel"])
def layout_models(request):
    """(config, random params, trained params) of one layout, D=3."""
    cfg = tiny_model_config(mtp_layout=request.param, **CFG)
    return cfg, _init(cfg), _train(cfg)


def _prompts(key=2):
    return jax.random.randint(jax.random.key(key), (len(LENGTHS), PROMPT), 0, VOCAB)


def _cycle_prompts():
    return _cycle_walks(jax.random.key(3), len(LENGTHS), PROMPT)


# --------------------------------------------------------------------------- cached == full


def test_cached_trunk_and_mtp_logits_equal_full_forward():
    """Prefill 6 positions, then one position at a time, through the model's decoding API:
    every depth's logits match the training forward, for both layouts, with the stacked
    parameters sliced inside the step and with `prepare`'s per-layer copies; also a chain of
    one shared depth reading the normed trunk state (model.mtp_share_depths, mtp_chain_input)."""
    for extra in (
        dict(mtp_layout="sequential"),
        dict(mtp_layout="parallel"),
        dict(mtp_layout="sequential", mtp_share_depths=True, mtp_chain_input="normed"),
    ):
        cfg = tiny_model_config(**extra, **CFG)
        model, params = mtp_jax.Model(cfg), _init(cfg)
        seq = 9
        tokens = jax.random.randint(jax.random.key(4), (2, seq + DEPTH), 0, VOCAB)
        full = jax.jit(model.apply)({"params": params}, tokens).logits  # [D+1, B, S, V]
        dec = model.decoder()
        for view in (dec.view(params), dec.prepare(params)):
            _check_cached_steps(dec, view, tokens, seq, full)


def _check_cached_steps(dec, view, tokens, seq, full, split=6):
    @jax.jit
    def cached(view):
        cache = dec.init_cache(2, seq + 4)
        trunk, mtp, got0, gotk = cache.trunk, cache.mtp, [], []
        for lo, hi in [(0, split)] + [(i, i + 1) for i in range(split, seq)]:
            pos = jnp.broadcast_to(jnp.arange(lo, hi), (2, hi - lo))
            h0, logits, trunk = dec.trunk_step(view, tokens[:, lo:hi], pos, trunk)
            logits_k, mtp = dec.mtp_step(view, h0, tokens, pos, mtp)
            got0.append(logits)
            gotk.append(logits_k)
        return got0, gotk

    got0, gotk = cached(view)
    np.testing.assert_allclose(jnp.concatenate(got0, 1), full[0], atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(jnp.concatenate(gotk, 2), full[1:], atol=2e-4, rtol=1e-4)


def test_plain_greedy_equals_argmax_of_full_forward():
    """Greedy decoding re-derived with full forwards over the growing sequence."""
    cfg = tiny_model_config(**CFG)
    model, params = mtp_jax.Model(cfg), _init(cfg)
    prompts = _prompts()
    res = generate(model, params, prompts, LENGTHS, max_new_tokens=NEW)
    assert isinstance(res, DecodeResult) and res.tokens.shape == (len(LENGTHS), NEW)
    forward = jax.jit(lambda x: model.apply({"params": params}, x).logits[0])
    width = PROMPT + 6 + DEPTH  # causal: padding past a position does not change its logits
    for b, n in enumerate(LENGTHS):
        seq = np.asarray(prompts[b, :n]).tolist()
        for _ in range(6):
            x = jnp.asarray([seq + [0] * (width - len(seq))])
            seq.append(int(forward(x)[0, len(seq) - 1].argmax()))
        assert res.tokens[b, :6].tolist() == seq[n:], b


# --------------------------------------------------------------------------- greedy equality


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_greedy_speculative_equals_plain_random_init(layout_models, depth):
    cfg, params, _ = layout_models
    model, params = _sliced(cfg, params, depth)
    prompts = _prompts()
    plain = generate(model, params, prompts, LENGTHS, max_new_tokens=NEW)
    spec = speculative_generate(model, params, prompts, LENGTHS, max_new_tokens=NEW)
    assert len(set(plain.tokens[:, -1].tolist())) > 1, "degenerate outputs prove nothing"
    np.testing.assert_array_equal(spec.tokens, plain.tokens)
    np.testing.assert_array_equal(spec.num_generated, [NEW] * len(LENGTHS))
    assert len(spec.stats["acceptance"]) == depth
    assert spec.stats["steps"] <= NEW - 1


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_greedy_speculative_equals_plain_trained(layout_models, depth):
    """On a model that learned the cycle, drafts are accepted and outputs still match."""
    cfg, _, params = layout_models
    model, params = _sliced(cfg, params, depth)
    prompts = _cycle_prompts()
    plain = generate(model, params, prompts, LENGTHS, max_new_tokens=NEW)
    spec = speculative_generate(model, params, prompts, LENGTHS, max_new_tokens=NEW)
    np.testing.assert_array_equal(spec.tokens, plain.tokens)
    # The trained trunk follows the cycle: t[i+1] = f(t[i]).
    succ = _successor()
    last = np.asarray(prompts)[np.arange(len(LENGTHS)), LENGTHS - 1]
    assert (plain.tokens[:, 0] == succ[last]).all()
    assert (plain.tokens[:, 1:] == succ[plain.tokens[:, :-1]]).all()
    assert min(spec.stats["acceptance"]) > 0.8, spec.stats
    assert spec.stats["mean_accepted"] > 1 + 0.8 * depth, spec.stats
    assert spec.stats["steps"] < NEW / (1 + 0.5 * depth)


@pytest.mark.parametrize("trained", [False, True])
def test_drafted_provenance(layout_models, trained):
    """stats['drafted'] marks accepted drafts: one flag per generated token, as many True as the
    accepted drafts counted on the device, the first token (the prefill's) and each step's last
    one the trunk's; most tokens of the trained cycle model are drafts, almost none of a random
    one."""
    cfg, random_params, trained_params = layout_models
    params = trained_params if trained else random_params
    model = mtp_jax.Model(cfg)
    prompts = _cycle_prompts() if trained else _prompts()
    spec = speculative_generate(model, params, prompts, LENGTHS, max_new_tokens=NEW)
    drafted = spec.stats["drafted"]
    assert [len(row) for row in drafted] == spec.num_generated.tolist()
    assert all(isinstance(flag, bool) for row in drafted for flag in row)
    assert [sum(row) for row in drafted] == spec.stats["accepted_drafts"]
    # Each verify step emits its accepted drafts, then exactly one trunk token: no run of
    # drafts is longer than D, and the first token is the trunk's.
    for row in drafted:
        assert not row[0]
        runs = "".join("d" if f else "t" for f in row).split("t")
        assert max(len(r) for r in runs) <= DEPTH
    total = sum(len(row) for row in drafted)
    fraction = sum(map(sum, drafted)) / total
    # The trunk's tokens are the first one plus one per verify step (the last may be cut off).
    trunk_tokens = total - sum(map(sum, drafted))
    assert trunk_tokens <= len(LENGTHS) + spec.stats["steps"] * len(LENGTHS)
    if trained:
        assert fraction > 0.6, fraction
    else:
        assert fraction < 0.3, fraction


def test_eos_stops_each_row():
    """A row ends at its first EOS (included); speculative and plain agree on where."""
    cfg = tiny_model_config(**CFG)
    model, params = mtp_jax.Model(cfg), _init(cfg)
    prompts = _prompts()
    free = generate(model, params, prompts, LENGTHS, max_new_tokens=NEW)
    eos = int(free.tokens[0, 3])  # row 0 stops at its 4th token, others maybe later
    plain = generate(model, params, prompts, LENGTHS, max_new_tokens=NEW, eos_id=eos, pad_id=-1)
    spec = speculative_generate(
        model, params, prompts, LENGTHS, max_new_tokens=NEW, eos_id=eos, pad_id=-1
    )
    for res in (plain, spec):
        for b in range(len(LENGTHS)):
            n = res.num_generated[b]
            row = free.tokens[b].tolist()
            want = row.index(eos) + 1 if eos in row else NEW
            assert n == want
            assert res.tokens[b, :n].tolist() == row[:n]
            assert (res.tokens[b, n:] == -1).all()
    assert plain.num_generated[0] <= 4


# --------------------------------------------------------------------------- rollback


def test_caches_after_rejections_equal_a_clean_run(layout_models):
    """After decoding with many rejected drafts, the next draft phase sees caches equal to those
    of a fresh prefill over the accepted tokens (plus the new drafts) alone, and its draft
    distributions equal the full forward's."""
    cfg, params, _ = layout_models
    model = mtp_jax.Model(cfg)
    s, _, _ = speculative_decode_state(model, params, _prompts(), LENGTHS, max_new_tokens=NEW)
    s = jax.tree.map(jnp.asarray, s)
    n = np.asarray(s.n)
    assert (n >= LENGTHS + NEW).all()
    # Draw from q (not argmax), so the drafts are arbitrary tokens.
    sampler = Sampler(temperature=1.0)
    dec = model.decoder()
    view = dec.prepare(params)
    draft = jax.jit(lambda p, s, key: draft_tokens(dec, sampler, p, s, key))
    drafts, q, seq, mtp = draft(view, s, jax.random.key(5))
    mtp, s_trunk = _stacked(mtp), _stacked(s.trunk)

    @jax.jit
    def reference(view, seq):
        ref = dec.init_cache(len(LENGTHS), seq.shape[1])
        pos = jnp.broadcast_to(jnp.arange(seq.shape[1]), seq.shape)
        h0, _, trunk = dec.trunk_step(view, seq, pos, ref.trunk)
        logits, mtp = dec.mtp_step(view, h0, seq, pos, ref.mtp)
        return h0, _stacked(trunk), _stacked(mtp), logits

    h0, trunk, mtp_ref, logits = reference(view, seq)
    slots = np.arange(seq.shape[1])
    stale_differs = False
    for b in range(len(LENGTHS)):
        np.testing.assert_array_equal(seq[b, n[b] : n[b] + DEPTH], drafts[b])
        ok = slots <= n[b] - 2  # the trunk has consumed t[0 .. n-2]; the drafter reads there
        pairs = [(s_trunk.k, trunk.k), (s_trunk.v, trunk.v)]
        pairs += [(mtp.k, mtp_ref.k), (mtp.v, mtp_ref.v)]
        for got, want in pairs:
            np.testing.assert_allclose(got[:, b, ok], want[:, b, ok], atol=5e-4, rtol=1e-4)
        stale_differs |= not np.allclose(
            s_trunk.k[:, b, n[b] - 1], trunk.k[:, b, n[b] - 1], atol=1e-3
        )
        np.testing.assert_allclose(s.hist[b, ok], h0[b, ok], atol=5e-4, rtol=1e-4)
        want_q = jax.nn.softmax(logits[:, b, n[b] - 2], -1)  # [D, V]
        np.testing.assert_allclose(q[b], want_q, atol=1e-4)
    # The last step rejected a draft somewhere: its key still sits past the accepted tokens.
    assert stale_differs


def test_rollback_at_the_layer_level():
    """Writing rejected tokens into the cache and then decoding from the earlier position gives
    the logits of a cache that never saw them."""
    cfg = tiny_model_config(**CFG)
    model, params = mtp_jax.Model(cfg), _init(cfg)
    dec = model.decoder()

    @jax.jit
    def run(params):
        def apply(toks, cache):
            pos = jnp.asarray([[p for p, _ in toks]])
            tokens = jnp.asarray([[t for _, t in toks]])
            return dec.trunk_step(params, tokens, pos, cache)[1:]

        empty = mtp_jax.init_cache(cfg, 1, 8).trunk
        _, clean = apply([(0, 1), (1, 2), (2, 3)], empty)
        _, dirty = apply([(0, 1), (1, 2), (2, 7), (3, 8)], empty)  # drafts 7, 8 rejected
        want, _ = apply([(3, 4)], clean)
        stale, _ = apply([(3, 4)], dirty)
        got, _ = apply([(2, 3), (3, 4)], dirty)  # re-decode from position 2
        return want[:, 0], stale[:, 0], got[:, 1]

    want, stale, got = run(dec.prepare(params))
    assert not np.allclose(want, stale, atol=1e-4)  # without rollback the answer differs
    np.testing.assert_allclose(got, want, atol=1e-5)


# --------------------------------------------------------------------------- sampling


def _exact_first_two(model, params, prompt, sampler):
    """Exact distributions of the 1st and 2nd sampled tokens, and the drafter's for the 2nd."""
    pad = [0] * model.config.mtp_depth
    # Row x: the prompt, then token x (row VOCAB: the prompt alone, padded).
    rows = [prompt + [x] + pad for x in range(VOCAB)] + [prompt + [0] + pad]
    probs = jax.jit(lambda x: sampler.probs(model.apply({"params": params}, x).logits))
    out = np.asarray(probs(jnp.asarray(rows)), np.float64)  # [D+1, V+1, P+1, V]
    p1 = out[0, VOCAB, -2]
    p2 = p1 @ out[0, :VOCAB, -1]  # sum_x p1(x) p(. | prompt, x)
    q2 = p1 @ out[1, :VOCAB, -2]  # depth 1 at the prompt's last position, fed x
    return p1, p2, q2


def _chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    from scipy import stats

    keep = probs * counts.sum() >= 5  # pool the rare tokens into one cell
    obs = np.append(counts[keep], counts[~keep].sum())
    exp = np.append(probs[keep], probs[~keep].sum())
    exp = exp / exp.sum() * counts.sum()
    obs, exp = obs[exp > 0], exp[exp > 0]
    return float(stats.chisquare(obs, exp).pvalue)


@pytest.mark.parametrize(
    "layout,sampling",
    [
        ("sequential", dict(temperature=3.0)),
        ("parallel", dict(temperature=3.0, top_k=8, top_p=0.9)),
    ],
)
def test_rejection_sampling_keeps_the_trunk_distribution(layout, sampling):
    cfg = tiny_model_config(mtp_layout=layout, **dict(CFG, mtp_depth=2))
    model, params = mtp_jax.Model(cfg), _init(cfg, seed=7)
    prompt = [3, 1, 4, 1, 5]
    batch = 4000
    p1, p2, q2 = _exact_first_two(model, params, prompt, Sampler(**sampling))
    # The test has power: a sampler that kept every draft would show q2, far from p2.
    assert 0.5 * np.abs(p2 - q2).sum() > 0.2
    prompts, lengths = np.tile(prompt, (batch, 1)), np.full(batch, len(prompt))
    kw = dict(max_new_tokens=3, rng=jax.random.key(11), **sampling)
    spec = speculative_generate(model, params, prompts, lengths, **kw)
    results = [spec]
    if layout == "sequential":  # plain sampling once is enough
        results.append(generate(model, params, prompts, lengths, **kw))
    assert 0.05 < spec.stats["acceptance"][0] < 0.95, spec.stats  # both branches taken
    for res in results:
        for j, probs in [(0, p1), (1, p2)]:
            counts = np.bincount(res.tokens[:, j], minlength=VOCAB)
            assert counts[probs == 0].sum() == 0  # filtered tokens are never drawn
            assert _chi2_pvalue(counts, probs) > 1e-3, (j, counts, probs * batch)


def test_sampler_filters():
    logits = jnp.log(jnp.asarray([0.05, 0.4, 0.1, 0.3, 0.15]))
    np.testing.assert_allclose(Sampler(1.0).probs(logits), [0.05, 0.4, 0.1, 0.3, 0.15], atol=1e-6)
    np.testing.assert_allclose(Sampler(1.0, top_k=2).probs(logits), [0, 4 / 7, 0, 3 / 7, 0])
    np.testing.assert_allclose(
        Sampler(1.0, top_p=0.75).probs(logits), [0, 0.4 / 0.85, 0, 0.3 / 0.85, 0.15 / 0.85]
    )
    np.testing.assert_allclose(Sampler(0.0).probs(logits), [0, 1, 0, 0, 0])
    with pytest.raises(ValueError, match="top_p"):
        Sampler(1.0, top_p=0.0)


def test_prompt_widths_share_a_compiled_loop(layout_models):
    """Prompts 9 and 13 columns wide (row lengths 9, 4, 7) run one compiled loop per decoder,
    and whatever the caller left past each row's length does not change its tokens."""
    cfg, params, _ = layout_models
    model = mtp_jax.Model(cfg)
    lengths = np.array([9, 4, 7])
    wide = np.array(jax.random.randint(jax.random.key(5), (3, 13), 0, VOCAB))
    narrow = np.array(jax.random.randint(jax.random.key(4), (3, 9), 0, VOCAB))
    for b, n in enumerate(lengths):
        wide[b, :n] = narrow[b, :n]
    for decode in (generate, speculative_generate):
        first = decode(model, params, narrow, lengths, max_new_tokens=11)
        compiled = len(_COMPILED)
        second = decode(model, params, wide, lengths, max_new_tokens=11)
        assert len(_COMPILED) == compiled and second.stats["compile_seconds"] == 0
        np.testing.assert_array_equal(second.tokens, first.tokens)
        assert len(set(first.tokens[:, -1].tolist())) > 1


def test_decoding_sharded_over_eight_devices_gives_the_tokens_of_one(layout_models):
    """Parameters in their training shardings on a (data 2, fsdp 2, tensor 2) mesh of 8 CPU
    devices: plain and speculative greedy decoding give exactly the one-device tokens."""
    from mtp_jax.config import ConfigDict
    from mtp_jax.sharding import logical_shardings, make_mesh

    cfg, params, _ = layout_models
    model = mtp_jax.Model(cfg)
    mesh = make_mesh(ConfigDict({"data": 2, "fsdp": 2, "tensor": 2}))
    tokens = jnp.zeros((1, 4 + cfg.mtp_depth), jnp.int32)
    boxed = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
    sharded = jax.device_put(params, logical_shardings(boxed, mesh))
    query = sharded["trunk"]["layers"]["block"]["attn"]["query"]
    assert len(query.sharding.device_set) == 8 and not query.sharding.is_fully_replicated
    prompts = _prompts()
    for decode in (generate, speculative_generate):
        one = decode(model, params, prompts, LENGTHS, max_new_tokens=NEW)
        eight = decode(model, sharded, prompts, LENGTHS, max_new_tokens=NEW)
        assert len(set(one.tokens[:, -1].tolist())) > 1, "degenerate outputs prove nothing"
        np.testing.assert_array_equal(eight.tokens, one.tokens)
        np.testing.assert_array_equal(eight.num_generated, one.num_generated)


# --------------------------------------------------------------------------- errors and CLI


def test_bad_inputs_are_rejected():
    cfg = tiny_model_config(**CFG)
    model, params = mtp_jax.Model(cfg), {}
    with pytest.raises(ValueError, match="lengths"):
        generate(model, params, np.zeros((2, 4)), [5, 1], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, params, np.zeros((2, 4)), [4, 1], max_new_tokens=0)
    with pytest.raises(ValueError, match="mtp_depth"):
        no_mtp = mtp_jax.Model(dataclasses.replace(cfg, mtp_depth=0))
        speculative_generate(no_mtp, params, np.zeros((1, 4)), [4], max_new_tokens=2)


def test_cli_missing_workdir(tmp_path, capsys):
    assert cli.main(["--workdir", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


def test_cli_workdir_without_checkpoint(tmp_path, capsys):
    assert cli.main(["--workdir", str(tmp_path), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "Traceback" not in err
