"""Hugging Face interop: export -> import is bit-exact, names are one-to-one, the exported
tensors compute our logits under HF Llama semantics (a numpy forward written here from the
config.json meaning) and under the engines' (vLLM, SGLang) DeepSeek MTP reading of depth 1;
unsupported configs fail naming the field; shared depths and the normed chain input; the CLIs
and init.from_*."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CONFIGS, TINY_TRAIN

import mtp_jax
from mtp_jax.checks import ConfigError
from mtp_jax.interop import hf, safetensors_io
from mtp_jax.model import ModelConfig, layout
from mtp_jax.model.flops import param_count
from mtp_jax.model.mtp import MTPDepth

SMALL = dict(vocab_size=67, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8)


def small(**kw) -> ModelConfig:
    return ModelConfig(**{**SMALL, "mlp_dim": 48, "mtp_depth": 2, "rope_theta": 500.0, **kw})


def random_params(cfg: ModelConfig, seed: int = 0):
    """Every leaf random (norm scales around 1), so that any transposition shows."""
    tokens = jnp.zeros((1, 1 + cfg.mtp_depth), jnp.int32)
    shapes = nn.unbox(jax.eval_shape(mtp_jax.Model(cfg).init, jax.random.key(0), tokens))
    leaves, tree = jax.tree_util.tree_flatten_with_path(shapes["params"])
    keys = jax.random.split(jax.random.key(seed), len(leaves))

    def draw(path, leaf, key):
        x = jax.random.normal(key, leaf.shape, leaf.dtype)
        return 1.0 + 0.2 * x if "scale" in jax.tree_util.keystr(path) else 0.3 * x

    return jax.tree.unflatten(tree, [draw(p, x, k) for (p, x), k in zip(leaves, keys)])


def write_hf(cfg, params, out, include_mtp=True, max_bytes=10**9, copies=False):
    exported = hf.to_hf(cfg, params, include_mtp=include_mtp, engine_copies=copies)
    safetensors_io.save(exported.tensors, str(out), max_bytes)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf.hf_config(cfg, include_mtp=include_mtp), f)
    return exported


def read_hf(path):
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f), safetensors_io.load(str(path))


def tree_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    same = jax.tree.structure(a) == jax.tree.structure(b)
    return same and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


# --------------------------------------------------------------------------- round trip

CASES = [
    dict(),
    dict(tie_embeddings=False),
    dict(mtp_share_depths=True),
    dict(mtp_share_depths=True, tie_embeddings=False, mtp_chain_input="normed"),
    dict(mtp_layout="parallel"),
    dict(mtp_layout="parallel", tie_embeddings=False, scan_layers=False),
    dict(param_dtype="bfloat16"),
]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_export_import_round_trip_is_bit_exact(tmp_path, kw):
    cfg = small(**kw)
    params = random_params(cfg)
    exported = write_hf(cfg, params, tmp_path, max_bytes=4096, copies=True)
    index = json.loads((tmp_path / safetensors_io.INDEX).read_text())  # sharded: 4 KB limit
    names = set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in exported.tensors.values())

    # Every tensor name is produced by exactly one parameter (engine copies aside).
    slots = layout.slots(cfg)
    produced = [hf.hf_name(cfg, s.name) for s in slots]
    assert len(set(produced)) == len(produced) == exported.parameters
    copies = {n for n in names if n.startswith("model.layers.") and n.endswith(hf.COPIES)}
    assert names - set(produced) == copies
    depth_layers = 0 if cfg.mtp_layout == "parallel" else 1 if cfg.mtp_share_depths else 2
    assert len(copies) == exported.copies == 2 * depth_layers
    assert sum(np.prod(s.shape) for s in slots) == param_count(cfg)

    hf_cfg, tensors = read_hf(tmp_path)
    # The storage dtype and the scan are run settings (the config's), not the checkpoint's.
    base = ModelConfig(scan_layers=cfg.scan_layers, param_dtype=cfg.param_dtype)
    src = hf.model_config_from_hf(hf_cfg, base)
    assert src == cfg
    back = layout.unflatten(src, hf.from_hf(src, hf_cfg, tensors))
    assert not tree_equal(back, random_params(cfg, seed=1))
    assert tree_equal(back, params)


def test_import_is_strict(tmp_path):
    cfg = small(tie_embeddings=False)
    write_hf(cfg, random_params(cfg), tmp_path, copies=True)
    hf_cfg, tensors = read_hf(tmp_path)
    bias = "model.layers.0.self_attn.q_proj.bias"
    with pytest.raises(hf.InteropError, match=bias.replace(".", r"\.")):
        hf.from_hf(cfg, hf_cfg, {**tensors, bias: np.ones(32, np.float32)})
    zero_bias = {**tensors, bias: np.zeros(32, np.float32)}  # computes nothing: accepted
    assert len(hf.from_hf(cfg, hf_cfg, zero_bias)) == len(layout.slots(cfg))
    missing = dict(tensors)
    del missing["model.norm.weight"]
    with pytest.raises(hf.InteropError, match=r"model\.norm\.weight"):
        hf.from_hf(cfg, hf_cfg, missing)
    copy = "model.layers.2.shared_head.head.weight"
    with pytest.raises(hf.InteropError, match=copy.replace(".", r"\.")):
        hf.from_hf(cfg, hf_cfg, {**tensors, copy: tensors[copy] + 1})


@pytest.mark.parametrize(
    "field,value",
    [
        ("rope_scaling", {"rope_type": "longrope", "factor": 8.0}),
        ("use_sliding_window", True),
        ("sliding_window", 4096),
        ("attention_bias", True),
        ("mlp_bias", True),
        ("hidden_act", "gelu"),
        ("model_type", "gpt2"),
        ("partial_rotary_factor", 0.5),
    ],
)
def test_unsupported_config_field_fails_naming_it(field, value):
    hf_cfg = hf.hf_config(small())
    with pytest.raises(hf.InteropError, match=field):
        hf.model_config_from_hf({**hf_cfg, field: value})


def test_plain_llama_config_gets_configured_depths():
    hf_cfg = hf.hf_config(small(), include_mtp=False)
    for key in ("mtp_jax", "head_dim", "num_key_value_heads", "rope_scaling"):
        hf_cfg.pop(key, None)
    cfg = hf.model_config_from_hf(hf_cfg, ModelConfig(mtp_depth=3, mtp_layout="parallel"))
    assert (cfg.n_kv_heads, cfg.head_dim, cfg.mtp_depth, cfg.mtp_layout) == (4, 8, 3, "parallel")
    deepseek = {**hf_cfg, "num_nextn_predict_layers": 1}
    cfg = hf.model_config_from_hf(deepseek, ModelConfig(mtp_depth=3))
    assert (cfg.mtp_depth, cfg.mtp_chain_input) == (1, "normed")


# --------------------------------------------------------------------------- HF semantics


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def hf_rope_parameters(c: dict, dim: int) -> tuple[np.ndarray, float]:
    """(inv_freq [dim/2], attention_factor) of config.json `c` for a rotated width `dim`:
    transformers' `modeling_rope_utils` transcribed (default, `_compute_llama3_parameters`,
    `_compute_yarn_parameters` with its `truncate` default and mscale ratio)."""
    base = c["rope_theta"]
    inv = 1.0 / base ** (np.arange(0, dim, 2) / dim)
    rs = c.get("rope_scaling") or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return inv, 1.0
    factor = rs["factor"]
    if kind == "llama3":
        old = rs["original_max_position_embeddings"]
        low_wl, high_wl = old / rs["low_freq_factor"], old / rs["high_freq_factor"]
        wavelen = 2 * np.pi / inv
        inv_llama = np.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old / wavelen - rs["low_freq_factor"]) / (
            rs["high_freq_factor"] - rs["low_freq_factor"]
        )
        smoothed = (1 - smooth) * inv_llama / factor + smooth * inv_llama
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        return np.where(medium, smoothed, inv_llama), 1.0
    assert kind == "yarn", kind
    orig = rs.get("original_max_position_embeddings", c.get("max_position_embeddings"))

    def get_mscale(scale, mscale=1):
        return 1.0 if scale <= 1 else 0.1 * mscale * np.log(scale) + 1.0

    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(rot):
        return dim * np.log(orig / (rot * 2 * np.pi)) / (2 * np.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = np.floor(low), np.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv = inv / factor * (1 - extrapolation) + inv * extrapolation
    return inv, attention_factor


def _rope(x, c):
    """HF Llama: inv_freq (`hf_rope_parameters`), emb = cat(freqs, freqs),
    (x * cos + rotate_half(x) * sin) * attention_factor with rotate_half(x) = cat(-x2, x1).
    x [T, heads, d]."""
    d = x.shape[-1]
    inv, attention_factor = hf_rope_parameters(c, d)
    emb = np.concatenate([np.arange(len(x))[:, None] * inv] * 2, -1)[:, None]
    rotated = np.concatenate([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return (x * np.cos(emb) + rotated * np.sin(emb)) * attention_factor


def _decoder_layer(x, t, p, c):
    """HF LlamaDecoderLayer on x [T, E] with the tensors t under prefix p (float64)."""
    nh, nkv, eps = c["num_attention_heads"], c["num_key_value_heads"], c["rms_norm_eps"]
    d = c["head_dim"]
    h = _rms(x, t[p + "input_layernorm.weight"], eps)
    q = (h @ t[p + "self_attn.q_proj.weight"].T).reshape(len(x), nh, d)
    k = (h @ t[p + "self_attn.k_proj.weight"].T).reshape(len(x), nkv, d)
    v = (h @ t[p + "self_attn.v_proj.weight"].T).reshape(len(x), nkv, d)
    q, k = _rope(q, c), _rope(k, c)
    k, v = np.repeat(k, nh // nkv, axis=1), np.repeat(v, nh // nkv, axis=1)  # repeat_kv
    scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d)  # LlamaAttention: no yarn mscale
    scores = np.where(np.tril(np.ones((len(x), len(x)), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attn = np.einsum("hqk,khd->qhd", probs, v).reshape(len(x), nh * d)
    x = x + attn @ t[p + "self_attn.o_proj.weight"].T
    h = _rms(x, t[p + "post_attention_layernorm.weight"], eps)
    gate, up = h @ t[p + "mlp.gate_proj.weight"].T, h @ t[p + "mlp.up_proj.weight"].T
    return x + (gate / (1 + np.exp(-gate)) * up) @ t[p + "mlp.down_proj.weight"].T


def _hf_logits(t, c, ids):
    """HF LlamaForCausalLM: (logits [T, V], pre-norm hidden, normed hidden)."""
    x = t["model.embed_tokens.weight"][ids]
    for i in range(c["num_hidden_layers"]):
        x = _decoder_layer(x, t, f"model.layers.{i}.", c)
    normed = _rms(x, t["model.norm.weight"], c["rms_norm_eps"])
    head = t["model.embed_tokens.weight" if c["tie_word_embeddings"] else "lm_head.weight"]
    return normed @ head.T, x, normed


def _engine_depth1(t, c, ids, prev, embedding_first=True):
    """The DeepSeek MTP layer as vLLM (`DeepSeekMultiTokenPredictorLayer`) and SGLang
    (`DeepseekModelNextN`) compute it, on the next tokens ids [T] (ids[i] = t[i+1]) and the
    trunk state prev [T, E]: eh_proj(cat[enorm(emb), hnorm(prev)]), the block,
    shared_head.norm, the per-layer head copy. (vLLM also zeroes the embedding at absolute
    position 0, `inputs_embeds[positions == 0] = 0`; SGLang and we do not. Through the
    layer's attention that one row reaches every later position, so it is left out here.)"""
    n, eps = c["num_hidden_layers"], c["rms_norm_eps"]
    p = f"model.layers.{n}."
    emb = t["model.embed_tokens.weight"][ids]
    parts = [_rms(emb, t[p + "enorm.weight"], eps), _rms(prev, t[p + "hnorm.weight"], eps)]
    x = np.concatenate(parts if embedding_first else parts[::-1], -1) @ t[p + "eh_proj.weight"].T
    x = _decoder_layer(x, t, p, c)
    return _rms(x, t[p + "shared_head.norm.weight"], eps) @ t[p + "shared_head.head.weight"].T


@pytest.mark.parametrize("tied", [True, False])
def test_exported_tensors_compute_our_logits_the_hf_and_vllm_way(tmp_path, tied):
    cfg = small(tie_embeddings=tied, mtp_depth=1, mtp_chain_input="normed")
    params = random_params(cfg)
    write_hf(cfg, params, tmp_path, copies=True)
    c, tensors = read_hf(tmp_path)
    t = {k: v.astype(np.float64) for k, v in tensors.items()}
    seq = 11
    tokens = jax.random.randint(jax.random.key(3), (1, seq + 1), 0, cfg.vocab_size)
    ours = np.asarray(mtp_jax.Model(cfg).apply({"params": params}, tokens).logits)[:, 0]
    ids = np.asarray(tokens[0])

    logits, pre, normed = _hf_logits(t, c, ids[:seq])
    assert np.max(np.abs(ours[0] - logits)) <= 1e-4
    assert np.max(np.abs(logits)) > 1.0  # not a vacuous comparison

    nxt = ids[1 : seq + 1]
    assert np.max(np.abs(ours[1] - _engine_depth1(t, c, nxt, normed))) <= 1e-4
    # The test tells the conventions apart: hidden-first columns or the pre-norm h^0 differ.
    assert np.max(np.abs(ours[1] - _engine_depth1(t, c, nxt, normed, False))) > 1e-2
    assert np.max(np.abs(ours[1] - _engine_depth1(t, c, nxt, pre))) > 1e-2


# --------------------------------------------------------------------------- model keys


def test_shared_depth_chain_equals_one_block_applied_d_times():
    assert param_count(small(mtp_share_depths=True, mtp_depth=1)) == param_count(
        small(mtp_share_depths=True, mtp_depth=4)
    )
    cfg = small(mtp_share_depths=True, mtp_depth=3, mtp_chain_input="normed")
    params = random_params(cfg)
    n_leaves = sum(x.size for x in jax.tree.leaves(params))
    assert n_leaves == param_count(cfg) == param_count(small(mtp_share_depths=True, mtp_depth=1))
    seq = 7
    tokens = jax.random.randint(jax.random.key(5), (2, seq + 3), 0, cfg.vocab_size)
    model = mtp_jax.Model(cfg)
    out = jax.jit(model.apply)({"params": params}, tokens)

    def trunk_normed(m, toks):
        positions = jnp.broadcast_to(jnp.arange(seq), (2, seq))
        h, _ = m.trunk(m.embed(toks[:, :seq]), positions)
        return m.final_norm(h), positions

    @jax.jit
    def loop(params, tokens):
        """The one depth module (no depth axis) applied three times in a Python loop."""
        h, positions = model.apply({"params": params}, tokens, method=trunk_normed)
        out = []
        for k in range(1, 4):
            emb = model.apply({"params": params}, tokens[:, k : k + seq], method="embed_tokens")
            h, (normed, _) = MTPDepth(cfg).apply(
                {"params": params["mtp"]["depths"]}, h, emb, positions, None, None
            )
            out.append(model.apply({"params": params}, normed, method="logits"))
        return jnp.stack(out)

    np.testing.assert_allclose(out.logits[1:], loop(params, tokens), atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="mtp_share_depths.*mtp_layout"):
        ModelConfig.validate({"mtp_share_depths": True, "mtp_layout": "parallel"})


def test_speculative_decoding_with_shared_normed_chain_equals_greedy():
    from mtp_jax.inference import generate, speculative_generate

    cfg = small(mtp_share_depths=True, mtp_depth=2, mtp_chain_input="normed")
    model, params = mtp_jax.Model(cfg), random_params(cfg)
    prompts = jax.random.randint(jax.random.key(2), (2, 5), 0, cfg.vocab_size)
    lengths = np.array([5, 3])
    plain = generate(model, params, prompts, lengths, max_new_tokens=8)
    spec = speculative_generate(model, params, prompts, lengths, max_new_tokens=8)
    assert len(set(plain.tokens[:, -1].tolist())) > 1 or len(set(plain.tokens[0].tolist())) > 2
    np.testing.assert_array_equal(spec.tokens, plain.tokens)


# --------------------------------------------------------------------------- CLIs, init.*


def _tiny_config(*overrides):
    from mtp_jax.config import load_config

    base = [*TINY_TRAIN, "data.source=synthetic", "train.steps=1", "checkpoint.every=0"]
    return load_config(CONFIGS / "smoke.py", [*base, *overrides])


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """(cfg, params, HF dir, workdir written by mtp-import) for the tiny training shape."""
    from mtp_jax.cli.hf_import import main as import_main

    root = tmp_path_factory.mktemp("hf")
    cfg = ModelConfig.from_any(_tiny_config().model)
    params = random_params(cfg)
    write_hf(cfg, params, root / "src")
    args = ["--hf", str(root / "src"), "--out", str(root / "w")]
    assert import_main([*args, "--config", str(CONFIGS / "smoke.py"), *_cli(TINY_TRAIN)]) == 0
    return cfg, params, root


def _cli(overrides):
    return [f"--config.{o}" for o in overrides]


def test_cli_import_export_round_trip(imported, tmp_path, capsys):
    from mtp_jax.cli.export import main as export_main
    from mtp_jax.train.checkpoint import load_params

    cfg, params, root = imported
    assert tree_equal(nn.unbox(load_params(str(root / "w"))), params)
    out = tmp_path / "out"
    args = ["--workdir", str(root / "w"), "--out", str(out), "--max-shard-size", "20KB"]
    assert export_main(args) == 0
    printed = capsys.readouterr().out
    assert f"wrote {len(layout.slots(cfg))} tensors" in printed
    assert "mtp_jax_tokenizer.json" in os.listdir(out)
    assert (out / safetensors_io.INDEX).exists()
    src, again = read_hf(root / "src")[1], read_hf(out)[1]
    assert set(src) == set(again)
    assert all(np.array_equal(src[k], again[k]) for k in src)

    assert export_main([*args[:3], str(tmp_path / "plain"), "--no-mtp"]) == 0
    n_mtp = sum(layout.is_mtp(s.name) for s in layout.slots(cfg))
    assert f"left out {n_mtp} MTP tensors" in capsys.readouterr().out
    assert not any(int(k.split(".")[2]) >= cfg.n_layers for k in read_hf(tmp_path / "plain")[1]
                   if k.startswith("model.layers."))  # fmt: skip


def test_cli_import_rejects_unsupported_field(imported, tmp_path, capsys):
    from mtp_jax.cli.hf_import import main as import_main

    cfg, _, root = imported
    bad = tmp_path / "bad"
    hf_cfg, tensors = read_hf(root / "src")
    bad.mkdir()
    safetensors_io.save(tensors, str(bad), 10**9)
    (bad / "config.json").write_text(json.dumps({**hf_cfg, "rope_scaling": {"type": "dynamic"}}))
    assert import_main(["--hf", str(bad), "--out", str(tmp_path / "w")]) == 2
    assert "'rope_scaling'" in capsys.readouterr().err


def test_init_sources_are_checked(imported):
    from mtp_jax.train.warm_start import source_params

    _, _, root = imported
    with pytest.raises(ConfigError, match="init.from_workdir"):
        _tiny_config(f"init.from_hf={root / 'src'}", f"init.from_workdir={root / 'w'}")
    with pytest.raises(ConfigError, match="model.mlp_dim"):
        source_params(_tiny_config(f"init.from_hf={root / 'src'}", "model.mlp_dim=32"))
    with pytest.raises(ConfigError, match="model.mtp_depth"):
        source_params(_tiny_config(f"init.from_workdir={root / 'w'}", "model.mtp_depth=1"))


@pytest.mark.parametrize("source", ["hf", "workdir", "plain_hf"])
def test_training_starts_from_the_imported_parameters(imported, tmp_path, source):
    """One step at learning rate 0 (the first step of the warmup): the run's parameters are
    exactly the source's; a plain Llama source gets freshly initialised depths."""
    from mtp_jax.train import train

    cfg, params, root = imported
    path = {"hf": root / "src", "workdir": root / "w", "plain_hf": tmp_path / "plain"}[source]
    if source == "plain_hf":
        write_hf(cfg, params, path, include_mtp=False)
    key = "init.from_workdir" if source == "workdir" else "init.from_hf"
    config = _tiny_config(f"{key}={path}", "train.warmup_steps=2")
    result = train(config, str(tmp_path / "run"), devices=jax.devices()[:1], progress=False)
    got, want = layout.flatten(cfg, result.state.params), layout.flatten(cfg, params)
    for name, value in want.items():
        if source == "plain_hf" and layout.is_mtp(name):
            assert not np.array_equal(got[name], value), name  # fresh, not the source's
        else:
            assert np.array_equal(got[name], value), name
