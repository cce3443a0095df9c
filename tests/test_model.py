"""The MTP contract: shapes, causality of every depth, scan == unrolled, shared weights, FLOPs."""

from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_every_depth_causal, tiny_model_config

import mtp_jax
from mtp_jax.loss import mtp_targets, weighted_cross_entropy
from mtp_jax.model.layers import Block
from mtp_jax.model.mtp import MTPDepth


def _init(cfg, seq, batch=2, seed=0):
    model = mtp_jax.Model(cfg)
    tokens = jax.random.randint(jax.random.key(seed + 1), (batch, seq + cfg.mtp_depth), 0, 97)
    params = nn.unbox(model.init(jax.random.key(seed), tokens))["params"]
    return model, params, tokens


def test_output_shapes_and_public_api():
    cfg = mtp_jax.load_config("configs/smoke.py", ["model.mtp_depth=3"])
    model = mtp_jax.Model(cfg.model)
    tokens = jnp.zeros((2, 8 + 3), jnp.int32)
    variables = model.init(jax.random.key(0), tokens)
    out = model.apply(variables, tokens)
    assert out.logits.shape == (4, 2, 8, cfg.model.vocab_size)
    assert out.hidden.shape == (4, 2, 8, cfg.model.d_model)
    assert out.logits.dtype == jnp.float32
    with pytest.raises(ValueError, match="S \\+ 3 tokens"):
        model.apply(variables, tokens[:, :3])


@pytest.mark.parametrize("layout", ["sequential", "parallel"])
@pytest.mark.parametrize("depth", [1, 3])
def test_causality_of_every_depth(layout, depth):
    """Perturbing token j moves logits[k, :, i] iff j <= i + k (sequential) / j <= i (parallel)."""
    seq = 8
    cfg = tiny_model_config(mtp_depth=depth, mtp_layout=layout)
    model, params, tokens = _init(cfg, seq, batch=1)
    assert_every_depth_causal(model, params, tokens, layout, 97)


def _unrolled_features(cfg, params, tokens):
    """The sequential chain as a Python loop over the same stacked depth parameters."""
    model = mtp_jax.Model(cfg)
    depth, seq = cfg.mtp_depth, tokens.shape[1] - cfg.mtp_depth
    positions = jnp.broadcast_to(jnp.arange(seq), (tokens.shape[0], seq))

    def trunk(m):
        h0, _ = m.trunk(m.embed(tokens[:, :seq]), positions)
        return h0, m.final_norm(h0)

    h, out0 = model.apply({"params": params}, method=trunk)
    outs = [out0]
    for k in range(depth):
        depth_params = jax.tree.map(lambda p, k=k: p[k], params["mtp"]["depths"])
        emb = model.apply({"params": params}, tokens[:, k + 1 : k + 1 + seq], method="embed_tokens")
        h, (out, _) = MTPDepth(cfg).apply({"params": depth_params}, h, emb, positions, None, None)
        outs.append(out)
    return jnp.stack(outs)


@pytest.mark.parametrize(
    "remat_policy, scan_unroll", [("none", 1), ("full", 1), ("none", 0), ("full", 2)]
)
def test_scan_equals_unrolled_chain(remat_policy, scan_unroll):
    """The depth scan (a loop with scan_unroll=1; partly or wholly unrolled otherwise)."""
    cfg = tiny_model_config(mtp_depth=3, remat_policy=remat_policy, scan_unroll=scan_unroll)
    model, params, tokens = _init(cfg, seq=8)
    weights = jax.random.normal(jax.random.key(7), (4, 2, 8, cfg.d_model))

    def scanned(p):
        return model.apply({"params": p}, tokens, method="features")

    def unrolled(p):
        return _unrolled_features(cfg, p, tokens)

    np.testing.assert_allclose(scanned(params), unrolled(params), rtol=1e-5, atol=1e-5)
    g_scan = jax.grad(lambda p: jnp.sum(scanned(p) * weights))(params)
    g_loop = jax.grad(lambda p: jnp.sum(unrolled(p) * weights))(params)
    flat_scan, flat_loop = jax.tree.leaves(g_scan), jax.tree.leaves(g_loop)
    assert len(flat_scan) == len(flat_loop)
    for a, b in zip(flat_scan, flat_loop, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))
    # Every depth's parameters receive gradient (each depth is really used).
    mtp_grads = g_scan["mtp"]["depths"]["proj"]["kernel"]
    assert all(float(jnp.abs(mtp_grads[k]).sum()) > 0 for k in range(3))


@pytest.mark.parametrize("scan_unroll", [1, 0])
def test_scanned_trunk_equals_unrolled_trunk(scan_unroll):
    cfg = tiny_model_config(mtp_depth=1, n_layers=3, scan_unroll=scan_unroll)
    model, params, tokens = _init(cfg, seq=8)
    unrolled_cfg = tiny_model_config(mtp_depth=1, n_layers=3, scan_layers=False)
    stacked = params["trunk"]["layers"]["block"]
    unrolled = dict(params)
    unrolled["trunk"] = {
        f"layers_{i}": jax.tree.map(lambda p, i=i: p[i], stacked) for i in range(3)
    }
    a = model.apply({"params": params}, tokens).logits
    b = mtp_jax.Model(unrolled_cfg).apply({"params": unrolled}, tokens).logits
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert not np.allclose(a[0], a[1])  # depths differ: the comparison is not vacuous


def test_scan_unroll_auto_unrolls_on_cpu_only():
    """model.scan_unroll=0 unrolls the layer and depth scans on CPU (no loops in the lowered
    forward) and keeps one iteration per loop trip on other backends; n > 0 is taken as given."""
    from mtp_jax.model.layers import scan_unroll

    def loops(**overrides):
        model = mtp_jax.Model(tiny_model_config(n_layers=3, **overrides))
        tokens = jnp.zeros((1, 8 + 2), jnp.int32)
        variables = jax.eval_shape(model.init, jax.random.key(0), tokens)
        return jax.jit(model.apply).lower(variables, tokens).as_text().count("while")

    assert jax.default_backend() == "cpu"
    assert loops(scan_unroll=0) == 0
    assert loops(scan_unroll=1) == 2  # the trunk's layers and the MTP depths
    assert loops(scan_unroll=2) == 1  # 3 layers: a loop trip of 2 and 1 left; 2 depths: none
    cfg = tiny_model_config(n_layers=3)
    assert scan_unroll(cfg, 3) == 3
    assert scan_unroll(tiny_model_config(scan_unroll=5), 3) == 3
    with mock.patch.object(jax, "default_backend", return_value="tpu"):
        assert scan_unroll(cfg, 3) == 1


@pytest.mark.parametrize("tie", [True, False])
def test_mtp_shares_embedding_and_head(tie):
    cfg = tiny_model_config(mtp_depth=2, tie_embeddings=tie)
    model, params, tokens = _init(cfg, seq=8)
    window = jnp.concatenate([tokens, tokens[:, :1]], axis=1)

    def mtp_only_loss(p):
        # The training loss's fused path, with depth 0 weighted 0: depths 1..D alone.
        hidden, head = model.apply({"params": p}, window[:, :-1], method="features_and_head")
        targets, mask = mtp_targets(window, None, 2)
        weights = jnp.array([0.0, 1.0, 1.0]) / mask.sum((1, 2))
        return weighted_cross_entropy(hidden, head, targets, mask, weights, chunk_size=4)[0]

    grads = jax.grad(mtp_only_loss)(params)
    assert float(jnp.abs(grads["embed"]["embedding"]).sum()) > 0
    if not tie:
        assert float(jnp.abs(grads["head"]).sum()) > 0
    # Trunk blocks are reached too, through h^0.
    assert float(jnp.abs(grads["trunk"]["layers"]["block"]["mlp"]["up"]["kernel"]).sum()) > 0
    # No copy of the embedding or the head under the MTP subtree.
    for path, leaf in jax.tree_util.tree_leaves_with_path(params["mtp"]):
        assert cfg.vocab_size not in leaf.shape, jax.tree_util.keystr(path)


def test_mtp_block_is_a_plain_block():
    """The depth's transformer block has exactly the parameter shapes of a trunk block."""
    cfg = tiny_model_config()
    _, params, _ = _init(cfg, seq=8)
    trunk_block = jax.tree.map(lambda p: p.shape[1:], params["trunk"]["layers"]["block"])
    depth_block = jax.tree.map(lambda p: p.shape[1:], params["mtp"]["depths"]["block"])
    assert trunk_block == depth_block
    x = jnp.ones((1, 4, cfg.d_model))
    block_params = nn.unbox(Block(cfg).init(jax.random.key(0), x, jnp.arange(4)[None], None, None))[
        "params"
    ]
    assert jax.tree.map(jnp.shape, block_params) == trunk_block


@pytest.mark.parametrize("layout", ["sequential", "parallel"])
def test_model_flops_match_xla_cost_analysis(layout):
    from mtp_jax.train.step import loss_and_metrics

    # XLA's cost analysis counts a while-loop (scan) body once: unroll the trunk and use one
    # MTP depth so that everything that runs is counted once on both sides.
    cfg = tiny_model_config(
        vocab_size=512,
        d_model=128,
        n_heads=4,
        n_kv_heads=2,
        head_dim=32,
        mlp_dim=384,
        n_layers=2,
        scan_layers=False,
        mtp_depth=1,
        mtp_layout=layout,
    )
    seq, batch = 64, 2
    model, params, tokens = _init(cfg, seq=seq, batch=batch)
    window = jnp.concatenate([tokens, tokens[:, :1]], axis=1)

    def loss(p):
        return loss_and_metrics(model, p, {"tokens": window}, jnp.full(1, 0.3))[0]

    compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    xla = cost["flops"]
    ours = mtp_jax.model_flops(cfg, seq_len=seq) * seq * batch
    assert abs(ours - xla) / xla < 0.10, (ours, xla)


def test_param_count_matches_init():
    for layout in ("sequential", "parallel"):
        for tie in (True, False):
            cfg = tiny_model_config(mtp_layout=layout, tie_embeddings=tie)
            _, params, _ = _init(cfg, seq=4)
            n = sum(x.size for x in jax.tree.leaves(params))
            assert mtp_jax.param_count(cfg) == n


@pytest.mark.parametrize("layout", ["sequential", "parallel"])
def test_attention_stays_inside_its_document(layout):
    """With packed documents, a token of document 1 moves no output of document 2 (any depth),
    and still moves document 1's outputs at and after it."""
    seq, depth, boundary = 8, 2, 4
    cfg = tiny_model_config(mtp_depth=depth, mtp_layout=layout)
    model, params, tokens = _init(cfg, seq, batch=1)
    segments = jnp.where(jnp.arange(seq + depth) < boundary, 1, 2)[None]
    perturbed = jnp.tile(tokens, (boundary + 1, 1))
    perturbed = perturbed.at[jnp.arange(boundary), jnp.arange(boundary)].set(
        (tokens[0, :boundary] + 1) % 97
    )
    logits = jax.jit(model.apply)(
        {"params": params}, perturbed, jnp.tile(segments, (boundary + 1, 1))
    ).logits
    moved = np.asarray(jnp.abs(logits[:, :boundary] - logits[:, boundary:]).max(-1) > 1e-6)
    for j in range(boundary):
        assert not moved[:, j, boundary:].any(), j  # document 2 never sees document 1
        assert moved[0, j, j:boundary].all(), j  # document 1 does
