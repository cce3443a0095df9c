"""Our parameters and ModelConfig <-> Hugging Face tensors and config.json.

Naming (torch `Linear.weight` is [out, in]; every name is written by exactly one parameter):

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
same frequencies `theta^(-2j/H)`, so q/k rows need no permutation.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

from mtp_jax.checks import ConfigError
from mtp_jax.model import layout
from mtp_jax.model.config import ModelConfig

ARCH = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
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
}
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


# ------------------------------------------------------------------------------ names


def hf_name(cfg: ModelConfig, slot: str) -> str:
    """Our slot name -> its Hugging Face tensor name (see the module docstring)."""
    if slot in _TOP:
        return _TOP[slot]
    kind, k, rest = slot.split(".", 2)
    if kind == "layers":
        return f"model.layers.{k}.{_BLOCK[rest]}"
    sub = _BLOCK[rest[len("block.") :]] if rest.startswith("block.") else None
    if kind == "depths":
        return f"model.layers.{cfg.n_layers + int(k) - 1}.{sub or _DEPTH[rest]}"
    return f"model.mtp_heads.{int(k) - 1}.{sub or _HEAD[rest]}"


def _to_hf(slot: str, x: np.ndarray) -> np.ndarray:
    """Our value of `slot` -> the HF tensor ([out, in] matrices; eh_proj embedding-first)."""
    if slot.endswith(("attn.query", "attn.key", "attn.value")):
        return x.reshape(x.shape[0], -1).T  # [E, N, H] -> [N*H, E]
    if slot.endswith("attn.out"):
        return x.reshape(-1, x.shape[-1]).T  # [N, H, E] -> [E, N*H]
    if slot.endswith("proj.kernel") and slot.startswith("depths."):
        e = x.shape[1]
        return np.concatenate([x[e:], x[:e]]).T  # rows [hidden; emb] -> columns [emb, hidden]
    if slot == "head" or slot.endswith(".kernel"):
        return x.T
    return x


def _from_hf(slot: str, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of `_to_hf`, to our `shape` (a tensor of the wrong size is returned as it is,
    for the caller to report)."""
    if x.ndim != 2:
        return x
    if slot.endswith(("attn.query", "attn.key", "attn.value", "attn.out")):
        return x.T.reshape(shape) if x.size == int(np.prod(shape)) else x
    if slot.endswith("proj.kernel") and slot.startswith("depths."):
        w = x.T
        e = w.shape[1]
        return np.concatenate([w[e:], w[:e]]) if w.shape[0] == 2 * e else w
    if slot == "head" or slot.endswith(".kernel"):
        return x.T
    return x


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
    check_exportable(cfg)
    flat = layout.flatten(cfg, params)
    tensors: dict[str, np.ndarray] = {}
    left_out = 0
    for slot, value in flat.items():
        if layout.is_mtp(slot) and not include_mtp:
            left_out += 1
            continue
        name = hf_name(cfg, slot)
        if name in tensors:
            raise InteropError(f"two parameters map to {name}")
        tensors[name] = _to_hf(slot, value)
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


def check_exportable(cfg: ModelConfig) -> None:
    """Raises InteropError for models the Llama naming cannot hold: MoE and MLA trunks (their
    DeepSeek-V3 naming is not written yet), naming the key."""
    if cfg.moe.enabled:
        raise InteropError(
            f"config key 'model.moe.num_experts' has value {cfg.moe.num_experts}: HF export "
            "covers dense trunks only (no DeepSeek-V3 MoE naming yet)"
        )
    if cfg.attention != "mha":
        raise InteropError(
            f"config key 'model.attention' has value {cfg.attention!r}: HF export covers "
            "grouped-query attention only (no DeepSeek MLA naming yet)"
        )


def _n_depth_layers(cfg: ModelConfig) -> int:
    return 1 if cfg.mtp_share_depths else cfg.mtp_depth


def hf_config(cfg: ModelConfig, *, include_mtp: bool = True, max_positions: int = 4096) -> dict:
    """config.json for `cfg`: the Llama fields that define the trunk, DeepSeek-V3's
    `num_nextn_predict_layers` for sequential depths, and our own `mtp_jax` section (the MTP
    settings an import restores)."""
    check_exportable(cfg)
    depth = cfg.mtp_depth if include_mtp else 0
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
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": max_positions,
        "torch_dtype": cfg.param_dtype,
    }
    if depth and cfg.mtp_layout == "sequential":
        out["num_nextn_predict_layers"] = _n_depth_layers(cfg)
    out["mtp_jax"] = {
        "mtp_depth": depth,
        "mtp_layout": cfg.mtp_layout,
        "mtp_share_depths": cfg.mtp_share_depths and bool(depth),
        "mtp_chain_input": cfg.mtp_chain_input,
    }
    return out


# ------------------------------------------------------------------------------ import

_MODEL_TYPES = ("llama", "qwen2", "mistral")
# Fields that do not change the function the weights compute (metadata, generation, caching).
_INERT = {
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version",
    "bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings",
    "initializer_range", "use_cache", "_name_or_path", "pretraining_tp", "mtp_jax",
    "tokenizer_class", "output_attentions", "output_hidden_states", "return_dict",
    "is_encoder_decoder", "chunk_size_feed_forward", "max_window_layers", "layer_types",
}  # fmt: skip
_DEFINING = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
    "tie_word_embeddings", "num_nextn_predict_layers",
}  # fmt: skip


def _unsupported(field: str, value: Any, why: str) -> InteropError:
    return InteropError(f"config.json field {field!r} = {value!r} is not supported: {why}")


def check_hf_config(hf: dict) -> None:
    """Raises InteropError naming the first field whose value we cannot represent exactly
    (rope scaling, sliding windows, biases, other activations) or do not know."""
    mt = hf.get("model_type", "llama")
    if mt not in _MODEL_TYPES:
        raise _unsupported("model_type", mt, f"one of {_MODEL_TYPES} (dense RoPE GQA decoders)")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"):
        if field not in hf:
            raise InteropError(f"config.json lacks the field {field!r}")
    if "num_attention_heads" not in hf:
        raise InteropError("config.json lacks the field 'num_attention_heads'")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise _unsupported("hidden_act", act, "our MLP is SwiGLU (silu)")
    for field in ("rope_scaling", "rope_parameters"):
        rs = hf.get(field)
        if rs is not None:
            kind = rs.get("rope_type", rs.get("type", "default")) if isinstance(rs, dict) else rs
            extra = set(rs) - {"rope_type", "type", "rope_theta"} if isinstance(rs, dict) else {}
            if kind != "default" or extra:
                raise _unsupported(field, rs, "only plain RoPE (rope_type 'default')")
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
    handled = {"hidden_act", "rope_scaling", "rope_parameters", "attention_bias", "mlp_bias"}
    handled |= {"use_sliding_window", "sliding_window", "attention_dropout"}
    for field, value in hf.items():
        if field not in _INERT | _DEFINING | handled:
            raise _unsupported(field, value, "mtp_jax does not know this field")


def model_config_from_hf(hf: dict, base: ModelConfig | None = None) -> ModelConfig:
    """The ModelConfig that holds an HF checkpoint: the architecture from config.json; the MTP
    settings from its `mtp_jax` section (our exports), from `num_nextn_predict_layers`
    (DeepSeek-style depths: sequential, h^0 after the final norm as the engines feed it) or,
    when the source has no depths, from `base` (new depths, initialised as configured).
    Run settings (param_dtype, dtype, scan, remat, init_std) are `base`'s: tensors are cast to
    `base.param_dtype`, whatever config.json's torch_dtype."""
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
    }
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
    left = dict(tensors)
    out = {}
    for s in layout.slots(cfg):
        if layout.is_mtp(s.name) and not with_mtp:
            continue
        name = hf_name(cfg, s.name)
        if name not in left:
            raise InteropError(f"the checkpoint lacks tensor {name} (for our {s.name})")
        value = _from_hf(s.name, np.asarray(left.pop(name)), s.shape)
        if value.shape != s.shape:
            raise InteropError(
                f"tensor {name} gives {s.name} the shape {value.shape}; config.json implies "
                f"{s.shape}"
            )
        out[s.name] = value
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
        "rope_theta", "norm_eps", "tie_embeddings",
    ]  # fmt: skip
    keys += list(MTP_KEYS) if with_mtp else []
    for key in keys:
        if getattr(cfg, key) != getattr(src, key):
            raise InteropError(
                f"config key 'model.{key}' is {getattr(cfg, key)!r} but {what} has "
                f"{getattr(src, key)!r}"
            )


__all__ = [
    "Exported",
    "InteropError",
    "check_hf_config",
    "check_matches",
    "from_hf",
    "hf_config",
    "hf_name",
    "merge",
    "model_config_from_hf",
    "to_hf",
]
