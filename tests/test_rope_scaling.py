"""RoPE scaling (`model.rope_scaling.*`): llama3 and yarn frequencies and factors equal
transformers' formulas (numpy transcriptions in test_hf); type 'none' is bit-identical to plain
RoPE; exported scaled models compute our logits under HF Llama / DeepseekV3 semantics; Llama
3.1 and DeepSeek-V3 config.json import, other rope types are refused naming them; cached
decoding equals the full forward."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CONFIGS, tiny_model_config
from test_hf import _hf_logits, hf_rope_parameters, random_params, read_hf, small, write_hf
from test_hf_deepseek import V3, _trunk, ds
from test_inference import _check_cached_steps, _init

import mtp_jax
from mtp_jax.checks import ConfigError
from mtp_jax.config import load_config
from mtp_jax.interop import hf
from mtp_jax.model import ModelConfig, layers, mla
from mtp_jax.model.config import RopeScalingConfig

LLAMA31 = dict(  # meta-llama/Llama-3.1-8B's rope_scaling
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=8192,
)
V3_YARN = dict(  # deepseek-ai/DeepSeek-V3's rope_scaling
    type="yarn",
    factor=40,
    beta_fast=32,
    beta_slow=1,
    mscale=1.0,
    mscale_all_dim=1.0,
    original_max_position_embeddings=4096,
)
# Tiny test models: short original contexts so that every regime (kept, blended, scaled
# frequencies) shows within a few positions at head width 8 and theta 500.
TINY_LLAMA3 = RopeScalingConfig(
    type="llama3", factor=8.0, original_max_position_embeddings=64, high_freq_factor=4.0
)
TINY_YARN = RopeScalingConfig(
    type="yarn", factor=4.0, original_max_position_embeddings=64, mscale=1.0, mscale_all_dim=0.8
)


def _ours(rs: dict, theta: float, dim: int, max_positions: int):
    """Our (inv_freq, attention factor) for a config.json rope_scaling dict, via the import."""
    c = {"rope_theta": theta, "max_position_embeddings": max_positions, "rope_scaling": rs}
    cfg = RopeScalingConfig(**hf._rope_scaling_values(c))
    return layers.rope_inv_freq(dim, theta, cfg), layers.rope_attention_factor(cfg), c


@pytest.mark.parametrize(
    "rs,theta,dim,max_positions",
    [
        (LLAMA31, 500_000.0, 128, 131072),
        ({**LLAMA31, "factor": 32.0}, 500_000.0, 64, 131072),  # Llama 3.2 1B
        (V3_YARN, 10_000.0, 64, 163840),  # DeepSeek-V3, on qk_rope_head_dim
        ({"type": "yarn", "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707}, 1e4, 64, 163840),
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}, 1e6, 128,
         131072),  # Qwen-style: no mscale -> 0.1 ln 4 + 1
        ({"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
          "original_max_position_embeddings": 4096, "truncate": False}, 150_000.0, 64, 131072),
        ({"rope_type": "yarn", "factor": 2.0, "attention_factor": 1.3, "beta_fast": 1,
          "beta_slow": 1}, 1e4, 32, 8192),  # explicit factor; equal betas (Kimi-K2-like)
        ({"rope_type": "yarn", "factor": 8.0, "mscale": 1.0, "mscale_all_dim": 0.5}, 1e4, 16, 64),
    ],
)  # fmt: skip
def test_frequencies_equal_the_hf_formulas(rs, theta, dim, max_positions):
    inv, factor, c = _ours(rs, theta, dim, max_positions)
    want_inv, want_factor = hf_rope_parameters(c, dim)
    plain = 1.0 / theta ** (np.arange(0, dim, 2) / dim)
    np.testing.assert_allclose(inv, want_inv, rtol=1e-12)
    assert factor == pytest.approx(want_factor, rel=1e-12)
    assert np.max(np.abs(inv / plain - 1)) > 0.3  # the scaling changes some frequencies
    assert np.all(inv <= plain * (1 + 1e-12)) and np.all(inv >= plain / rs["factor"] * (1 - 1e-12))


def test_published_values():
    """Spot values: Llama 3.1 keeps its highest frequency and divides its lowest by 8;
    DeepSeek-V3's cos/sin factor is 1 and its MLA softmax scale 1/sqrt(192) x 1.3689^2."""
    inv, factor, _ = _ours(LLAMA31, 500_000.0, 128, 131072)
    plain = 1.0 / 500_000.0 ** (np.arange(0, 128, 2) / 128)
    assert inv[0] == plain[0] and inv[-1] == pytest.approx(plain[-1] / 8) and factor == 1.0
    inv, factor, _ = _ours(V3_YARN, 10_000.0, 64, 163840)
    assert factor == 1.0 and inv[0] == 1.0
    cfg = hf.model_config_from_hf({**V3, "rope_scaling": V3_YARN})
    mscale = 0.1 * math.log(40) + 1
    assert mla.softmax_scale(cfg) == pytest.approx(mscale**2 / math.sqrt(192), rel=1e-12)
    assert mla.softmax_scale(dataclasses.replace(cfg, rope_scaling=RopeScalingConfig())) == (
        1 / math.sqrt(192)
    )
    # type none: the plain frequencies
    np.testing.assert_allclose(
        layers.rope_inv_freq(16, 500.0, RopeScalingConfig()),
        1.0 / 500.0 ** (np.arange(0, 16, 2) / 16),
        rtol=1e-15,
    )


def _old_rope(x, positions, theta):
    """`layers.rope` as it was before scaling (rotate-half, float32)."""
    half = x.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions[..., None].astype(jnp.float32) * freqs
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


@pytest.mark.parametrize("attention", ["mha", "mla"])
def test_type_none_is_bit_identical_to_plain_rope(monkeypatch, attention):
    cfg = small(mtp_depth=0) if attention == "mha" else ds(moe={"num_experts": 0}, mtp_depth=0)
    params = random_params(cfg)
    tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, cfg.vocab_size)
    model = mtp_jax.Model(cfg)
    now = np.asarray(jax.jit(model.apply)({"params": params}, tokens).logits)
    scaled = dataclasses.replace(cfg, rope_scaling=TINY_YARN)
    other = np.asarray(jax.jit(mtp_jax.Model(scaled).apply)({"params": params}, tokens).logits)
    assert not np.allclose(other, now, atol=1e-3)  # a model that used the scaling would differ
    monkeypatch.setattr(layers, "rope", lambda x, p, theta, scaling=None: _old_rope(x, p, theta))
    monkeypatch.setattr(mla, "rope", lambda x, p, theta, scaling=None: _old_rope(x, p, theta))
    before = np.asarray(jax.jit(model.apply)({"params": params}, tokens).logits)
    assert np.array_equal(now, before)


@pytest.mark.parametrize("scaling", [TINY_LLAMA3, TINY_YARN], ids=["llama3", "yarn"])
def test_scaled_llama_export_computes_our_logits_the_hf_way(tmp_path, scaling):
    """HF Llama applies the attention factor to cos/sin and keeps 1/sqrt(H) under yarn."""
    cfg = small(mtp_depth=0, rope_scaling=scaling)
    params = random_params(cfg)
    write_hf(cfg, params, tmp_path)
    c, tensors = read_hf(tmp_path)
    assert c["rope_scaling"]["rope_type"] == scaling.type
    t = {k: v.astype(np.float64) for k, v in tensors.items()}
    seq = 12
    tokens = jax.random.randint(jax.random.key(3), (1, seq), 0, cfg.vocab_size)
    ours = np.asarray(jax.jit(mtp_jax.Model(cfg).apply)({"params": params}, tokens).logits)[0, 0]
    ids = np.asarray(tokens[0])
    logits = _hf_logits(t, c, ids)[0]
    assert np.max(np.abs(ours - logits)) <= 1e-4
    assert np.max(np.abs(logits)) > 1.0
    unscaled = _hf_logits(t, {**c, "rope_scaling": None}, ids)[0]
    assert np.max(np.abs(ours - unscaled)) > 1e-2  # the scaling shows in the logits


def test_scaled_mla_export_computes_our_logits_the_deepseek_way(tmp_path):
    """DeepseekV3: yarn frequencies on the rope part, cos/sin x mscale ratio, softmax scale
    x mscale(factor, mscale_all_dim)^2."""
    cfg = ds(tie_embeddings=False, mtp_depth=0, rope_scaling=TINY_YARN)
    params = random_params(cfg)
    write_hf(cfg, params, tmp_path)
    c, tensors = read_hf(tmp_path)
    t = {k: v.astype(np.float64) for k, v in tensors.items()}
    seq = 12
    tokens = jax.random.randint(jax.random.key(3), (1, seq), 0, cfg.vocab_size)
    ours = np.asarray(jax.jit(mtp_jax.Model(cfg).apply)({"params": params}, tokens).logits)[0, 0]
    ids = np.asarray(tokens)[0]
    logits = _trunk(t, c, ids)[0]
    assert np.max(np.abs(ours - logits)) <= 1e-4
    assert np.max(np.abs(logits)) > 1.0
    for wrong in ({**c, "rope_scaling": None}, c):  # no scaling; no softmax mscale
        kw = {} if wrong is not c else {"softmax_mscale": False}
        assert np.max(np.abs(ours - _trunk(t, wrong, ids, **kw)[0])) > 1e-2, kw


def test_llama31_and_deepseek_v3_configs_import():
    llama = {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu",
        "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
        "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": LLAMA31,
        "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256,
    }  # fmt: skip
    got = hf.model_config_from_hf(llama).rope_scaling
    assert got == RopeScalingConfig(
        type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    )
    # transformers 5 writes rope_parameters (with rope_theta) instead
    v5 = {k: v for k, v in llama.items() if k not in ("rope_scaling", "rope_theta")}
    v5["rope_parameters"] = {**LLAMA31, "rope_theta": 500000.0}
    assert hf.model_config_from_hf(v5).rope_scaling == got

    v3 = hf.model_config_from_hf({**V3, "rope_scaling": V3_YARN})
    r = v3.rope_scaling
    assert (r.type, r.factor, r.beta_fast, r.beta_slow) == ("yarn", 40.0, 32.0, 1.0)
    assert (r.mscale, r.mscale_all_dim, r.original_max_position_embeddings) == (1.0, 1.0, 4096)
    assert r.truncate and v3.attention == "mla"
    other = dataclasses.replace(v3, rope_scaling=dataclasses.replace(r, factor=32.0))
    with pytest.raises(hf.InteropError, match="model.rope_scaling.factor"):
        hf.check_matches(other, v3, "x", False)
    with pytest.raises(hf.InteropError, match="model.rope_scaling.type"):
        hf.check_matches(dataclasses.replace(v3, rope_scaling=RopeScalingConfig()), v3, "x", False)


@pytest.mark.parametrize(
    "rs,named",
    [
        ({"rope_type": "longrope", "factor": 4.0}, "longrope"),
        ({"type": "dynamic", "factor": 2.0}, "dynamic"),
        ({"rope_type": "linear", "factor": 2.0}, "linear"),
        ({**LLAMA31, "beta_fast": 32}, "beta_fast"),
        ({**V3_YARN, "short_factor": [1.0]}, "short_factor"),
        ({"rope_type": "llama3", "factor": 8.0}, "low_freq_factor"),  # required by HF too
        ({"rope_type": "yarn", "factor": 0.5}, "model.rope_scaling.factor"),
        ({**LLAMA31, "high_freq_factor": 1.0}, "model.rope_scaling.high_freq_factor"),
        ("yarn", "rope_scaling"),
    ],
)
def test_unsupported_rope_scaling_fails_naming_it(rs, named):
    c = hf.hf_config(small())
    with pytest.raises(hf.InteropError, match=named) as e:
        hf.model_config_from_hf({**c, "rope_scaling": rs})
    assert "rope_scaling" in str(e.value)
    disagree = {**c, "rope_scaling": LLAMA31, "rope_parameters": {**LLAMA31, "factor": 4.0}}
    with pytest.raises(hf.InteropError, match="rope_parameters"):
        hf.model_config_from_hf(disagree)


@pytest.mark.parametrize(
    "cfg", [small(rope_scaling=TINY_LLAMA3), ds(rope_scaling=TINY_YARN)], ids=["llama", "v3"]
)
def test_export_import_round_trips_rope_scaling(cfg):
    c = hf.hf_config(cfg)
    assert c["rope_scaling"]["factor"] == cfg.rope_scaling.factor
    assert hf.model_config_from_hf(c) == cfg
    plain = dataclasses.replace(cfg, rope_scaling=RopeScalingConfig())
    assert hf.hf_config(plain)["rope_scaling"] is None
    assert hf.model_config_from_hf(hf.hf_config(plain)) == plain


def test_config_keys_are_declared_and_checked():
    cfg = load_config(
        CONFIGS / "smoke.py", ["model.rope_scaling.type=llama3", "model.rope_scaling.factor=8.0"]
    )
    got = ModelConfig.from_any(cfg.model).rope_scaling
    assert (got.type, got.factor) == ("llama3", 8.0)
    with pytest.raises(ConfigError, match="'model.rope_scaling.type' has value 'ntk'"):
        load_config(CONFIGS / "smoke.py", ["model.rope_scaling.type=ntk"])
    with pytest.raises(ConfigError, match="'model.rope_scaling.beta_fast'"):
        ModelConfig.validate({"rope_scaling": {"type": "yarn", "beta_fast": 0.5}})


@pytest.mark.parametrize(
    "extra",
    [
        dict(rope_scaling=TINY_LLAMA3),
        dict(rope_scaling=TINY_YARN, attention="mla", q_lora_rank=0, kv_lora_rank=16,
             qk_rope_head_dim=8),
    ],
    ids=["gqa-llama3", "mla-yarn"],
)  # fmt: skip
def test_cached_decoding_with_scaling_equals_full_forward(extra):
    cfg = tiny_model_config(vocab_size=31, n_layers=1, mtp_depth=1, **extra)
    model, params = mtp_jax.Model(cfg), _init(cfg)
    seq = 9
    tokens = jax.random.randint(jax.random.key(4), (2, seq + 1), 0, 31)
    full = jax.jit(model.apply)({"params": params}, tokens).logits
    dec = model.decoder()
    _check_cached_steps(dec, dec.view(params), tokens, seq, full)
    plain = dataclasses.replace(cfg, rope_scaling=RopeScalingConfig())
    other = jax.jit(mtp_jax.Model(plain).apply)({"params": params}, tokens).logits
    assert not np.allclose(other, full, atol=1e-3)
