"""The Pallas splash-attention kernel (model.attention_impl = splash | auto on TPUs).

On this CPU host the kernel runs in Pallas' interpret mode, which checks its numbers against
XLA attention; for a TPU slice it lowers and compiles ahead of time with libtpu.
"""

import dataclasses
import importlib.util

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CONFIGS, tiny_model_config

import mtp_jax
from mtp_jax.config import ConfigDict, ConfigError, load_config
from mtp_jax.model.config import RopeScalingConfig
from mtp_jax.model.layers import attention_impl
from mtp_jax.sharding import LOGICAL_RULES, make_mesh

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="libtpu (the TPU compiler) is missing"
)
S = 128  # the kernel's smallest block


@pytest.mark.parametrize("layout", ["sequential", "parallel"])
def test_splash_equals_xla_attention_with_packed_documents(layout):
    """Logits and gradients of every depth, one device and a (2, 2, 2) mesh (shard_map)."""
    cfg = tiny_model_config(mtp_layout=layout, mtp_depth=1, n_layers=1)
    tokens = jax.random.randint(jax.random.key(1), (4, S + 1), 0, 97)
    seg = jnp.where(jnp.arange(S + 1) < 50, 1, 2)[None].repeat(4, 0)  # two documents
    xla = mtp_jax.Model(dataclasses.replace(cfg, attention_impl="xla"))
    splash = mtp_jax.Model(dataclasses.replace(cfg, attention_impl="splash"))
    params = nn.unbox(xla.init(jax.random.key(0), tokens))["params"]

    def logits(model):
        return jax.jit(lambda p: model.apply({"params": p}, tokens, seg).logits)

    def grads(model):
        return jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, tokens, seg).logits)))

    want = logits(xla)(params)
    np.testing.assert_allclose(logits(splash)(params), want, atol=1e-5)
    mesh = make_mesh(ConfigDict({"data": 2, "fsdp": 2, "tensor": 2}))
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        np.testing.assert_allclose(logits(splash)(params), want, atol=1e-5)
    for a, b in zip(
        jax.tree.leaves(grads(splash)(params)), jax.tree.leaves(grads(xla)(params)), strict=True
    ):
        np.testing.assert_allclose(a, b, atol=2e-3, rtol=2e-3)
    # Packing matters: without segment ids (one document) the logits differ.
    no_docs = jax.jit(lambda p: splash.apply({"params": p}, tokens).logits)(params)
    assert not np.allclose(no_docs, want, atol=1e-3)


def test_auto_picks_splash_on_tpus_only():
    cfg = tiny_model_config()
    assert attention_impl(cfg, S, cached=False, masked=True) == "xla"  # this CPU host
    splash = dataclasses.replace(cfg, attention_impl="splash")
    assert attention_impl(splash, S, cached=False, masked=True) == "splash"
    assert attention_impl(splash, S, cached=True, masked=True) == "xla"  # decoding
    with pytest.raises(ConfigError, match="'model.attention_impl'.*multiple of 128"):
        load_config(CONFIGS / "smoke.py", ["model.attention_impl=splash", "data.seq_len=96"])


@needs_libtpu
def test_auto_picks_splash_for_a_tpu_slice_and_compiles_it():
    """The real train step (packed documents) for v5p:2x2x1, both layouts: auto is splash
    there, and the compiled step holds the Pallas kernel."""
    from mtp_jax.model import Model
    from mtp_jax.train.plan import topology_devices
    from mtp_jax.train.state import abstract_state, make_optimizer
    from mtp_jax.train.step import compile_steps

    devices = topology_devices("v5p:2x2x1")
    for layout in ("sequential", "parallel"):
        config = load_config(
            CONFIGS / "smoke.py",
            [
                f"model.mtp_layout={layout}",
                "model.d_model=64",
                "model.n_layers=1",
                "model.mlp_dim=128",
                "data.batch_size=8",
                "mesh.data=2",
                "mesh.fsdp=2",
            ],
        )
        mesh = make_mesh(config.mesh, devices)
        with jax.set_mesh(mesh):
            cfg = Model(config.model).decoder().cfg
            assert attention_impl(cfg, S, False, True) == "splash"
            mla = dataclasses.replace(cfg, attention="mla")  # auto keeps XLA for MLA ...
            assert attention_impl(mla, S, False, True) == "xla"
            mla = dataclasses.replace(mla, attention_impl="splash")  # ... unless asked
            assert attention_impl(mla, S, False, True) == "splash"
        model, tx = Model(config.model), make_optimizer(config)
        abstract, shardings = abstract_state(config, model, tx, mesh)
        # TPU executables without a client cannot be read back from the persistent cache.
        min_time = jax.config.jax_persistent_cache_min_compile_time_secs
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e9)
        try:
            train_c, _ = compile_steps(config, model, tx, mesh, shardings, abstract)
        finally:
            jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)
        assert "tpu_custom_call" in train_c.as_text(), layout


def test_mla_splash_equals_its_xla_attention():
    """MLA through the kernel (queries/keys of H + R, values of H, the one RoPE key repeated
    per head, DeepSeek's scale with YaRN's mscale^2, not the kernel's 1/sqrt(H + R)): logits
    of both depths on one device and on a (2, 2, 2) mesh, and gradients, equal the XLA form,
    with packed documents."""
    yarn = RopeScalingConfig(
        type="yarn", factor=4.0, original_max_position_embeddings=64, mscale=1.0, mscale_all_dim=1.0
    )
    cfg = tiny_model_config(
        attention="mla",
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        head_dim=8,
        mtp_depth=1,
        n_layers=1,
        rope_scaling=yarn,
    )
    tokens = jax.random.randint(jax.random.key(2), (4, S + 1), 0, 97)
    seg = jnp.where(jnp.arange(S + 1) < 70, 1, 2)[None].repeat(4, 0)
    xla = mtp_jax.Model(dataclasses.replace(cfg, attention_impl="xla"))
    splash = mtp_jax.Model(dataclasses.replace(cfg, attention_impl="splash"))
    params = nn.unbox(xla.init(jax.random.key(0), tokens))["params"]

    def loss(model):
        return jax.jit(lambda p: jnp.sum(model.apply({"params": p}, tokens, seg).logits ** 2))

    want = jax.jit(lambda p: xla.apply({"params": p}, tokens, seg).logits)(params)
    got = jax.jit(lambda p: splash.apply({"params": p}, tokens, seg).logits)(params)
    np.testing.assert_allclose(got, want, atol=1e-5)
    mesh = make_mesh(ConfigDict({"data": 2, "fsdp": 2, "tensor": 2}))
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        np.testing.assert_allclose(loss(splash)(params), loss(xla)(params), rtol=1e-5)
    g_splash, g_xla = (jax.jit(jax.grad(loss(m)))(params) for m in (splash, xla))
    for a, b in zip(jax.tree.leaves(g_splash), jax.tree.leaves(g_xla), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-3, rtol=2e-3)
