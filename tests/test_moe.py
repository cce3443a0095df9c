"""DeepSeekMoE: routing, balancing, dropless vs capacity dispatch, expert parallelism on 8
fake devices, resume with the balance bias, decoding and accounting."""

import dataclasses
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_every_depth_causal, tiny_model_config, tiny_train_config
from jax.sharding import PartitionSpec as P

import mtp_jax
from mtp_jax.model.config import MoEConfig
from mtp_jax.model.moe import (
    ExpertWeights,
    route,
    routed_experts,
    update_router_biases,
)
from mtp_jax.sharding import make_mesh
from mtp_jax.train.loop import train
from mtp_jax.train.metrics import read_metrics

E, K, D_MODEL, F = 8, 2, 16, 24


def _moe_cfg(**moe):
    values = dict(num_experts=E, top_k=K, shared_experts=1, expert_dim=F, routed_scaling=1.5)
    values.update(moe)
    return tiny_model_config(d_model=D_MODEL, moe=MoEConfig(**values))


def _weights(key, e=E):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    w = ExpertWeights(
        jax.random.normal(k1, (e, D_MODEL, F)) * 0.3,
        jax.random.normal(k2, (e, D_MODEL, F)) * 0.3,
        jax.random.normal(k3, (e, F, D_MODEL)) * 0.3,
    )
    router = jax.random.normal(k4, (D_MODEL, e))
    return router, w


def _dense_reference(cfg, x, router, bias, w):
    """Every token through its k experts, one expert at a time, no sorting or buffers."""
    flat = x.reshape(-1, x.shape[-1])
    r = route(flat @ router, bias, cfg.moe.top_k, cfg.moe.routed_scaling)

    def expert(i, v):
        return (jax.nn.silu(v @ w.gate[i]) * (v @ w.up[i])) @ w.down[i]

    all_out = jnp.stack([expert(i, flat) for i in range(cfg.moe.num_experts)], 1)  # [T, E, d]
    picked = jnp.take_along_axis(all_out, r.experts[..., None], axis=1)  # [T, k, d]
    return jnp.sum(picked * r.gates[..., None], 1).reshape(x.shape)


# ------------------------------------------------------------------------------- routing


def test_gates_are_the_hand_computed_top_k():
    logits = jnp.array([[2.0, -1.0, 0.5, 1.0], [-3.0, 0.0, 3.0, 0.2]])
    r = route(logits, jnp.zeros(4), top_k=2, scaling=2.5)
    s = 1 / (1 + np.exp(-np.asarray(logits)))
    np.testing.assert_array_equal(np.sort(np.asarray(r.experts), 1), [[0, 3], [2, 3]])
    expected = [
        2.5 * s[0, [0, 3]] / s[0, [0, 3]].sum(),
        2.5 * s[1, [2, 3]] / s[1, [2, 3]].sum(),
    ]
    order = np.argsort(np.asarray(r.experts), 1)
    got = np.take_along_axis(np.asarray(r.gates), order, 1)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_bias_changes_selection_not_gate_values():
    logits = jnp.array([[2.0, -1.0, 0.5, 1.0]])
    plain = route(logits, jnp.zeros(4), 2, 1.0)
    biased = route(logits, jnp.array([0.0, 5.0, 0.0, 0.0]), 2, 1.0)  # pushes expert 1 in
    assert set(np.asarray(plain.experts[0]).tolist()) == {0, 3}
    assert set(np.asarray(biased.experts[0]).tolist()) == {0, 1}
    s = 1 / (1 + np.exp(-np.asarray(logits[0])))
    gates = dict(zip(np.asarray(biased.experts[0]).tolist(), np.asarray(biased.gates[0])))
    np.testing.assert_allclose([gates[0], gates[1]], s[[0, 1]] / s[[0, 1]].sum(), rtol=1e-6)


def test_bias_update_moves_load_toward_uniform():
    cfg = _moe_cfg()
    key = jax.random.key(3)
    # Skewed router: experts 0 and 1 win for almost every token.
    router = jax.random.normal(key, (D_MODEL, E)) * 0.1
    router = router.at[:, :2].add(1.0)
    x = jnp.abs(jax.random.normal(jax.random.key(4), (64, D_MODEL)))
    bias = jnp.zeros(E)
    spreads = []
    for _ in range(100):
        r = route(x @ router, bias, K, 1.0)
        load = jnp.bincount(r.experts.reshape(-1), length=E).astype(jnp.float32)
        spreads.append(float(load.max() - load.min()))
        params = update_router_biases({"mlp": {"router_bias": bias}}, {"mlp": {"load": load}}, 0.02)
        bias = params["mlp"]["router_bias"]
    assert spreads[0] == 64  # every token picks experts 0 and 1: loads 64, 64, 0, ...
    # sign steps of a fixed size end in a small cycle around balance (measured: 9 <-> 25)
    assert np.mean(spreads[-20:]) < spreads[0] / 2, spreads
    # gamma * sign(mean - load): overloaded experts go down, others up, by exactly gamma
    first = update_router_biases(
        {"router_bias": jnp.zeros(4)}, {"load": jnp.array([5.0, 1.0, 1.0, 1.0])}, 0.5
    )["router_bias"]
    np.testing.assert_array_equal(first, [-0.5, 0.5, 0.5, 0.5])
    assert cfg.moe.enabled


# ------------------------------------------------------------------------------- dispatch


@pytest.fixture(scope="module")
def dispatch_case():
    router, w = _weights(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (2, 12, D_MODEL))
    bias = jax.random.normal(jax.random.key(2), (E,)) * 0.1
    return x, router, bias, w


def test_dropless_equals_dense_reference_values_and_gradients(dispatch_case):
    x, router, bias, w = dispatch_case
    cfg = _moe_cfg()

    def ours(x, router, w):
        return jnp.sum(jnp.sin(routed_experts(cfg, x, router, bias, w)[0]))

    def ref(x, router, w):
        return jnp.sum(jnp.sin(_dense_reference(cfg, x, router, bias, w)))

    y, stats = routed_experts(cfg, x, router, bias, w)
    np.testing.assert_allclose(y, _dense_reference(cfg, x, router, bias, w), atol=1e-5)
    assert float(stats["dropped"]) == 0 and float(stats["load"].sum()) == 24 * K
    g_ours = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(x, router, w)
    g_ref = jax.jit(jax.grad(ref, argnums=(0, 1, 2)))(x, router, w)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_capacity_mode_equals_dropless_at_e_over_k(dispatch_case):
    x, router, bias, w = dispatch_case
    dropless = routed_experts(_moe_cfg(), x, router, bias, w)[0]
    cfg = _moe_cfg(capacity_factor=E / K)
    y, stats = routed_experts(cfg, x, router, bias, w)
    np.testing.assert_allclose(y, dropless, atol=1e-5)
    assert float(stats["dropped"]) == 0
    grads = [
        jax.jit(jax.grad(lambda w, c=c: jnp.sum(routed_experts(c, x, router, bias, w)[0] ** 2)))(w)
        for c in (_moe_cfg(), cfg)
    ]
    for a, b in zip(*map(jax.tree.leaves, grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_capacity_mode_drops_the_later_tokens(dispatch_case):
    x, router, bias, w = dispatch_case
    cfg = _moe_cfg(capacity_factor=0.5)  # C = ceil(0.5 * 24 * 2 / 8) = 3 slots per expert
    y, stats = routed_experts(cfg, x, router, bias, w)
    flat = x.reshape(-1, D_MODEL)
    r = route(flat @ router, bias, K, cfg.moe.routed_scaling)
    experts = np.asarray(r.experts)
    kept = np.zeros_like(experts, bool)
    seen = np.zeros(E, int)
    for t in range(experts.shape[0]):  # token order, then k order: the first 3 per expert stay
        for j in range(K):
            kept[t, j] = seen[experts[t, j]] < 3
            seen[experts[t, j]] += 1
    assert float(stats["dropped"]) == (~kept).sum() > 0

    def expert(i, v):
        return (jax.nn.silu(v @ w.gate[i]) * (v @ w.up[i])) @ w.down[i]

    expected = np.zeros_like(np.asarray(flat))
    for t in range(experts.shape[0]):
        for j in range(K):
            if kept[t, j]:
                expected[t] += float(r.gates[t, j]) * np.asarray(expert(experts[t, j], flat[t]))
    np.testing.assert_allclose(y.reshape(-1, D_MODEL), expected, atol=1e-5)


@pytest.mark.parametrize("capacity_factor", [0.0, E / K])
def test_expert_parallel_dispatch_equals_one_device(dispatch_case, capacity_factor):
    """shard_map over expert=4 x data=2 (all_to_all) == the single-device computation."""
    from mtp_jax.config import ConfigDict
    from mtp_jax.model.moe import sharded_routed_experts

    x, router, bias, w = dispatch_case
    x = jnp.concatenate([x] * 4)  # 8 rows: one per device
    cfg = _moe_cfg(capacity_factor=capacity_factor)
    single = routed_experts(cfg, x, router, bias, w)
    mesh = make_mesh(ConfigDict({"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}))
    with jax.set_mesh(mesh):
        ep = jax.jit(lambda *a: sharded_routed_experts(cfg, *a, dropless=False))(x, router, bias, w)
    np.testing.assert_allclose(ep[0], single[0], atol=1e-5)
    for key in ("load", "dropped", "assigned", "balance"):
        np.testing.assert_allclose(ep[1][key], single[1][key], rtol=1e-5)


# ------------------------------------------------------------------------------- training

MOE_TRAIN = (
    "model.moe.num_experts=8",
    "model.moe.top_k=2",
    "model.moe.expert_dim=16",
    "model.moe.bias_update_rate=0.01",
    "model.moe.balance_loss_weight=0.01",
    "model.n_layers=2",
    "model.moe.first_dense_layers=1",
    "checkpoint.every=0",
    "model.vocab_size=260",
)


@pytest.mark.slow
def test_expert_parallel_training_equals_one_device(code_store, tmp_path):
    one = train(
        tiny_train_config(code_store, *MOE_TRAIN, "train.steps=4"),
        str(tmp_path / "one"),
        devices=jax.devices()[:1],
        progress=False,
    )
    config8 = tiny_train_config(
        code_store, *MOE_TRAIN, "train.steps=4", "mesh.data=2", "mesh.expert=4"
    )
    eight = train(config8, str(tmp_path / "eight"), progress=False)
    wi = eight.state.params["trunk"]["layers"]["block"]["mlp"]["wi_gate"]  # [L, E, d, F]
    assert wi.sharding.spec[1] == "expert"
    assert {s.data.shape[1] for s in wi.addressable_shards} == {8 // 4}
    bias = one.state.params["trunk"]["layers"]["block"]["mlp"]["router_bias"]
    assert float(jnp.abs(bias).sum()) > 0  # the balance bias moved
    for key in ("loss", "loss/depth_0", "loss/depth_2", "moe/layer_1/load_max"):
        np.testing.assert_allclose(one.metrics[key], eight.metrics[key], rtol=1e-5)
    for a, b in zip(
        jax.tree.leaves(one.state.params), jax.tree.leaves(eight.state.params), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)
    records = read_metrics(str(tmp_path / "one"))
    assert {"moe/layer_1/load_min", "moe/layer_1/dropped", "moe/depth_1/bias_norm"} <= set(
        records[-1]
    )


@pytest.mark.slow
def test_resume_is_bit_identical_with_the_balance_bias(code_store, tmp_path):
    overrides = (*MOE_TRAIN[:-2], "train.steps=4", "checkpoint.every=2", "train.log_every=1")
    config = tiny_train_config(code_store, *overrides)
    straight = train(config, str(tmp_path / "straight"), devices=jax.devices()[:1], progress=False)

    def preempt(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    first = train(
        config,
        str(tmp_path / "resumed"),
        devices=jax.devices()[:1],
        progress=False,
        on_step=preempt,
    )
    assert first.status == "preempted" and first.step == 2
    resumed = train(config, str(tmp_path / "resumed"), devices=jax.devices()[:1], progress=False)
    assert resumed.step == 4
    bias = straight.state.params["trunk"]["layers"]["block"]["mlp"]["router_bias"]
    assert float(jnp.abs(bias).sum()) > 0
    for a, b in zip(jax.tree.leaves(straight.state), jax.tree.leaves(resumed.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------- accounting


def test_param_count_total_and_activated_match_init():
    from mtp_jax.model.flops import activated_param_count

    for layout, dense_mtp in (("sequential", False), ("parallel", False), ("sequential", True)):
        cfg = dataclasses.replace(
            _moe_cfg(first_dense_layers=1, dense_mtp=dense_mtp), mtp_layout=layout, n_layers=3
        )
        model = mtp_jax.Model(cfg)
        init = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
        params = jax.tree.map(lambda x: x, init["params"])
        leaves = jax.tree_util.tree_leaves_with_path(params)
        total = sum(x.size for _, x in leaves)
        assert mtp_jax.param_count(cfg) == total
        expert = sum(
            x.size
            for p, x in leaves
            if any(n in jax.tree_util.keystr(p) for n in ("wi_gate", "wi_up", "'wo'"))
        )
        # activated: everything but the (E - k) / E unselected share of the routed experts
        assert activated_param_count(cfg) == total - expert * (E - K) // E
        assert ("router" in str(params["mtp"])) != dense_mtp  # depths: the trunk's block type


def test_moe_spec_of_expert_weights_on_the_mesh():
    from mtp_jax.config import ConfigDict
    from mtp_jax.sharding import LOGICAL_RULES, logical_shardings

    cfg = _moe_cfg()
    model = mtp_jax.Model(cfg)
    boxed = jax.eval_shape(lambda k: model.init(k, jnp.zeros((8, 8), jnp.int32)), jax.random.key(0))
    mesh = make_mesh(ConfigDict({"data": 1, "fsdp": 2, "expert": 4, "tensor": 1}))
    sh = logical_shardings(boxed["params"], mesh, LOGICAL_RULES)
    mlp = sh["trunk"]["layers"]["block"]["mlp"]
    assert mlp["wi_gate"].spec == P(None, "expert", "fsdp", "tensor")
    assert mlp["wo"].spec == P(None, "expert", "tensor", "fsdp")
    assert mlp["router_bias"].spec in (P(), P(None, None))


@pytest.mark.parametrize("attention", ["mla"])  # MoE + GQA: the same FFN count, MHA as dense
def test_model_flops_match_xla_cost_analysis(attention):
    """Activated FLOPs (capacity mode at factor 1: every expert runs exactly T*k/E rows, as
    many as a token's k experts) against XLA's count of the compiled gradient."""
    from mtp_jax.train.step import loss_and_metrics

    cfg = tiny_model_config(
        vocab_size=512,
        d_model=128,
        n_heads=4,
        n_kv_heads=2,
        head_dim=32,
        n_layers=3,
        scan_layers=False,
        mtp_depth=1,
        attention=attention,
        kv_lora_rank=64,
        q_lora_rank=96,
        qk_rope_head_dim=16,
        moe=MoEConfig(
            num_experts=8, top_k=2, expert_dim=128, first_dense_layers=1, capacity_factor=1.0
        ),
    )
    seq, batch = 64, 2
    model = mtp_jax.Model(cfg)
    window = jnp.zeros((batch, seq + 2), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), window[:, :-1])["params"]

    def loss(p):
        return loss_and_metrics(model, p, {"tokens": window}, jnp.full(1, 0.3), router_stats=True)[
            0
        ]

    compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    cost = compiled.cost_analysis()
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
    ours = mtp_jax.model_flops(cfg, seq_len=seq) * seq * batch
    assert abs(ours - xla) / xla < 0.10, (ours, xla)


# ------------------------------------------------------------------------------- MoE + MLA


def _moe_mla(layout: str, **extra):
    from test_inference import CFG

    return tiny_model_config(
        mtp_layout=layout,
        attention="mla",
        kv_lora_rank=16,
        q_lora_rank=24,
        qk_rope_head_dim=8,
        n_layers=2,
        moe=MoEConfig(num_experts=4, top_k=2, expert_dim=32, first_dense_layers=1),
        **{**CFG, **extra},
    )


@pytest.mark.parametrize("layout", ["sequential", "parallel"])
def test_causality_of_every_depth_moe_mla(layout):
    """Perturbing token j moves depth k's logits at i iff j <= i + k (sequential) or j <= i
    (parallel): routing is per token, so no token sees the future through its experts."""
    from test_inference import _init

    depth, seq = 2, 6
    cfg = _moe_mla(layout, mtp_depth=depth, vocab_size=97)
    model, params = mtp_jax.Model(cfg), _init(cfg)
    tokens = jax.random.randint(jax.random.key(1), (1, seq + depth), 0, 97)
    assert_every_depth_causal(model, params, tokens, layout, 97)


@pytest.mark.parametrize("layout", ["sequential", "parallel"])
def test_moe_mla_cached_decoding_and_exact_speculative_greedy(layout):
    """Cached steps (two trunk stacks: a dense first layer, then MoE) equal the full forward
    at every depth; greedy self-speculative decoding gives plain greedy's tokens (sequential:
    the DeepSeek-V3 shape; tests/test_mla.py and test_inference.py cover both layouts)."""
    from test_inference import (
        LENGTHS,
        NEW,
        PROMPT,
        VOCAB,
        _check_cached_steps,
        _init,
    )

    from mtp_jax.inference import generate, speculative_generate

    cfg = _moe_mla(layout)
    model, params = mtp_jax.Model(cfg), _init(cfg)
    assert "dense_layers" in params["trunk"]
    seq = 9
    tokens = jax.random.randint(jax.random.key(4), (2, seq + cfg.mtp_depth), 0, VOCAB)
    full = jax.jit(model.apply)({"params": params}, tokens).logits
    dec = model.decoder()
    _check_cached_steps(dec, dec.prepare(params), tokens, seq, full)
    if layout == "parallel":
        return
    prompts = jax.random.randint(jax.random.key(2), (len(LENGTHS), PROMPT), 0, VOCAB)
    plain = generate(model, params, prompts, LENGTHS, max_new_tokens=NEW)
    spec = speculative_generate(model, params, prompts, LENGTHS, max_new_tokens=NEW)
    assert len(set(plain.tokens[:, -1].tolist())) > 1, "degenerate outputs prove nothing"
    np.testing.assert_array_equal(spec.tokens, plain.tokens)


def test_hf_export_refuses_moe_with_gqa_naming_the_key():
    """MoE exports in DeepSeek-V3 naming (tests/test_hf_deepseek.py), whose attention is MLA."""
    from mtp_jax.interop.hf import InteropError, hf_config

    with pytest.raises(InteropError, match="model.attention"):
        hf_config(_moe_cfg())
    assert hf_config(tiny_model_config(attention="mla"))["model_type"] == "deepseek_v3"


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["model.moe.num_experts=8", "mesh.expert=3"], "mesh.expert"),
        (["mesh.expert=2"], "mesh.expert"),
        (["model.moe.num_experts=4", "model.moe.top_k=5"], "model.moe.top_k"),
        (["model.moe.num_experts=4", "model.moe.first_dense_layers=2"], "first_dense_layers"),
        (["model.moe.capacity_factor=-1.0"], "model.moe.capacity_factor"),
    ],
)
def test_bad_moe_configs_name_the_key(overrides, key):
    from mtp_jax.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=key):
        load_config("configs/smoke.py", overrides)


def test_sequence_balance_loss_equals_a_hand_count():
    """DeepSeek-V3 eq. 17-20 per row, by loops: f_i = E/(k S) #(tokens choosing i),
    P_i = mean_t s_it / sum_j s_jt, loss = sum_rows sum_i f_i P_i."""
    from mtp_jax.model.moe import balance_loss

    rows, seq, e, k = 2, 5, 4, 2
    logits = jax.random.normal(jax.random.key(7), (rows * seq, e))
    r = route(logits, jnp.zeros(e), k, 1.0)
    s = 1 / (1 + np.exp(-np.asarray(logits)))
    experts = np.asarray(r.experts)
    expected = 0.0
    for b in range(rows):
        for i in range(e):
            tokens = range(b * seq, (b + 1) * seq)
            f = e / (k * seq) * sum(i in experts[t] for t in tokens)
            p = np.mean([s[t, i] / s[t].sum() for t in tokens])
            expected += f * p
    np.testing.assert_allclose(float(balance_loss(r, rows, e)), expected, rtol=1e-5)


def test_balance_loss_enters_the_training_loss_with_its_weight():
    from mtp_jax.model.moe import balance_loss_sum
    from mtp_jax.train.step import loss_and_metrics

    window = jax.random.randint(jax.random.key(5), (2, 8 + 3), 0, 97)
    losses = {}
    for alpha in (0.0, 0.5):
        cfg = _moe_cfg(balance_loss_weight=alpha)
        model = mtp_jax.Model(cfg)
        params = jax.jit(model.init)(jax.random.key(0), window[:, :-1])["params"]
        fn = jax.jit(
            lambda p, m=model: loss_and_metrics(
                m, p, {"tokens": window}, jnp.ones(2), router_stats=True
            )
        )
        loss, aux = fn(params)
        losses[alpha] = (float(loss), aux[3])
    extra = 0.5 * float(balance_loss_sum(losses[0.5][1])) / 2  # alpha * sum over layers / rows
    assert extra > 0
    np.testing.assert_allclose(losses[0.5][0] - losses[0.0][0], extra, rtol=1e-4)
