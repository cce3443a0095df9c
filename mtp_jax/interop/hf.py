"""Our parameters and ModelConfig <-> Hugging Face tensors and config.json.

Dense grouped-query models are written in Llama naming (`LlamaForCausalLM`); MLA and MoE
models in DeepSeek-V3's (`DeepseekV3ForCausalLM`, model_type `deepseek_v3`, as HF
transformers and vLLM's DeepSeek loader read it). Naming (torch `Linear.weight` is
[out, in]; every name is written by exactly one parameter, except `kv_b_proj`, written from
k_up and v_up together):

| ours (`mtp_jax.model.layout` slot)    | Hugging Face tensor                                  |
|---------------------------------------|------------------------------------------------------|
| embed.embedding [V, E]                | model.embed_tokens.weight [V, E]                     |
| head [E, V] (untied only)             | lm_head.weight [V, E]                                |
| final_norm.scale                      | model.norm.weight                                    |
| layers.{i}.attn_norm.scale            | model.layers.{i}.input_layernorm.weight              |
| layers.{i}.attn.{query,key,value}     | model.layers.{i}.self_attn.{q,k,v}_proj.weight [NH, E]|
| layers.{i}.attn.out [N, H, E]         | model.layers.{i}.self_attn.o_proj.weight [E, NH]     |
| layers.{i}.mlp_norm.scale             | model.layers.{i}.post_attention_layernorm.weight     |
| layers.{i}.mlp.{gate,up,down}.kernel  | model.layers.{i}.mlp.{gate,up,down}_proj.weight      |
| depths.{k}.embed_norm / hidden_norm   | model.layers.{L+k-1}.enorm / hnorm.weight            |
| depths.{k}.proj.kernel [2E, E]        | model.layers.{L+k-1}.eh_proj.weight [E, 2E]          |
| depths.{k}.block.<block>              | model.layers.{L+k-1}.<block names as above>          |
| depths.{k}.out_norm.scale             | model.layers.{L+k-1}.shared_head.norm.weight         |
| heads.{k}.block.<block>, out_norm     | model.mtp_heads.{k-1}.<block names>, .norm.weight    |

MLA (`model.attention='mla'`; R = qk_rope_head_dim, C = kv_lora_rank, Q = q_lora_rank), under
`model.layers.{i}.self_attn.`:

| attn.query [E, N, H+R] (Q = 0)        | q_proj.weight [N(H+R), E]                            |
| attn.q_down [E, Q], attn.q_norm.scale | q_a_proj.weight [Q, E], q_a_layernorm.weight         |
| attn.q_up [Q, N, H+R]                 | q_b_proj.weight [N(H+R), Q]                          |
| attn.kv_down [E, C+R]                 | kv_a_proj_with_mqa.weight [C+R, E]                   |
| attn.kv_norm.scale                    | kv_a_layernorm.weight                                |
| attn.k_up, attn.v_up [C, N, H]        | kv_b_proj.weight [N(H+H), C] (per head: k_nope, v)   |
| attn.out [N, H, E]                    | o_proj.weight [E, NH]                                |

DeepSeekMoE (layers from `first_k_dense_replace` = model.moe.first_dense_layers, and the MTP
layers), under `model.layers.{i}.mlp.`:

| mlp.router [E, n], mlp.router_bias [n]| gate.weight [n, E], gate.e_score_correction_bias     |
| mlp.{wi_gate,wi_up} [n, E, F]         | experts.{j}.{gate,up}_proj.weight [F, E], j < n      |
| mlp.wo [n, F, E]                      | experts.{j}.down_proj.weight [E, F]                  |
| mlp.shared.{gate,up,down}.kernel      | shared_experts.{gate,up,down}_proj.weight (width     |
|                                       | n_shared_experts * moe_intermediate_size)            |

Sequential depths follow DeepSeek-V3's released files (`num_nextn_predict_layers = D` in
config.json). Shared depths (`model.mtp_share_depths`) are one such layer,
`num_nextn_predict_layers = 1`: vLLM applies layer `spec_step_idx % num_mtp_layers`, i.e. the
one layer at every draft step, which is our shared chain. With `engine_copies`, each depth
layer also carries `embed_tokens.weight` and `shared_head.head.weight` copies of the shared
embedding / head, as the released DeepSeek-V3 files do (written, read back and checked equal,
never counted as parameters). Parallel heads (Gloeckle et al.) have no engine convention: the
`model.mtp_heads.{k-1}.` naming above is ours.

Two facts about the engines (checked in vLLM `vllm/model_executor/models/deepseek_mtp.py`
and `deepseek_v2.py`, SGLang `python/sglang/srt/models/deepseek_nextn.py`):
- `eh_proj(torch.cat([enorm(inputs_embeds), hnorm(previous_hidden_states)]))`: the
  embedding comes FIRST, the reverse of the paper's eq. 21 and of our `proj` (hidden first).
  Export and import swap the two halves of the projection's input columns.
- h^0: vLLM's `DeepseekV2Model.forward` ends with `hidden_states, _ = self.norm(...)` and the
  model runner hands those returned hidden states to the MTP drafter
  (`target_hidden_states`); SGLang's captured `spec_info.hidden_states` are the same output.
  So the engines feed the trunk's state AFTER its final norm, where our default chain reads
  it before (`model.mtp_chain_input='trunk'`). A model meant to draft in those engines as it
  does here is trained with `model.mtp_chain_input='normed'`; an export of a 'trunk' model
  works but drafts differently there. Deeper steps: vLLM chains each MTP layer's output
  before `shared_head.norm` (as we do); SGLang supports a single next-n layer.
RoPE: our rotary embedding rotates the two halves of each head (HF's `rotate_half`) with the
same frequencies `theta^(-2j/H)`, so Llama q/k rows need no permutation. DeepSeek's MLA
weights are interleaved instead: vLLM rotates the pairs (2j, 2j+1) of the R rope rows
(`get_rope(..., is_neox_style=False)`) and transformers de-interleaves them before
`rotate_half` (`apply_rotary_pos_emb_interleave`, `rope_interleave: true`), both with
frequencies theta^(-2j/R). Our rope row j is their row 2j and our row R/2 + j their row
2j + 1: export interleaves the rope rows of q_proj / q_b_proj (per head) and of
kv_a_proj_with_mqa, import undoes it. Scores are scaled by 1/sqrt(H + R) on both sides.

RoPE scaling (`model.rope_scaling.*` <-> config.json `rope_scaling`, or transformers 5's
`rope_parameters`): rope_type 'llama3' (Llama 3.1/3.2) and 'yarn' (DeepSeek-V3: factor 40,
beta_fast 32, beta_slow 1, mscale = mscale_all_dim = 1, original 4096); frequencies from the
rotated width (head_dim, or qk_rope_head_dim for MLA) as transformers'
`modeling_rope_utils._compute_llama3_parameters` / `_compute_yarn_parameters` (truncate
default, the `attention_factor` mscale ratio on cos/sin) compute them
(`mtp_jax.model.layers.rope_inv_freq`). The softmax scale differs by architecture, as there:
`DeepseekV3Attention` (and vLLM's `DeepseekV2Attention`) multiply 1/sqrt(H + R) by
mscale(factor, mscale_all_dim)^2 when mscale_all_dim is set (our MLA does:
`mla.softmax_scale`); `LlamaAttention` keeps 1/sqrt(H) under yarn (our GQA does). Other
rope_types (linear, dynamic, longrope, ...) and unknown fields in the dict are refused, naming
them. Yarn exports write max_position_embeddings = original x factor (older transformers derive
yarn's factor from the two).

DeepSeek-V3 MTP layers are full decoder layers, MoE from `first_k_dense_replace` on, so
`model.moe.dense_mtp=True` has no equivalent there (refused on export; imports set it False).
Routing is V3's `noaux_tc` (config.json `scoring_func: sigmoid`, `topk_method: noaux_tc`,
`norm_topk_prob: true`, `n_group` / `topk_group` = model.moe.n_group / topk_group). Where HF
masks the experts of dropped groups to 0 before the final top-k, vLLM and DeepSeek's own
code mask them to -inf, as we do; the two agree whenever the kept groups hold top_k experts
with affinity + bias > 0 (always, unless the bias is very negative). Our training-only MoE
keys (bias_update_rate, balance_loss_weight, capacity_factor) have no place in config.json:
an import takes them from the base config; the engines route dropless.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from mtp_jax.checks import ConfigError
from mtp_jax.model import layout
from mtp_jax.model.config import ModelConfig, RopeScalingConfig

ARCH = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
DEEPSEEK_ARCH = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"}
MTP_KEYS = ("mtp_depth", "mtp_layout", "mtp_share_depths", "mtp_chain_input")

_BLOCK = {
    "attn_norm.scale": "input_layernorm.weight",
    "attn.query": "self_attn.q_proj.weight",
    "attn.key": "self_attn.k_proj.weight",
    "attn.value": "self_attn.v_proj.weight",
    "attn.out": "self_attn.o_proj.weight",
    "mlp_norm.scale": "post_attention_layernorm.weight",
    "mlp.gate.kernel": "mlp.gate_proj.weight",
    "mlp.up.kernel": "mlp.up_proj.weight",
    "mlp.down.kernel": "mlp.down_proj.weight",
    # MLA (DeepSeek-V3)
    "attn.q_down": "self_attn.q_a_proj.weight",
    "attn.q_norm.scale": "self_attn.q_a_layernorm.weight",
    "attn.q_up": "self_attn.q_b_proj.weight",
    "attn.kv_down": "self_attn.kv_a_proj_with_mqa.weight",
    "attn.kv_norm.scale": "self_attn.kv_a_layernorm.weight",
    "attn.k_up": "self_attn.kv_b_proj.weight",
    "attn.v_up": "self_attn.kv_b_proj.weight",
    # DeepSeekMoE ({j}: one tensor per routed expert)
    "mlp.router": "mlp.gate.weight",
    "mlp.router_bias": "mlp.gate.e_score_correction_bias",
    "mlp.wi_gate": "mlp.experts.{j}.gate_proj.weight",
    "mlp.wi_up": "mlp.experts.{j}.up_proj.weight",
    "mlp.wo": "mlp.experts.{j}.down_proj.weight",
    "mlp.shared.gate.kernel": "mlp.shared_experts.gate_proj.weight",
    "mlp.shared.up.kernel": "mlp.shared_experts.up_proj.weight",
    "mlp.shared.down.kernel": "mlp.shared_experts.down_proj.weight",
}
_EXPERTS = ("mlp.wi_gate", "mlp.wi_up", "mlp.wo")
_DEPTH = {
    "hidden_norm.scale": "hnorm.weight",
    "embed_norm.scale": "enorm.weight",
    "proj.kernel": "eh_proj.weight",
    "out_norm.scale": "shared_head.norm.weight",
}
_HEAD = {"out_norm.scale": "norm.weight"}
_TOP = {
    "embed.embedding": "model.embed_tokens.weight",
    "head": "lm_head.weight",
    "final_norm.scale": "model.norm.weight",
}
COPIES = ("embed_tokens.weight", "shared_head.head.weight")


class InteropError(ConfigError):
    """A Hugging Face config or checkpoint we cannot represent exactly, or a source that does
    not fit the configured model; names the field, tensor or config key."""


def is_deepseek(cfg: ModelConfig) -> bool:
    """Whether `cfg` exports in DeepSeek-V3 naming (MLA or MoE) rather than Llama's."""
    return cfg.attention == "mla" or cfg.moe.enabled


# ------------------------------------------------------------------------------ names


def _block_part(slot: str) -> str | None:
    """The <block> part of a block slot (`layers.3.attn.out` -> `attn.out`), else None."""
    if slot in _TOP:
        return None
    kind, _, rest = slot.split(".", 2)
    if kind == "layers":
        return rest
    return rest[len("block.") :] if rest.startswith("block.") else None


def hf_name(cfg: ModelConfig, slot: str) -> str:
    """Our slot name -> its Hugging Face tensor name (see the module docstring); for the
    per-expert slots (mlp.wi_gate, wi_up, wo) a template with `{j}` (see `hf_names`)."""
    if slot in _TOP:
        return _TOP[slot]
    kind, k, rest = slot.split(".", 2)
    if kind == "layers":
        return f"model.layers.{k}.{_BLOCK[rest]}"
    sub = _BLOCK[rest[len("block.") :]] if rest.startswith("block.") else None
    if kind == "depths":
        return f"model.layers.{cfg.n_layers + int(k) - 1}.{sub or _DEPTH[rest]}"
    return f"model.mtp_heads.{int(k) - 1}.{sub or _HEAD[rest]}"


def hf_names(cfg: ModelConfig, slot: str) -> tuple[str, ...]:
    """Every Hugging Face tensor `slot` is written to (one per routed expert for the expert
    weights; `kv_b_proj` for both k_up and v_up)."""
    name = hf_name(cfg, slot)
    if "{j}" in name:
        return tuple(name.format(j=j) for j in range(cfg.moe.num_experts))
    return (name,)


def _interleave(x: np.ndarray, r: int) -> np.ndarray:
    """Our rope layout (halves) -> DeepSeek's (pairs) on the last r entries of the last axis:
    their entry 2j is our j, their 2j + 1 our r/2 + j."""
    half = r // 2
    order = np.stack([np.arange(half), np.arange(half) + half], -1).reshape(-1)
    return np.concatenate([x[..., :-r], x[..., -r:][..., order]], -1)


def _deinterleave(x: np.ndarray, r: int) -> np.ndarray:
    """Inverse of `_interleave`."""
    rope = x[..., -r:]
    return np.concatenate([x[..., :-r], rope[..., 0::2], rope[..., 1::2]], -1)


def _to_hf(
    cfg: ModelConfig, slot: str, x: np.ndarray, flat: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Our value of `slot` -> {HF name: tensor} ([out, in] matrices; eh_proj embedding-first;
    MLA rope rows interleaved; one tensor per routed expert; v_up goes with k_up)."""
    name, part, r = hf_name(cfg, slot), _block_part(slot), cfg.qk_rope_head_dim
    mla = cfg.attention == "mla"
    if part in _EXPERTS:
        return {n: x[j].T for j, n in enumerate(hf_names(cfg, slot))}
    if part == "attn.v_up":
        return {}  # written with k_up, into kv_b_proj
    if part == "attn.k_up":
        v = flat[slot.removesuffix("attn.k_up") + "attn.v_up"]
        return {name: np.concatenate([x, v], -1).reshape(x.shape[0], -1).T}  # [N(H+H), C]
    if mla and part in ("attn.query", "attn.q_up"):
        return {name: _interleave(x, r).reshape(x.shape[0], -1).T}  # [N(H+R), E or Q]
    if part == "attn.kv_down":
        return {name: _interleave(x, r).T}
    if part in ("attn.query", "attn.key", "attn.value"):
        return {name: x.reshape(x.shape[0], -1).T}  # [E, N, H] -> [N*H, E]
    if part == "attn.out":
        return {name: x.reshape(-1, x.shape[-1]).T}  # [N, H, E] -> [E, N*H]
    if slot.endswith("proj.kernel") and slot.startswith("depths."):
        e = x.shape[1]
        return {name: np.concatenate([x[e:], x[:e]]).T}  # rows [hidden; emb] -> [emb, hidden]
    if slot == "head" or slot.endswith(".kernel") or part in ("attn.q_down", "mlp.router"):
        return {name: x.T}
    return {name: x}


def _from_hf(
    cfg: ModelConfig,
    slot: str,
    shape: tuple[int, ...],
    read: Callable[[str, tuple[int, ...]], np.ndarray],
) -> np.ndarray:
    """Inverse of `_to_hf`: our value of `slot` (of `shape`), from `read(name, HF shape)`,
    which returns the tensor or raises naming it (missing, or of another shape)."""
    name, part, r = hf_name(cfg, slot), _block_part(slot), cfg.qk_rope_head_dim
    mla = cfg.attention == "mla"
    if part in _EXPERTS:
        return np.stack([read(n, shape[:0:-1]).T for n in hf_names(cfg, slot)])
    if part in ("attn.k_up", "attn.v_up"):
        c, n, h = shape
        kv = read(name, (n * 2 * h, c)).T.reshape(c, n, 2 * h)
        return kv[..., :h] if part == "attn.k_up" else kv[..., h:]
    if mla and part in ("attn.query", "attn.q_up"):
        return _deinterleave(read(name, (int(np.prod(shape[1:])), shape[0])).T.reshape(shape), r)
    if part == "attn.kv_down":
        return _deinterleave(read(name, shape[::-1]).T, r)
    if part in ("attn.query", "attn.key", "attn.value"):
        return read(name, (int(np.prod(shape[1:])), shape[0])).T.reshape(shape)
    if part == "attn.out":
        return read(name, (shape[-1], int(np.prod(shape[:-1])))).T.reshape(shape)
    if slot.endswith("proj.kernel") and slot.startswith("depths."):
        w = read(name, shape[::-1]).T
        e = w.shape[1]
        return np.concatenate([w[e:], w[:e]])
    if slot == "head" or slot.endswith(".kernel") or part in ("attn.q_down", "mlp.router"):
        return read(name, shape[::-1]).T
    return read(name, shape)


# ------------------------------------------------------------------------------ export


@dataclasses.dataclass
class Exported:
    tensors: dict[str, np.ndarray]  # HF name -> array, in a stable order
    parameters: int  # tensors written from parameters (each parameter exactly once)
    copies: int  # engine copies (embed_tokens / shared_head.head per depth layer)
    left_out: int  # MTP tensors left out (--no-mtp)


def to_hf(
    cfg: ModelConfig, params: Any, *, include_mtp: bool = True, engine_copies: bool = False
) -> Exported:
    """The model's parameters -> HF-named tensors. Raises if two slots share a name."""
    check_exportable(cfg, include_mtp=include_mtp)
    flat = layout.flatten(cfg, params)
    tensors: dict[str, np.ndarray] = {}
    left_out = 0
    for slot, value in flat.items():
        converted = _to_hf(cfg, slot, value, flat)
        if layout.is_mtp(slot) and not include_mtp:
            left_out += len(converted)
            continue
        for name, tensor in converted.items():
            if name in tensors:
                raise InteropError(f"two parameters map to {name}")
            tensors[name] = tensor
    parameters = len(tensors)
    copies = 0
    if engine_copies and include_mtp and cfg.mtp_depth and cfg.mtp_layout == "sequential":
        head = flat["embed.embedding"] if cfg.tie_embeddings else flat["head"].T
        for k in range(1, _n_depth_layers(cfg) + 1):
            n = cfg.n_layers + k - 1
            tensors[f"model.layers.{n}.embed_tokens.weight"] = flat["embed.embedding"]
            tensors[f"model.layers.{n}.shared_head.head.weight"] = head
            copies += 2
    return Exported(tensors, parameters, copies, left_out)


def check_exportable(cfg: ModelConfig, include_mtp: bool = True) -> None:
    """Raises InteropError, naming the key, for models neither Llama's nor DeepSeek-V3's
    naming can hold: MoE with grouped-query attention, MoE without shared experts, and MoE
    depths with the dense MLP (`model.moe.dense_mtp`)."""
    m = cfg.moe
    if m.enabled and cfg.attention != "mla":
        raise InteropError(
            f"config key 'model.attention' has value {cfg.attention!r}: MoE models export in "
            "DeepSeek-V3 naming, whose attention is MLA ('mla'); Llama naming has no experts"
        )
    if m.enabled and not m.shared_experts:
        raise InteropError(
            "config key 'model.moe.shared_experts' has value 0: DeepSeek-V3 MoE layers have "
            "shared experts (n_shared_experts >= 1; vLLM and HF disagree on none)"
        )
    if m.enabled and m.dense_mtp and include_mtp and cfg.mtp_depth:
        raise InteropError(
            "config key 'model.moe.dense_mtp' has value True: DeepSeek-V3's MTP layers are full "
            "decoder layers, MoE like the trunk's (export with --no-mtp, or train with "
            "dense_mtp=False)"
        )


def _n_depth_layers(cfg: ModelConfig) -> int:
    return 1 if cfg.mtp_share_depths else cfg.mtp_depth


def hf_config(cfg: ModelConfig, *, include_mtp: bool = True, max_positions: int = 4096) -> dict:
    """config.json for `cfg`: the Llama (dense grouped-query) or DeepSeek-V3 (MLA / MoE)
    fields that define the trunk, DeepSeek-V3's `num_nextn_predict_layers` for sequential
    depths, and our own `mtp_jax` section (the MTP settings an import restores)."""
    check_exportable(cfg, include_mtp=include_mtp)
    depth = cfg.mtp_depth if include_mtp else 0
    n_depth = _n_depth_layers(cfg) if depth and cfg.mtp_layout == "sequential" else 0
    if is_deepseek(cfg):
        out = _deepseek_fields(cfg, n_depth, max_positions)
    else:
        out = {
            **ARCH,
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model,
            "intermediate_size": cfg.mlp_dim,
            "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_kv_heads,
            "head_dim": cfg.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta,
            "rope_scaling": _rope_scaling_json(cfg),
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": cfg.tie_embeddings,
            "max_position_embeddings": _max_positions(cfg, max_positions),
            "torch_dtype": cfg.param_dtype,
        }
    if n_depth:
        out["num_nextn_predict_layers"] = n_depth
    out["mtp_jax"] = {
        "mtp_depth": depth,
        "mtp_layout": cfg.mtp_layout,
        "mtp_share_depths": cfg.mtp_share_depths and bool(depth),
        "mtp_chain_input": cfg.mtp_chain_input,
    }
    return out


def _deepseek_fields(cfg: ModelConfig, n_depth: int, max_positions: int) -> dict:
    """The `DeepseekV3ForCausalLM` fields of an MLA (and MoE, or dense) model. A dense one has
    `n_routed_experts: null` and every layer, MTP layers included, below
    `first_k_dense_replace`."""
    m = cfg.moe
    return {
        **DEEPSEEK_ARCH,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.mlp_dim,
        "moe_intermediate_size": m.expert_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads,
        "n_routed_experts": m.num_experts if m.enabled else None,
        "n_shared_experts": m.shared_experts,
        "num_experts_per_tok": m.top_k,
        "routed_scaling_factor": m.routed_scaling,
        "first_k_dense_replace": m.first_dense_layers if m.enabled else cfg.n_layers + n_depth,
        "moe_layer_freq": 1,
        "n_group": m.n_group,
        "topk_group": m.topk_group,
        "norm_topk_prob": True,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "q_lora_rank": cfg.q_lora_rank or None,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": _rope_scaling_json(cfg),
        "rope_interleave": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": _max_positions(cfg, max_positions),
        "torch_dtype": cfg.param_dtype,
    }


_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
_YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow")
_YARN_OPTIONAL = ("mscale", "mscale_all_dim", "attention_factor")  # 0 = unset, left out


def _rope_scaling_json(cfg: ModelConfig) -> dict | None:
    """config.json's `rope_scaling` for model.rope_scaling (None for type 'none')."""
    r = cfg.rope_scaling
    if not r.enabled:
        return None
    keys = _LLAMA3_KEYS if r.type == "llama3" else _YARN_KEYS
    out = {"rope_type": r.type, **{k: getattr(r, k) for k in keys}}
    if r.type == "yarn":
        out |= {k: getattr(r, k) for k in _YARN_OPTIONAL if getattr(r, k)}
        if not r.truncate:
            out["truncate"] = False
    return out


def _max_positions(cfg: ModelConfig, max_positions: int) -> int:
    """max_position_embeddings: yarn's is original x factor (older transformers derive yarn's
    factor from it when `original_max_position_embeddings` is given); llama3's at least that."""
    r = cfg.rope_scaling
    extended = round(r.original_max_position_embeddings * r.factor)
    if r.type == "yarn":
        return extended
    return max(max_positions, extended) if r.type == "llama3" else max_positions


# ------------------------------------------------------------------------------ import

_MODEL_TYPES = ("llama", "qwen2", "mistral", "deepseek_v3")
# Fields that do not change the function the weights compute (metadata, generation, caching,
# DeepSeek's training and parallelism settings).
_INERT = {
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version",
    "bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings",
    "initializer_range", "use_cache", "_name_or_path", "pretraining_tp", "mtp_jax",
    "tokenizer_class", "output_attentions", "output_hidden_states", "return_dict",
    "is_encoder_decoder", "chunk_size_feed_forward", "max_window_layers", "layer_types",
    "auto_map", "aux_loss_alpha", "seq_aux", "ep_size",
}  # fmt: skip
_DEFINING = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
    "tie_word_embeddings", "num_nextn_predict_layers",
}  # fmt: skip
_DEEPSEEK_DEFINING = {
    "moe_intermediate_size", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
    "routed_scaling_factor", "first_k_dense_replace", "n_group", "topk_group", "q_lora_rank",
    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "qk_head_dim",
}  # fmt: skip
# transformers' DeepseekV3Config defaults: what a field left out of config.json means.
_DEEPSEEK_DEFAULTS = {
    "moe_intermediate_size": 2048, "n_shared_experts": 1, "n_routed_experts": 256,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8,
    "topk_group": 4, "num_experts_per_tok": 8, "first_k_dense_replace": 3,
    "norm_topk_prob": True, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "rope_interleave": True,
}  # fmt: skip
# What vLLM's DeepSeek loader requires for our semantics; transformers' DeepseekV3 always
# computes them (a config without these fields means them there).
_DEEPSEEK_FIXED = {
    "scoring_func": ("sigmoid", "our router scores experts by sigmoid (DeepSeek-V3)"),
    "topk_method": ("noaux_tc", "our router selects by score + e_score_correction_bias"),
    "norm_topk_prob": (True, "our gates are normalised over the selected experts"),
    "moe_layer_freq": (1, "every layer from first_k_dense_replace on is MoE here"),
    "rope_interleave": (
        True,
        "vLLM applies interleaved (GPT-J) RoPE to DeepSeek weights whatever this field says, "
        "so un-interleaved weights mean different models to HF and vLLM",
    ),
}


def _unsupported(field: str, value: Any, why: str) -> InteropError:
    return InteropError(f"config.json field {field!r} = {value!r} is not supported: {why}")


def check_hf_config(hf: dict) -> None:
    """Raises InteropError naming the first field whose value we cannot represent exactly
    (rope scaling other than llama3 / yarn, sliding windows, biases, other activations or
    routings) or do not know."""
    mt = hf.get("model_type", "llama")
    if mt not in _MODEL_TYPES:
        raise _unsupported(
            "model_type", mt, f"one of {_MODEL_TYPES} (RoPE GQA decoders, DeepSeek-V3 MLA/MoE)"
        )
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"):
        if field not in hf:
            raise InteropError(f"config.json lacks the field {field!r}")
    if "num_attention_heads" not in hf:
        raise InteropError("config.json lacks the field 'num_attention_heads'")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise _unsupported("hidden_act", act, "our MLP is SwiGLU (silu)")
    _rope_scaling_values(hf)
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field):
            raise _unsupported(field, hf[field], "our projections have no biases")
    if hf.get("use_sliding_window"):
        raise _unsupported("use_sliding_window", hf["use_sliding_window"], "full attention only")
    if mt != "qwen2" and hf.get("sliding_window") is not None:
        raise _unsupported("sliding_window", hf["sliding_window"], "full attention only")
    dropout = hf.get("attention_dropout", 0.0)
    if dropout:
        raise _unsupported("attention_dropout", dropout, "our attention has no dropout")
    if "quantization_config" in hf:
        raise _unsupported(
            "quantization_config",
            hf["quantization_config"],
            "quantized weights (e.g. DeepSeek's fp8 release): convert them to bf16 first",
        )
    handled = {"hidden_act", "rope_scaling", "rope_parameters", "attention_bias", "mlp_bias"}
    handled |= {"use_sliding_window", "sliding_window", "attention_dropout"}
    known = _INERT | _DEFINING | handled
    if mt == "deepseek_v3":
        _check_deepseek(hf)
        known |= _DEEPSEEK_DEFINING | set(_DEEPSEEK_FIXED)
    for field, value in hf.items():
        if field not in known:
            raise _unsupported(field, value, "mtp_jax does not know this field")


def _rope_scaling_values(hf: dict) -> dict[str, Any]:
    """model.rope_scaling values from config.json's `rope_scaling` (or transformers 5's
    `rope_parameters`, which also carries rope_theta): `rope_type` (or the older `type`)
    default / llama3 / yarn, with their fields as transformers reads them (yarn: beta_fast /
    beta_slow null or 0 = 32 / 1, mscale / mscale_all_dim / attention_factor null = unset,
    original_max_position_embeddings absent = max_position_embeddings). Another rope_type, or
    a field of none of these, is an InteropError naming it."""
    found: dict[str, dict[str, Any]] = {}
    for field in ("rope_scaling", "rope_parameters"):
        rs = hf.get(field)
        if rs is None:
            continue
        if not isinstance(rs, dict):
            raise _unsupported(field, rs, "a dict with rope_type 'default', 'llama3' or 'yarn'")
        kind = rs.get("rope_type", rs.get("type", "default"))
        entries = {k: v for k, v in rs.items() if k not in ("rope_type", "type", "rope_theta")}
        allowed = {
            "default": (),
            "llama3": _LLAMA3_KEYS,
            "yarn": _YARN_KEYS + _YARN_OPTIONAL + ("truncate",),
        }
        if kind not in allowed:
            raise _unsupported(
                field, rs, f"rope_type {kind!r}: only 'default', 'llama3' and 'yarn' are ours"
            )
        for name, value in entries.items():
            if name not in allowed[kind]:
                raise InteropError(
                    f"config.json field {field!r} has {name!r} = {value!r}, not supported with "
                    f"rope_type {kind!r} (accepted: {', '.join(allowed[kind]) or 'none'})"
                )
        if kind == "default":
            continue
        if kind == "llama3":
            missing = [k for k in _LLAMA3_KEYS if entries.get(k) is None]
        else:
            missing = [k for k in ("factor",) if entries.get(k) is None]
            if entries.get("original_max_position_embeddings") is None:
                if hf.get("max_position_embeddings") is None:
                    missing.append("original_max_position_embeddings")
                entries["original_max_position_embeddings"] = hf.get("max_position_embeddings")
        if missing:
            raise InteropError(f"config.json field {field!r} lacks {missing[0]!r} ({kind})")
        values: dict[str, Any] = {"type": kind}
        for name, value in entries.items():
            if name == "truncate":
                values[name] = bool(value)
            elif name == "original_max_position_embeddings":
                values[name] = value
            elif value is not None:
                values[name] = float(value)
        if kind == "yarn":
            values["beta_fast"] = values.get("beta_fast") or 32.0
            values["beta_slow"] = values.get("beta_slow") or 1.0
        found[field] = values
    if len(found) == 2 and found["rope_scaling"] != found["rope_parameters"]:
        raise _unsupported(
            "rope_parameters", hf["rope_parameters"], "it disagrees with rope_scaling"
        )
    values = next(iter(found.values()), {})
    if values:
        try:
            ModelConfig.validate({"rope_scaling": values})
        except ConfigError as e:
            raise InteropError(f"config.json field 'rope_scaling' is invalid: {e}") from e
    return values


def _check_deepseek(hf: dict) -> None:
    """The DeepSeek-V3 fields we hold only at one value, or that must agree with others."""
    c = _DEEPSEEK_DEFAULTS | hf
    for field, (want, why) in _DEEPSEEK_FIXED.items():
        if field in c and c[field] != want:
            raise _unsupported(field, c[field], f"only {want!r}: {why}")
    heads = hf["num_attention_heads"]
    if c.get("num_key_value_heads", heads) != heads:
        raise _unsupported(
            "num_key_value_heads", c["num_key_value_heads"], f"MLA: num_attention_heads={heads}"
        )
    if c["v_head_dim"] != c["qk_nope_head_dim"]:
        raise _unsupported(
            "v_head_dim",
            c["v_head_dim"],
            f"our MLA values are as wide as the keys' nope part (qk_nope_head_dim="
            f"{c['qk_nope_head_dim']})",
        )
    # transformers writes its derived attributes into config.json: they must agree.
    derived = {
        "head_dim": c["qk_rope_head_dim"],
        "qk_head_dim": c["qk_nope_head_dim"] + c["qk_rope_head_dim"],
    }
    for field, want in derived.items():
        if field in hf and hf[field] != want:
            raise _unsupported(field, hf[field], f"DeepSeek-V3 derives it as {want}")
    if c["n_routed_experts"] and c["first_k_dense_replace"] >= hf["num_hidden_layers"]:
        raise _unsupported(
            "first_k_dense_replace",
            c["first_k_dense_replace"],
            f"fewer than num_hidden_layers={hf['num_hidden_layers']} with routed experts (a "
            "dense model has n_routed_experts null)",
        )


def model_config_from_hf(hf: dict, base: ModelConfig | None = None) -> ModelConfig:
    """The ModelConfig that holds an HF checkpoint: the architecture from config.json; the MTP
    settings from its `mtp_jax` section (our exports), from `num_nextn_predict_layers`
    (DeepSeek-style depths: sequential, h^0 after the final norm as the engines feed it) or,
    when the source has no depths, from `base` (new depths, initialised as configured).
    Run settings (param_dtype, dtype, scan, remat, init_std) and the MoE training settings
    (bias_update_rate, balance_loss_weight, capacity_factor) are `base`'s: tensors are cast to
    `base.param_dtype`, whatever config.json's torch_dtype. An MLA source keeps `base`'s
    n_kv_heads (unused by MLA)."""
    check_hf_config(hf)
    base = base or ModelConfig()
    heads = hf["num_attention_heads"]
    theta = hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10_000.0))
    values = dataclasses.asdict(base) | {
        "vocab_size": hf["vocab_size"],
        "d_model": hf["hidden_size"],
        "n_layers": hf["num_hidden_layers"],
        "n_heads": heads,
        "n_kv_heads": hf.get("num_key_value_heads") or heads,
        "head_dim": hf.get("head_dim") or hf["hidden_size"] // heads,
        "mlp_dim": hf["intermediate_size"],
        "rope_theta": float(theta),
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "rope_scaling": dataclasses.asdict(RopeScalingConfig()) | _rope_scaling_values(hf),
    }
    if hf.get("model_type") == "deepseek_v3":
        values |= _deepseek_values(_DEEPSEEK_DEFAULTS | hf, base)
    if "mtp_jax" in hf:
        section = hf["mtp_jax"]
        if not isinstance(section, dict) or set(section) - set(MTP_KEYS):
            raise _unsupported("mtp_jax", section, f"a dict of {MTP_KEYS}")
        if section.get("mtp_depth"):
            values |= section
    elif hf.get("num_nextn_predict_layers"):
        values |= {
            "mtp_depth": hf["num_nextn_predict_layers"],
            "mtp_layout": "sequential",
            "mtp_share_depths": False,
            "mtp_chain_input": "normed",
        }
    try:
        ModelConfig.validate(values)
    except ConfigError as e:
        raise InteropError(f"config.json gives an invalid model: {e}") from e
    return ModelConfig.from_any(values)


def _deepseek_values(c: dict, base: ModelConfig) -> dict:
    """`model.*` values of a DeepSeek-V3 config.json `c` (HF defaults filled in)."""
    experts = c["n_routed_experts"] or 0
    moe = dataclasses.asdict(base.moe) | {"num_experts": experts, "dense_mtp": False}
    if experts:
        moe |= {
            "top_k": c["num_experts_per_tok"],
            "shared_experts": c["n_shared_experts"] or 0,
            "expert_dim": c["moe_intermediate_size"],
            "first_dense_layers": c["first_k_dense_replace"],
            "routed_scaling": float(c["routed_scaling_factor"]),
            "n_group": c["n_group"] or 1,
            "topk_group": c["topk_group"] or 1,
        }
    return {
        "attention": "mla",
        "n_kv_heads": base.n_kv_heads,
        "head_dim": c["qk_nope_head_dim"],
        "q_lora_rank": c["q_lora_rank"] or 0,
        "kv_lora_rank": c["kv_lora_rank"],
        "qk_rope_head_dim": c["qk_rope_head_dim"],
        "norm_eps": float(c["rms_norm_eps"]),
        "tie_embeddings": bool(c["tie_word_embeddings"]),
        "moe": moe,
    }


def source_has_mtp(hf: dict) -> bool:
    if "mtp_jax" in hf:
        return bool(hf["mtp_jax"].get("mtp_depth"))
    return bool(hf.get("num_nextn_predict_layers"))


def from_hf(cfg: ModelConfig, hf: dict, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF tensors -> {our slot: array} for `cfg` (from `model_config_from_hf`). Includes the
    MTP slots only when the source has depths. Strict: a tensor no slot reads (a bias, an
    unknown layer) or a slot with no tensor is an InteropError naming it; engine copies must
    equal the shared embedding / head."""
    with_mtp = source_has_mtp(hf)
    used: set[str] = set()

    def read(slot: str) -> Callable[[str, tuple[int, ...]], np.ndarray]:
        def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
            if name not in tensors:
                raise InteropError(f"the checkpoint lacks tensor {name} (for our {slot})")
            x = np.asarray(tensors[name])
            if x.shape != tuple(shape):
                raise InteropError(
                    f"tensor {name} has shape {x.shape}; config.json implies {tuple(shape)} "
                    f"(for our {slot})"
                )
            used.add(name)
            return x

        return get

    out = {}
    for s in layout.slots(cfg):
        if layout.is_mtp(s.name) and not with_mtp:
            continue
        out[s.name] = _from_hf(cfg, s.name, s.shape, read(s.name))
    left = {name: x for name, x in tensors.items() if name not in used}
    for name in sorted(left):
        m = re.fullmatch(r"model\.layers\.(\d+)\.(embed_tokens|shared_head\.head)\.weight", name)
        if m and with_mtp and int(m.group(1)) >= cfg.n_layers:
            embed = out["embed.embedding"]
            ref = embed if m.group(2) == "embed_tokens" or cfg.tie_embeddings else out["head"].T
            if not np.array_equal(np.asarray(left[name]).astype(ref.dtype), ref):
                raise InteropError(f"{name} differs from the shared weights it should copy")
            del left[name]
        elif name.endswith(".bias") and not np.any(np.asarray(left[name])):
            del left[name]  # an all-zero bias (e.g. Qwen2 q/k/v) computes nothing
    if left:
        raise InteropError(
            f"{len(left)} tensors have no place in our model, e.g. {sorted(left)[0]}"
            + (" (a bias: our projections have none)" if sorted(left)[0].endswith(".bias") else "")
        )
    return out


def merge(
    target: dict[str, np.ndarray], source: dict[str, np.ndarray], what: str
) -> tuple[dict[str, np.ndarray], int]:
    """Slots of `source` replace those of `target` (a fresh init, flat). Target slots the
    source lacks are kept only for MTP depths of a source with none; a source slot the target
    lacks, or a different shape, is an InteropError naming it. Returns (merged, kept fresh)."""
    extra = sorted(set(source) - set(target))
    if extra:
        raise InteropError(f"{what} has parameter {extra[0]} that the configured model lacks")
    src_mtp = any(layout.is_mtp(n) for n in source)
    out, fresh = {}, 0
    for name, value in target.items():
        if name in source:
            if source[name].shape != value.shape:
                raise InteropError(
                    f"{what}: parameter {name} has shape {source[name].shape}, the configured "
                    f"model {value.shape}"
                )
            out[name] = source[name].astype(value.dtype)
        elif layout.is_mtp(name) and not src_mtp:
            out[name], fresh = value, fresh + 1
        else:
            raise InteropError(f"{what} lacks parameter {name}")
    return out, fresh


def check_matches(cfg: ModelConfig, src: ModelConfig, what: str, with_mtp: bool) -> None:
    """ConfigError-style InteropError naming the first `model.*` key where the configured
    model differs from the source's (architecture; MTP keys too when the source has depths)."""
    keys = [
        "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "mlp_dim",
        "rope_theta", "norm_eps", "tie_embeddings", "attention",
    ]  # fmt: skip
    if src.attention == "mla":  # no K/V heads; the latent and rope widths instead
        keys = [k for k in keys if k != "n_kv_heads"]
        keys += ["q_lora_rank", "kv_lora_rank", "qk_rope_head_dim"]
    keys += list(MTP_KEYS) if with_mtp else []
    moe_keys = ["num_experts"]
    if src.moe.enabled:
        moe_keys += [
            "top_k", "shared_experts", "expert_dim", "first_dense_layers", "routed_scaling",
            "n_group", "topk_group",
        ]  # fmt: skip
        moe_keys += ["dense_mtp"] if with_mtp else []
    pairs = [(f"model.{k}", getattr(cfg, k), getattr(src, k)) for k in keys]
    if cfg.rope_scaling.enabled or src.rope_scaling.enabled:
        pairs += [
            (f"model.rope_scaling.{k}", getattr(cfg.rope_scaling, k), getattr(src.rope_scaling, k))
            for k in RopeScalingConfig.declared()
        ]
    pairs += [(f"model.moe.{k}", getattr(cfg.moe, k), getattr(src.moe, k)) for k in moe_keys]
    for key, ours, theirs in pairs:
        if ours != theirs:
            raise InteropError(f"config key {key!r} is {ours!r} but {what} has {theirs!r}")


__all__ = [
    "Exported",
    "InteropError",
    "check_hf_config",
    "check_matches",
    "from_hf",
    "hf_config",
    "hf_name",
    "hf_names",
    "is_deepseek",
    "merge",
    "model_config_from_hf",
    "to_hf",
]
