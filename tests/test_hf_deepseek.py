"""Hugging Face interop in DeepSeek-V3 naming (MLA + DeepSeekMoE + MTP layers): export ->
import is bit-exact; the exported tensors compute our logits under DeepseekV3 / vLLM semantics
(a float64 numpy forward written here from the config.json meaning: interleaved MLA rope,
group-limited noaux_tc routing, shared experts, a dense first layer, the MTP layer as vLLM
runs it); group-limited routing against brute force; refusals name the field; the CLIs."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CONFIGS
from test_hf import hf_rope_parameters, read_hf, tree_equal, write_hf

import mtp_jax
from mtp_jax.checks import ConfigError
from mtp_jax.interop import hf, safetensors_io
from mtp_jax.model import ModelConfig, layout
from mtp_jax.model.config import MoEConfig
from mtp_jax.model.flops import param_count
from mtp_jax.model.moe import route

MOE = dict(
    num_experts=8, top_k=2, shared_experts=2, expert_dim=16, first_dense_layers=1,
    routed_scaling=2.5, n_group=2, topk_group=1,
)  # fmt: skip


def ds(moe=None, **kw) -> ModelConfig:
    """A tiny DeepSeek-V3-shaped model: MLA (rope width 8: its permutation is not trivial),
    a dense first layer, then MoE layers, MTP depth 1."""
    values = dict(
        vocab_size=61, d_model=32, n_layers=2, n_heads=2, head_dim=8, mlp_dim=48,
        attention="mla", q_lora_rank=12, kv_lora_rank=16, qk_rope_head_dim=8, mtp_depth=1,
        rope_theta=500.0, moe=MoEConfig(**{**MOE, **(moe or {})}),
    )  # fmt: skip
    return ModelConfig(**{**values, **kw})


def random_params(cfg: ModelConfig, seed: int = 0):
    """Every leaf random (norm scales around 1, router biases non-zero), so that any
    transposition, permutation or swap shows. (numpy draws: one jitted RNG kernel per leaf
    shape costs seconds here.)"""
    tokens = jnp.zeros((1, 1 + cfg.mtp_depth), jnp.int32)
    shapes = nn.unbox(jax.eval_shape(mtp_jax.Model(cfg).init, jax.random.key(0), tokens))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        x = rng.standard_normal(leaf.shape)
        x = 1.0 + 0.2 * x if "scale" in jax.tree_util.keystr(path) else 0.3 * x
        return x.astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes["params"])


# --------------------------------------------------------------------------- round trip

CASES = {
    "q_lora": {},
    "full_rank_q,untied": dict(q_lora_rank=0, tie_embeddings=False),
    "bf16,shared_depths": dict(param_dtype="bfloat16", mtp_depth=2, mtp_share_depths=True),
    "dense_mla": dict(moe={"num_experts": 0}),
}


@pytest.mark.parametrize("kw", CASES.values(), ids=CASES.keys())
def test_export_import_round_trip_is_bit_exact(tmp_path, kw):
    cfg = ds(**kw)
    params = random_params(cfg)
    exported = write_hf(cfg, params, tmp_path, max_bytes=8192, copies=True)
    names = set(json.loads((tmp_path / safetensors_io.INDEX).read_text())["weight_map"])

    # Every HF tensor comes from exactly one slot (kv_b_proj: k_up and v_up together).
    slots = layout.slots(cfg)
    produced = [
        n for s in slots if not s.name.endswith("attn.v_up") for n in hf.hf_names(cfg, s.name)
    ]
    assert len(set(produced)) == len(produced) == exported.parameters
    copies = {n for n in names if n.startswith("model.layers.") and n.endswith(hf.COPIES)}
    assert names - set(produced) == copies
    assert sum(np.prod(s.shape) for s in slots) == param_count(cfg)
    if cfg.moe.enabled:  # 8 experts x 3 per MoE layer (layer 1 and the MTP layer 2)
        assert sum(".mlp.experts." in n for n in names) == 8 * 3 * 2
        assert "model.layers.0.mlp.gate_proj.weight" in names  # the dense first layer
        assert "model.layers.2.mlp.gate.e_score_correction_bias" in names  # an MoE MTP layer

    hf_cfg, tensors = read_hf(tmp_path)
    assert hf_cfg["model_type"] == "deepseek_v3"
    assert hf_cfg["q_lora_rank"] == (cfg.q_lora_rank or None)
    base = ModelConfig(param_dtype=cfg.param_dtype)
    src = hf.model_config_from_hf(hf_cfg, base)
    # A dense model's model.moe.* settings (other than num_experts=0) are the base config's.
    assert src == (cfg if cfg.moe.enabled else dataclasses.replace(cfg, moe=base.moe))
    back = layout.unflatten(src, hf.from_hf(src, hf_cfg, tensors))
    assert not tree_equal(back, random_params(cfg, seed=1))
    assert tree_equal(back, params)


def test_import_is_strict_and_names_tensors():
    cfg = ds(q_lora_rank=0)
    exported = hf.to_hf(cfg, random_params(cfg))
    hf_cfg = json.loads(json.dumps(hf.hf_config(cfg)))
    t = exported.tensors
    missing = {k: v for k, v in t.items() if k != "model.layers.1.mlp.experts.7.up_proj.weight"}
    with pytest.raises(hf.InteropError, match=r"experts\.7\.up_proj.*mlp\.wi_up"):
        hf.from_hf(cfg, hf_cfg, missing)
    kv = "model.layers.1.self_attn.kv_b_proj.weight"
    with pytest.raises(hf.InteropError, match=kv.replace(".", r"\.") + ".*shape"):
        hf.from_hf(cfg, hf_cfg, {**t, kv: t[kv][:-2]})
    extra = "model.layers.1.mlp.experts.8.up_proj.weight"
    with pytest.raises(hf.InteropError, match=extra.replace(".", r"\.")):
        hf.from_hf(cfg, hf_cfg, {**t, extra: t["model.layers.1.mlp.experts.7.up_proj.weight"]})


# --------------------------------------------------------------------------- DeepseekV3 semantics


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _rope(x, c, interleaved=True):
    """x [T, heads, d] at positions 0..T-1, frequencies and cos/sin factor of config.json `c`
    (`hf_rope_parameters`: theta^(-2j/d) unscaled). Interleaved: vLLM's
    `get_rope(..., is_neox_style=False)` for DeepSeek (GPT-J pairs (2j, 2j+1)); else HF's
    rotate_half on the two halves (what un-permuted weights would need)."""
    d = x.shape[-1]
    inv, attention_factor = hf_rope_parameters(c, d)
    angle = np.arange(len(x))[:, None, None] * inv  # [T, 1, d/2]
    cos, sin = np.cos(angle) * attention_factor, np.sin(angle) * attention_factor
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        return out
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _softmax_scale(c, softmax_mscale=True):
    """DeepseekV3Attention.scaling: qk_head_dim^-0.5, times yarn_get_mscale(factor,
    mscale_all_dim)^2 when rope_scaling has a non-zero mscale_all_dim."""
    scale = (c["qk_nope_head_dim"] + c["qk_rope_head_dim"]) ** -0.5
    rs = c.get("rope_scaling") or {}
    if softmax_mscale and rs.get("mscale_all_dim"):
        factor = rs["factor"]
        mscale = 1.0 if factor <= 1 else 0.1 * rs["mscale_all_dim"] * np.log(factor) + 1.0
        scale *= mscale * mscale
    return scale


def _silu(x):
    return x / (1 + np.exp(-x))


def _mla(h, t, p, c, interleaved=True, softmax_mscale=True):
    """DeepseekV3Attention on normed h [T, E] (prefix p; causal, no cache)."""
    n, dn, dr, dv = (
        c[k] for k in ("num_attention_heads", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
    )
    eps, lat = c["rms_norm_eps"], c["kv_lora_rank"]
    a = p + "self_attn."
    if c["q_lora_rank"]:
        q = _rms(h @ t[a + "q_a_proj.weight"].T, t[a + "q_a_layernorm.weight"], eps)
        q = q @ t[a + "q_b_proj.weight"].T
    else:
        q = h @ t[a + "q_proj.weight"].T
    q = q.reshape(len(h), n, dn + dr)
    ckv = h @ t[a + "kv_a_proj_with_mqa.weight"].T  # [T, C + R]
    kv = _rms(ckv[:, :lat], t[a + "kv_a_layernorm.weight"], eps) @ t[a + "kv_b_proj.weight"].T
    kv = kv.reshape(len(h), n, dn + dv)
    q_pe = _rope(q[..., dn:], c, interleaved)
    k_pe = _rope(ckv[:, None, lat:], c, interleaved)  # one rope key for all heads
    scores = np.einsum("qhd,khd->hqk", q[..., :dn], kv[..., :dn])
    scores = (scores + np.einsum("qhd,kd->hqk", q_pe, k_pe[:, 0])) * _softmax_scale(
        c, softmax_mscale
    )
    scores = np.where(np.tril(np.ones((len(h), len(h)), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("hqk,khd->qhd", probs, kv[..., dn:]).reshape(len(h), n * dv)
    return out @ t[a + "o_proj.weight"].T


def _swiglu(h, t, p):
    gate, up = h @ t[p + "gate_proj.weight"].T, h @ t[p + "up_proj.weight"].T
    return (_silu(gate) * up) @ t[p + "down_proj.weight"].T


def _select(scores, bias, c, groups=True):
    """noaux_tc selection (vLLM `grouped_topk`): the top-k experts of score + bias inside the
    topk_group groups with the best sums of their top-2 score + bias. -> [T, k] ids."""
    choice = scores + bias
    g, tg = c["n_group"], c["topk_group"]
    if groups and g > 1:
        grouped = choice.reshape(len(choice), g, -1)
        group_score = np.sort(grouped, -1)[..., -2:].sum(-1)  # [T, G]
        kept = np.argsort(-group_score, -1)[:, :tg]
        mask = np.zeros_like(group_score, bool)
        np.put_along_axis(mask, kept, True, -1)
        choice = np.where(mask[..., None], grouped, -np.inf).reshape(choice.shape)
    return np.argsort(-choice, -1, kind="stable")[:, : c["num_experts_per_tok"]]


def _moe(h, t, p, c, groups=True, biased_gates=False):
    """DeepseekV3MoE on normed h [T, E]: routed experts weighted by the selected un-biased
    scores, normalised, times routed_scaling_factor; plus the shared experts."""
    m = p + "mlp."
    scores = 1 / (1 + np.exp(-(h @ t[m + "gate.weight"].T)))  # [T, n]
    bias = t[m + "gate.e_score_correction_bias"]
    sel = _select(scores, bias, c, groups)
    w = np.take_along_axis(scores + bias if biased_gates else scores, sel, -1)
    w = w / w.sum(-1, keepdims=True) * c["routed_scaling_factor"]
    out = _swiglu(h, t, m + "shared_experts.")
    for i in range(len(h)):
        for j, g in zip(sel[i], w[i]):
            out[i] += g * _swiglu(h[i : i + 1], t, f"{m}experts.{j}.")[0]
    return out


def _layer(x, t, i, c, **conv):
    """DeepseekV3DecoderLayer i (MoE from first_k_dense_replace on) on x [T, E]."""
    p, eps = f"model.layers.{i}.", c["rms_norm_eps"]
    rope = {k: v for k, v in conv.items() if k in ("interleaved", "softmax_mscale")}
    routing = {k: v for k, v in conv.items() if k not in rope}
    x = x + _mla(_rms(x, t[p + "input_layernorm.weight"], eps), t, p, c, **rope)
    h = _rms(x, t[p + "post_attention_layernorm.weight"], eps)
    if i >= c["first_k_dense_replace"]:
        return x + _moe(h, t, p, c, **routing)
    return x + _swiglu(h, t, p + "mlp.")


def _trunk(t, c, ids, **conv):
    """DeepseekV3ForCausalLM: (logits [T, V], the normed final hidden state)."""
    x = t["model.embed_tokens.weight"][ids]
    for i in range(c["num_hidden_layers"]):
        x = _layer(x, t, i, c, **conv)
    normed = _rms(x, t["model.norm.weight"], c["rms_norm_eps"])
    head = t["model.embed_tokens.weight" if c["tie_word_embeddings"] else "lm_head.weight"]
    return normed @ head.T, normed


def _mtp_layer(t, c, nxt, prev, **conv):
    """vLLM's DeepSeekMultiTokenPredictorLayer at model.layers.{L} (a full decoder layer,
    MoE): eh_proj(cat[enorm(Emb(t[i+1])), hnorm(h^0)]), the layer, shared_head.norm and the
    layer's head copy. (vLLM's zeroing of the embedding at position 0 is left out, as in
    test_hf.)"""
    n, eps = c["num_hidden_layers"], c["rms_norm_eps"]
    p = f"model.layers.{n}."
    emb = _rms(t["model.embed_tokens.weight"][nxt], t[p + "enorm.weight"], eps)
    x = (
        np.concatenate([emb, _rms(prev, t[p + "hnorm.weight"], eps)], -1)
        @ t[p + "eh_proj.weight"].T
    )
    x = _layer(x, t, n, c, **conv)
    return _rms(x, t[p + "shared_head.norm.weight"], eps) @ t[p + "shared_head.head.weight"].T


def test_exported_tensors_compute_our_logits_the_deepseek_v3_and_vllm_way(tmp_path):
    cfg = ds(tie_embeddings=False, mtp_chain_input="normed")
    params = random_params(cfg)
    write_hf(cfg, params, tmp_path, copies=True)
    c, tensors = read_hf(tmp_path)
    t = {k: v.astype(np.float64) for k, v in tensors.items()}
    seq = 9
    tokens = jax.random.randint(jax.random.key(3), (1, seq + 1), 0, cfg.vocab_size)
    ours = np.asarray(jax.jit(mtp_jax.Model(cfg).apply)({"params": params}, tokens).logits)[:, 0]
    ids = np.asarray(tokens[0])

    logits, normed = _trunk(t, c, ids[:seq])
    assert np.max(np.abs(ours[0] - logits)) <= 1e-4
    assert np.max(np.abs(logits)) > 1.0  # not a vacuous comparison
    depth1 = _mtp_layer(t, c, ids[1 : seq + 1], normed)
    assert np.max(np.abs(ours[1] - depth1)) <= 1e-4

    # The reference tells the conventions apart: un-permuted rope rows (halves), gates from
    # the biased scores, or routing without the group limit all give other logits.
    for wrong in (dict(interleaved=False), dict(biased_gates=True), dict(groups=False)):
        assert np.max(np.abs(ours[0] - _trunk(t, c, ids[:seq], **wrong)[0])) > 1e-2, wrong


# --------------------------------------------------------------------------- routing


def _plain_route(logits, bias, top_k, scaling):
    """The router as it was before groups: top-k of sigmoid + bias."""
    scores = jax.nn.sigmoid(logits.astype(jnp.float32))
    _, experts = jax.lax.top_k(scores + bias.astype(jnp.float32), top_k)
    chosen = jnp.take_along_axis(scores, experts, axis=-1)
    return experts.astype(jnp.int32), scaling * chosen / jnp.sum(chosen, -1, keepdims=True)


def test_group_limited_routing_equals_brute_force():
    t, e, k = 256, 16, 4
    logits = jax.random.normal(jax.random.key(0), (t, e)) * 2
    bias = jax.random.normal(jax.random.key(1), (e,)) * 0.3

    # n_group = 1 (the default) is bit-identical to plain top-k; so is keeping every group.
    plain = _plain_route(logits, bias, k, 2.5)
    for groups in ((1, 1), (4, 4)):
        r = route(logits, bias, k, 2.5, *groups)
        assert np.array_equal(r.experts, plain[0]) and np.array_equal(r.gates, plain[1])

    c = {"n_group": 4, "topk_group": 2, "num_experts_per_tok": k}
    r = route(logits, bias, k, 2.5, n_group=4, topk_group=2)
    experts = np.asarray(r.experts)
    used_groups = np.array([len(set(row // 4)) for row in experts])
    assert used_groups.max() <= 2
    assert np.array([len(set(row // 4)) for row in np.asarray(plain[0])]).max() > 2  # it binds
    scores, b = np.asarray(jax.nn.sigmoid(logits), np.float64), np.asarray(bias, np.float64)
    want = _select(scores, b, c)
    assert np.array_equal(np.sort(experts, -1), np.sort(want, -1))
    assert not np.array_equal(np.sort(experts, -1), np.sort(_select(scores, b, c, False), -1))
    chosen = np.take_along_axis(scores, experts, -1)
    np.testing.assert_allclose(r.gates, 2.5 * chosen / chosen.sum(-1, keepdims=True), rtol=1e-6)


@pytest.mark.parametrize(
    "moe,key",
    [
        (dict(n_group=3), "model.moe.n_group"),  # does not divide 8
        (dict(n_group=8, topk_group=1, top_k=1), "model.moe.n_group"),  # groups of 1
        (dict(n_group=2, topk_group=3), "model.moe.topk_group"),
        (dict(n_group=4, topk_group=1, top_k=3), "model.moe.top_k"),  # 1 group holds 2
    ],
)
def test_group_settings_are_validated(moe, key):
    from mtp_jax.config import base_config

    assert {"n_group", "topk_group"} <= set(base_config().model.moe)
    ModelConfig.validate({"moe": {**MOE, "n_group": 4, "topk_group": 2, "top_k": 3}})
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        ModelConfig.validate({"moe": {**MOE, **moe}})


# --------------------------------------------------------------------------- configs

V3 = {  # DeepSeek-V3's released config.json, less its fp8 quantization_config and YaRN
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"},
    "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1,
    "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168,
    "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "moe_intermediate_size": 2048, "moe_layer_freq": 1,
    "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61,
    "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 10000, "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid", "seq_aux": True, "tie_word_embeddings": False, "topk_group": 4,
    "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "transformers_version": "4.33.1",
    "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}  # fmt: skip


def test_real_v3_config_imports_as_our_deepseek_v3():
    base = ModelConfig(moe=MoEConfig(num_experts=8, dense_mtp=True, bias_update_rate=0.5))
    got = hf.model_config_from_hf(V3, base)
    m = got.moe
    assert (m.num_experts, m.top_k, m.n_group, m.topk_group, m.first_dense_layers) == (
        256,
        8,
        8,
        4,
        3,
    )
    assert (m.shared_experts, m.expert_dim, m.routed_scaling, m.dense_mtp) == (1, 2048, 2.5, False)
    assert m.bias_update_rate == 0.5  # a training setting: the base config's
    assert (got.attention, got.q_lora_rank, got.kv_lora_rank, got.qk_rope_head_dim) == (
        "mla",
        1536,
        512,
        64,
    )
    assert (got.head_dim, got.n_layers, got.mtp_depth, got.mtp_chain_input) == (
        128,
        61,
        1,
        "normed",
    )
    # As transformers' save_pretrained writes it: derived fields, rope_parameters, no router
    # fields (transformers always routes noaux_tc by sigmoid).
    saved = {k: v for k, v in V3.items() if k not in ("scoring_func", "topk_method", "rope_theta")}
    saved |= {"head_dim": 64, "qk_head_dim": 192, "rope_interleave": True}
    saved |= {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    assert hf.model_config_from_hf(saved, base) == got
    with pytest.raises(hf.InteropError, match="model.moe.n_group"):
        hf.check_matches(
            dataclasses.replace(got, moe=dataclasses.replace(m, n_group=1)), got, "src", True
        )


@pytest.mark.parametrize(
    "field,value",
    [
        ("rope_scaling", {"type": "longrope", "factor": 40, "short_factor": [1.0]}),
        ("rope_scaling", {"type": "yarn", "factor": 40, "mscale": 1.0, "long_factor": [1.0]}),
        ("scoring_func", "softmax"),
        ("topk_method", "greedy"),
        ("norm_topk_prob", False),
        ("moe_layer_freq", 2),
        ("rope_interleave", False),
        ("v_head_dim", 16),
        ("num_key_value_heads", 1),
        ("first_k_dense_replace", 2),
        ("quantization_config", {"quant_method": "fp8"}),
        ("head_dim", 16),  # transformers derives it as qk_rope_head_dim (8)
        ("index_topk", 2048),  # DeepSeek-V3.2's sparse attention
    ],
)
def test_unsupported_deepseek_field_fails_naming_it(field, value):
    c = hf.hf_config(ds())
    with pytest.raises(hf.InteropError, match=f"'{field}'"):
        hf.model_config_from_hf({**c, field: value})


@pytest.mark.parametrize(
    "kw,key",
    [
        (dict(moe={"dense_mtp": True}), "model.moe.dense_mtp"),
        (dict(attention="mha", n_kv_heads=1), "model.attention"),
        (dict(moe={"shared_experts": 0}), "model.moe.shared_experts"),
    ],
)
def test_unexportable_model_fails_naming_the_key(kw, key):
    cfg = ds(**kw)
    with pytest.raises(hf.InteropError, match=key.replace(".", r"\.")):
        hf.hf_config(cfg)
    if key == "model.moe.dense_mtp":  # the depths left out, nothing stands in the way
        assert hf.hf_config(cfg, include_mtp=False)["model_type"] == "deepseek_v3"


# --------------------------------------------------------------------------- CLIs


def test_cli_import_export_round_trip(tmp_path, capsys):
    from mtp_jax.cli.export import main as export_main
    from mtp_jax.cli.hf_import import main as import_main
    from mtp_jax.train.checkpoint import load_params, saved_config

    cfg = ds(q_lora_rank=0, mtp_chain_input="normed", moe={"routed_scaling": 1.0})
    params = random_params(cfg)
    write_hf(cfg, params, tmp_path / "src", copies=True)
    run = ["data.seq_len=16", "data.batch_size=2", "loss.chunk_size=8"]
    run = [f"--config.{o}" for o in [*run, "model.moe.bias_update_rate=0.01"]]
    args = ["--hf", str(tmp_path / "src"), "--out", str(tmp_path / "w")]
    assert import_main([*args, "--config", str(CONFIGS / "moe_smoke.py"), *run]) == 0
    assert tree_equal(nn.unbox(load_params(str(tmp_path / "w"))), params)
    moe = saved_config(str(tmp_path / "w"))[0].model.moe  # the architecture from config.json,
    assert (moe.n_group, moe.expert_dim, moe.bias_update_rate) == (2, 16, 0.01)  # training: ours

    assert (
        export_main(
            ["--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "out"), "--engine-copies"]
        )
        == 0
    )
    assert "plus 2 engine copies" in capsys.readouterr().out
    (c_src, t_src), (c_out, t_out) = read_hf(tmp_path / "src"), read_hf(tmp_path / "out")
    assert set(t_src) == set(t_out) and all(np.array_equal(t_src[k], t_out[k]) for k in t_src)
    assert c_out["model_type"] == "deepseek_v3" and (c_out["n_group"], c_out["topk_group"]) == (
        2,
        1,
    )
    assert {k: v for k, v in c_out.items() if k != "max_position_embeddings"} == {
        k: v for k, v in c_src.items() if k != "max_position_embeddings"
    }
