"""Multi-head latent attention (model.attention='mla'): cached == full forward, the compressed
cache, speculative == plain greedy, absorbed == non-absorbed, causality, FLOPs and config."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import CONFIGS, tiny_model_config

import mtp_jax
from mtp_jax.config import ConfigError, load_config
from mtp_jax.inference import generate, speculative_generate
from mtp_jax.loss import mtp_targets
from mtp_jax.model.mla import (
    LatentCache,
    MLAttention,
    absorbed_attention,
    mla_flops_per_token,
    mla_param_count,
    naive_attention,
)

VOCAB, DEPTH, SEQ = 64, 2, 8
MLA = dict(
    attention="mla",
    vocab_size=VOCAB,
    d_model=32,
    n_layers=2,
    n_heads=4,
    head_dim=8,
    kv_lora_rank=16,
    qk_rope_head_dim=4,
    mtp_depth=DEPTH,
)


def _cfg(**overrides):
    return tiny_model_config(**{**MLA, "init_std": 0.3, **overrides})


def _random(shape, std=1.0, seed=0):
    """Normals drawn on the host (jax.random would compile once per shape)."""
    return jnp.asarray(std * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _draw(shapes, std):
    """Parameters for a tree of abstract (unboxed) arrays: norm scales 1, an embedding N(0, 1)
    (varied greedy outputs: with a small tied embedding a random model repeats its last token),
    the rest N(0, std)."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(shapes)

    def draw(i, path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return jnp.asarray(np.ones(leaf.shape, np.float32))
        return _random(leaf.shape, 1.0 if "embedding" in name else std, seed=i)

    return jax.tree.unflatten(tree, [draw(i, p, x) for i, (p, x) in enumerate(leaves)])


@functools.cache
def _params(cfg, std=None):
    """Random parameters of `Model(cfg)` (std: cfg.init_std), shaped by `eval_shape` (no
    compiled init)."""
    tokens = jnp.zeros((1, 4 + cfg.mtp_depth), jnp.int32)
    shapes = jax.eval_shape(mtp_jax.Model(cfg).init, jax.random.key(0), tokens)
    return _draw(nn.unbox(shapes)["params"], cfg.init_std if std is None else std)


def _tokens(batch=2, seed=4):
    tokens = np.random.default_rng(seed).integers(0, VOCAB, (batch, SEQ + DEPTH))
    return jnp.asarray(tokens, jnp.int32)


# --------------------------------------------------------------------------- cached == full


@pytest.mark.parametrize("layout", ["sequential", "parallel"])
@pytest.mark.parametrize("q_lora_rank", [0, 12])
def test_cached_token_by_token_equals_full_forward(layout, q_lora_rank):
    """The trunk's and every depth's logits from `Decoder` steps of one token (a scan over
    positions, latent caches as the carry) equal `Model.__call__` over the whole sequence."""
    cfg = _cfg(mtp_layout=layout, q_lora_rank=q_lora_rank)
    model, params, tokens = mtp_jax.Model(cfg), _params(cfg), _tokens()
    full = jax.jit(model.apply)({"params": params}, tokens).logits  # [D+1, B, S, V]
    dec = model.decoder()

    @jax.jit
    def cached(params):
        view = dec.view(params)

        def step(caches, pos):
            trunk, mtp = caches
            pos = jnp.full((2, 1), pos)
            h0, logits, trunk = dec.trunk_step(view, jnp.take(tokens, pos[0], axis=1), pos, trunk)
            logits_k, mtp = dec.mtp_step(view, h0, tokens, pos, mtp)
            return (trunk, mtp), (logits[:, 0], logits_k[:, :, 0])

        cache = dec.init_cache(2, SEQ + 2)
        _, (got0, gotk) = jax.lax.scan(step, (cache.trunk, cache.mtp), jnp.arange(SEQ))
        return jnp.moveaxis(got0, 0, 1), jnp.moveaxis(gotk, 0, 2)  # [B, S, V], [D, B, S, V]

    got0, gotk = cached(params)
    assert float(jnp.abs(full[1:] - full[:1]).max()) > 1e-2  # the depths differ from the trunk
    np.testing.assert_allclose(got0, full[0], atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(gotk, full[1:], atol=2e-4, rtol=1e-4)


def test_cache_holds_only_the_latent_and_the_rope_key():
    """kv_lora_rank + qk_rope_head_dim values per token and layer (and depth): no K/V heads."""
    cfg = _cfg()
    batch, slots = 3, 10
    cache = mtp_jax.Model(cfg).decoder().init_cache(batch, slots)
    layers = cache.trunk + cache.mtp
    assert len(layers) == cfg.n_layers + cfg.mtp_depth
    for layer in layers:
        assert isinstance(layer, LatentCache)
        assert layer.latent.shape == (batch, slots, cfg.kv_lora_rank)
        assert layer.rope_key.shape == (batch, slots, cfg.qk_rope_head_dim)
    per_token = sum(x.size for x in jax.tree.leaves(cache)) // (batch * slots * len(layers))
    assert per_token == cfg.kv_lora_rank + cfg.qk_rope_head_dim == 20
    mha = dataclasses.replace(cfg, attention="mha")  # 2 K H = 32 values per token and layer
    assert jax.tree.leaves(mtp_jax.Model(mha).decoder().init_cache(1, 1))[0].shape[-2:] == (2, 8)


# --------------------------------------------------------------------------- speculative


def _cycle_walks(key, batch: int, length: int) -> jax.Array:
    """[batch, length] rows with t[i+1] = f(t[i]) for a fixed random cycle f of the vocabulary."""
    order = np.random.default_rng(0).permutation(VOCAB)
    successor = np.empty(VOCAB, np.int32)
    successor[order] = np.roll(order, -1)
    walks = np.zeros((VOCAB, length), np.int32)
    walks[:, 0] = np.arange(VOCAB)
    for i in range(1, length):
        walks[:, i] = successor[walks[:, i - 1]]
    return jnp.asarray(walks)[jax.random.randint(key, (batch,), 0, VOCAB)]


def _trained(cfg, steps: int = 40):
    """A few Adam steps on cycle walks, so that every depth learns t[i+k+1] = f^(k+1)(t[i])."""
    model, params = mtp_jax.Model(cfg), _params(cfg)
    opt = optax.adam(1e-2)

    def loss(p, window):  # [B, S+D+1]: the mean cross entropy of every depth
        logits = model.apply({"params": p}, window[:, :-1]).logits
        targets, _ = mtp_targets(window, None, cfg.mtp_depth)
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1).mean()

    @jax.jit
    def run(params):
        def step(carry, key):
            params, opt_state = carry
            grads = jax.grad(loss)(params, _cycle_walks(key, 16, SEQ + cfg.mtp_depth + 1))
            updates, opt_state = opt.update(grads, opt_state)
            return (optax.apply_updates(params, updates), opt_state), None

        keys = jax.random.split(jax.random.key(1), steps)
        return jax.lax.scan(step, (params, opt.init(params)), keys)[0][0]

    return model, run(params)


def test_greedy_speculative_equals_plain():
    """Speculative decoding gives exactly plain cached greedy decoding's tokens: on a random
    model, whose tokens depend on the whole context (drafts mostly rejected, so latent caches
    are rolled back by rewriting), and on one trained on cycle walks (drafts mostly accepted).
    Both share one compiled loop per decoder."""
    cfg = _cfg(init_std=0.02, q_lora_rank=12)
    model, trained = _trained(cfg)
    prompts, lengths = _cycle_walks(jax.random.key(3), 3, SEQ), np.array([8, 5, 2])
    for params in (_params(cfg, std=0.3), trained):
        plain = generate(model, params, prompts, lengths, max_new_tokens=12)
        spec = speculative_generate(model, params, prompts, lengths, max_new_tokens=12)
        assert len(set(plain.tokens[:, -1].tolist())) > 1, "degenerate outputs prove nothing"
        np.testing.assert_array_equal(spec.tokens, plain.tokens)
    assert min(spec.stats["acceptance"]) > 0.5, spec.stats
    assert spec.stats["steps"] < 11, spec.stats


# --------------------------------------------------------------------------- absorbed == naive


def test_absorbed_cached_path_equals_the_non_absorbed_form():
    """The weight-absorbed scores/outputs over the latent equal per-head K/V attention; and an
    MLAttention prefill into an empty cache equals its training forward."""
    b, t, n, h, r, c = 2, 5, 4, 8, 4, 16
    q_nope, q_rope = _random((b, t, n, h), seed=0), _random((b, t, n, r), seed=1)
    latent, rope_key = _random((b, t, c), seed=2), _random((b, t, r), seed=3)
    w_uk, w_uv = _random((c, n, h), seed=4), _random((c, n, h), seed=5)
    mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
    k_nope, v = jnp.einsum("blc,cnh->blnh", latent, w_uk), jnp.einsum("blc,cnh->blnh", latent, w_uv)
    naive = naive_attention(q_nope, q_rope, k_nope, rope_key, v, 0.3, mask)
    absorbed = absorbed_attention(q_nope, q_rope, latent, rope_key, w_uk, w_uv, 0.3, mask)
    other = absorbed_attention(q_nope, q_rope, latent, rope_key, w_uk, w_uv, 0.3, ~mask | mask)
    assert float(jnp.abs(other - naive).max()) > 1e-2  # the comparison can tell
    np.testing.assert_allclose(absorbed, naive, atol=1e-5, rtol=1e-5)

    cfg = _cfg(q_lora_rank=12)
    x, pos = _random((b, t, cfg.d_model), seed=6), jnp.asarray(np.tile(np.arange(t), (b, 1)))
    attn = MLAttention(cfg)
    variables = _draw(nn.unbox(jax.eval_shape(attn.init, jax.random.key(0), x, pos)), 0.3)
    cache = LatentCache(jnp.zeros((b, t + 3, c)), jnp.zeros((b, t + 3, r)))
    (train_out, none), (cached_out, new) = jax.jit(
        lambda v: (attn.apply(v, x, pos), attn.apply(v, x, pos, None, cache))
    )(variables)
    assert none is None and new.latent.shape == cache.latent.shape
    assert float(jnp.abs(new.latent[:, :t]).min()) > 0 and not new.latent[:, t:].any()
    np.testing.assert_allclose(cached_out, train_out, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- causality


@pytest.mark.parametrize("layout, q_lora_rank", [("sequential", 0), ("parallel", 12)])
def test_causality_of_every_depth(layout, q_lora_rank):
    """Perturbing token j moves logits[k, :, i] iff j <= i + k (sequential) / j <= i (parallel)."""
    cfg = _cfg(mtp_layout=layout, q_lora_rank=q_lora_rank)
    model, params, tokens = mtp_jax.Model(cfg), _params(cfg), _tokens(batch=1)
    n = SEQ + DEPTH
    # Row j of the batch has token j replaced; row n is the unperturbed input.
    perturbed = jnp.tile(tokens, (n + 1, 1))
    perturbed = perturbed.at[jnp.arange(n), jnp.arange(n)].set((tokens[0] + 1) % VOCAB)
    logits = jax.jit(model.apply)({"params": params}, perturbed).logits  # [D+1, n+1, S, V]
    moved = np.asarray(jnp.abs(logits[:, :n] - logits[:, n:]).max(-1) > 1e-6)  # [D+1, j, i]
    j, i = np.arange(n)[:, None], np.arange(SEQ)[None, :]
    for k in range(DEPTH + 1):
        allowed = j <= i + k if layout == "sequential" else j <= i
        np.testing.assert_array_equal(moved[k], allowed, err_msg=f"depth {k}")


# --------------------------------------------------------------------------- counts, config


@pytest.mark.parametrize("q_lora_rank", [0, 12])
def test_param_count_and_flops(q_lora_rank):
    """mla_param_count matches MLAttention's parameters; mla_flops_per_token matches XLA's count
    of the layer's forward (its matmuls dominate; XLA adds softmax, norms and RoPE)."""
    cfg = _cfg(q_lora_rank=q_lora_rank, d_model=128, n_heads=4, head_dim=32, kv_lora_rank=64)
    seq = 64
    x = jnp.zeros((1, seq, cfg.d_model))
    pos = jnp.arange(seq)[None]
    attn = MLAttention(cfg)
    shapes = jax.eval_shape(attn.init, jax.random.key(0), x, pos)
    assert mla_param_count(cfg) == sum(a.size for a in jax.tree.leaves(nn.unbox(shapes)))
    cost = jax.jit(lambda p: attn.apply(p, x, pos)[0]).lower(nn.unbox(shapes)).compile()
    cost = cost.cost_analysis()
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
    ours = mla_flops_per_token(cfg, seq) * seq
    assert abs(ours - xla) / xla < 0.05, (ours, xla)


def test_odd_rope_width_is_a_config_error_naming_the_key():
    load_config(CONFIGS / "smoke.py", ["model.attention=mla", "model.qk_rope_head_dim=4"])
    with pytest.raises(ConfigError, match="model.qk_rope_head_dim"):
        load_config(CONFIGS / "smoke.py", ["model.attention=mla", "model.qk_rope_head_dim=3"])


def test_mla_has_no_key_value_heads_to_divide_and_rotates_only_the_rope_part():
    """Under MLA, n_kv_heads is unused and head_dim (the unrotated part) may be odd; both are
    config errors for GQA."""
    odd = ["model.n_kv_heads=3", "model.head_dim=7"]
    config = load_config(CONFIGS / "smoke.py", ["model.attention=mla", *odd])
    cfg = tiny_model_config(**{**MLA, "head_dim": 7, "n_kv_heads": 3})
    tokens = jnp.zeros((1, SEQ + DEPTH), jnp.int32)
    model = mtp_jax.Model(cfg)
    params = jax.eval_shape(model.init, jax.random.key(0), tokens)  # traced, not compiled
    logits = jax.eval_shape(model.apply, params, tokens).logits
    assert config.model.head_dim == 7 and logits.shape == (DEPTH + 1, 1, SEQ, VOCAB)
    for key in odd:
        with pytest.raises(ConfigError, match=key.split("=")[0]):
            load_config(CONFIGS / "smoke.py", [key])
