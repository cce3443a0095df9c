"""`ModelConfig`: the one declaration of the model's settings.

Each field carries its default, a one-line meaning and its check. The `model` section of the
config files (`mtp_jax.config.base_config`), the validation of `model.*` keys and the frozen,
hashable object the modules read all come from this class.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mtp_jax.checks import Check, boolean, choice, fail, integer, number

DTYPES = ("float32", "bfloat16", "float16")  # names of jax.numpy dtypes (no jax import here)
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
MTP_LAYOUTS = ("sequential", "parallel")
MTP_CHAIN_INPUTS = ("trunk", "normed")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")
ATTENTIONS = ("mha", "mla")
ROPE_TYPES = ("none", "llama3", "yarn")


def setting(default: Any, doc: str, check: Check) -> Any:
    """A declared setting: its default, what it means, and its check."""
    return dataclasses.field(default=default, metadata={"doc": doc, "check": check})


class _Section:
    """A nested config section (`model.<name>.*`): its declared keys, built from a dict or a
    ConfigDict (unknown keys ignored: an older checkpoint's config still loads)."""

    @classmethod
    def declared(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls)}

    @classmethod
    def from_any(cls, value: Any) -> Any:
        if isinstance(value, cls):
            return value
        values = value.to_dict() if hasattr(value, "to_dict") else dict(value)
        return cls(**{k: v for k, v in values.items() if k in cls.declared()})


@dataclasses.dataclass(frozen=True)
class MoEConfig(_Section):
    """DeepSeekMoE feed-forward settings (the `model.moe.*` keys); num_experts=0 = dense MLP."""

    num_experts: int = setting(
        0, "E, routed experts per MoE layer; 0 = dense MLP blocks", integer(0)
    )
    top_k: int = setting(2, "routed experts each token goes to (<= num_experts)", integer(1))
    shared_experts: int = setting(
        1, "always-on shared experts, each of width expert_dim (0 = none)", integer(0)
    )
    expert_dim: int = setting(
        64, "hidden width of each (routed and shared) SwiGLU expert", integer(1)
    )
    first_dense_layers: int = setting(
        0, "leading trunk layers that keep the dense MLP (DeepSeek-V3: 3)", integer(0)
    )
    n_group: int = setting(
        1,
        "group-limited routing (DeepSeek-V3: 8): experts split into n_group equal groups, each "
        "token routes inside its topk_group best groups (group score: sum of its top-2 "
        "affinity + bias); 1 = plain top-k",
        integer(1),
    )
    topk_group: int = setting(
        1, "groups each token may route to (<= n_group; DeepSeek-V3: 4)", integer(1)
    )
    routed_scaling: float = setting(
        1.0,
        "factor on the routed experts' output (gates sum to it; DeepSeek-V3: 2.5)",
        number(0, open_lo=True),
    )
    bias_update_rate: float = setting(
        1e-3,
        "gamma of auxiliary-loss-free balancing: bias += gamma * sign(mean load - load) after "
        "each step; 0 = off",
        number(0),
    )
    balance_loss_weight: float = setting(
        0.0, "alpha of the sequence-wise balance loss (DeepSeek-V3: 1e-4); 0 = off", number(0)
    )
    capacity_factor: float = setting(
        0.0,
        "0 = dropless (sorted tokens, grouped matmuls); > 0 = each expert takes at most "
        "ceil(capacity_factor * tokens * top_k / num_experts) tokens per device, the rest dropped",
        number(0),
    )
    dense_mtp: bool = setting(
        False, "MTP depths use the dense MLP (default: the trunk's block type)", boolean()
    )

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0


@dataclasses.dataclass(frozen=True)
class RopeScalingConfig(_Section):
    """RoPE frequency scaling (the `model.rope_scaling.*` keys, config.json's `rope_scaling`);
    type 'none' = plain RoPE. Formulas: `mtp_jax.model.layers.rope_inv_freq`."""

    type: str = setting(
        "none",
        "'none' (plain theta^(-2j/d)), 'llama3' (Llama 3.1 wavelength bands) or 'yarn' (YaRN "
        "ramp, cos/sin times the attention factor; with attention='mla' also DeepSeek's "
        "softmax scale x mscale(factor, mscale_all_dim)^2)",
        choice(ROPE_TYPES),
    )
    factor: float = setting(
        1.0, "context extension factor s (Llama 3.1: 8, DeepSeek-V3: 40)", number(1)
    )
    original_max_position_embeddings: int = setting(
        4096, "pre-extension context length (Llama 3.1: 8192, DeepSeek-V3: 4096)", integer(1)
    )
    low_freq_factor: float = setting(
        1.0,
        "llama3: wavelengths > original/low_freq_factor are divided by factor",
        number(0, open_lo=True),
    )
    high_freq_factor: float = setting(
        4.0,
        "llama3: wavelengths < original/high_freq_factor are kept (> low_freq_factor); between "
        "the two, a smooth blend",
        number(0, open_lo=True),
    )
    beta_fast: float = setting(
        32.0,
        "yarn: rotations at which the ramp starts (pure extrapolation above)",
        number(0, open_lo=True),
    )
    beta_slow: float = setting(
        1.0,
        "yarn: rotations at which the ramp ends (pure interpolation below)",
        number(0, open_lo=True),
    )
    mscale: float = setting(
        0.0,
        "yarn: with mscale_all_dim (both > 0) the attention factor is "
        "mscale(s, mscale) / mscale(s, mscale_all_dim); 0 = unset (factor 0.1 ln s + 1)",
        number(0),
    )
    mscale_all_dim: float = setting(
        0.0, "yarn: see mscale; with attention='mla' also scales the softmax; 0 = unset", number(0)
    )
    attention_factor: float = setting(
        0.0, "yarn: explicit cos/sin factor, overriding the mscale rule; 0 = derived", number(0)
    )
    truncate: bool = setting(
        True, "yarn: floor/ceil the correction range bounds (HF's default)", boolean()
    )

    @property
    def enabled(self) -> bool:
        return self.type != "none"


def _is_section(v: Any) -> bool:
    return isinstance(v, _Section | dict) or hasattr(v, "to_dict")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The model's hyperparameters (the `model.*` config keys), frozen and hashable."""

    vocab_size: int = setting(
        259, "rows of the embedding; >= the tokenizer's vocab (padding allowed)", integer(2)
    )
    d_model: int = setting(128, "E, the residual width", integer(1))
    n_layers: int = setting(2, "trunk transformer blocks (scanned)", integer(1))
    n_heads: int = setting(4, "query heads N", integer(1))
    n_kv_heads: int = setting(2, "key/value heads K (GQA); must divide n_heads", integer(1))
    head_dim: int = setting(32, "H, width of each head (even: rotary pairs)", integer(2))
    mlp_dim: int = setting(384, "F, hidden width of the SwiGLU MLP", integer(1))
    mtp_depth: int = setting(
        2, "D, MTP depths beyond the next-token head (0 = plain next-token model)", integer(0, 16)
    )
    mtp_layout: str = setting(
        "sequential",
        "'sequential' (DeepSeek-V3 chain) or 'parallel' (Meta heads)",
        choice(MTP_LAYOUTS),
    )
    mtp_share_depths: bool = setting(
        False,
        "sequential: one depth module (block, norms, projection) applied at every depth "
        "(parameters independent of D); False = D stacked depths",
        boolean(),
    )
    mtp_hidden_mixing: float = setting(
        0.0,
        "sequential, training only: probability that depth k >= 2 reads, per token, an earlier "
        "state h^0..h^{k-2} (uniform) instead of h^{k-1}; 0 = off (Megatron-LM #6566)",
        number(0, 1),
    )
    mtp_chain_input: str = setting(
        "trunk",
        "h^0 the MTP depths read: 'trunk' (residual stream before the final norm) or "
        "'normed' (after it, as vLLM/SGLang feed DeepSeek-V3 MTP layers)",
        choice(MTP_CHAIN_INPUTS),
    )
    dtype: str = setting("float32", "compute dtype of activations and matmuls", choice(DTYPES))
    param_dtype: str = setting("float32", "storage dtype of parameters", choice(DTYPES))
    rope_theta: float = setting(10_000.0, "RoPE base frequency", number(0, open_lo=True))
    norm_eps: float = setting(1e-6, "RMSNorm epsilon", number(0, open_lo=True))
    tie_embeddings: bool = setting(
        True, "output head = embedding transposed (else a separate matrix)", boolean()
    )
    remat_policy: str = setting(
        "none",
        "activation checkpointing per block: none | full | dots | dots_no_batch",
        choice(REMAT_POLICIES),
    )
    scan_layers: bool = setting(
        True, "stack trunk blocks with nn.scan (fast compiles); False = unrolled", boolean()
    )
    scan_unroll: int = setting(
        0, "layers (and MTP depths) per scan loop trip; 0 = auto: all on CPU, else 1", integer(0)
    )
    init_std: float = setting(
        0.02, "stddev of the normal initialiser of weight matrices", number(0, open_lo=True)
    )
    attention_impl: str = setting(
        "auto",
        "attention kernel: auto (splash on TPUs but for MLA, cuDNN on GPUs when possible) | xla "
        "| cudnn | splash (Pallas TPU kernel, MLA too; sequence a multiple of 128)",
        choice(ATTENTION_IMPLS),
    )

    attention: str = setting(
        "mha",
        "'mha' (grouped-query attention) or 'mla' (DeepSeek multi-head latent attention: "
        "n_heads heads of head_dim + qk_rope_head_dim, values of head_dim; n_kv_heads unused)",
        choice(ATTENTIONS),
    )
    q_lora_rank: int = setting(
        0, "mla: rank of the low-rank query projection; 0 = full-rank queries", integer(0)
    )
    kv_lora_rank: int = setting(
        64, "mla: width of the compressed KV latent (what the decode cache holds)", integer(1)
    )
    qk_rope_head_dim: int = setting(
        16, "mla: width of the decoupled RoPE part of queries and the shared RoPE key", integer(2)
    )
    rope_scaling: RopeScalingConfig = setting(
        RopeScalingConfig(),
        "RoPE frequency scaling: the model.rope_scaling.* keys",
        (_is_section, "model.rope_scaling.*"),
    )
    moe: MoEConfig = setting(
        MoEConfig(), "DeepSeekMoE feed-forward: the model.moe.* keys", (_is_section, "model.moe.*")
    )

    @classmethod
    def from_any(cls, config: Any) -> ModelConfig:
        """Accepts a ModelConfig, a `config.model` ConfigDict or a plain dict."""
        if isinstance(config, cls):
            return config
        values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in values.items() if k in names}
        if "moe" in values:
            values["moe"] = MoEConfig.from_any(values["moe"])
        if "rope_scaling" in values:
            values["rope_scaling"] = RopeScalingConfig.from_any(values["rope_scaling"])
        return cls(**values)

    @classmethod
    def declared(cls) -> dict[str, dataclasses.Field]:
        """name -> field (default, metadata 'doc' and 'check') of every setting."""
        return {f.name: f for f in dataclasses.fields(cls)}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """name -> default; `moe` and `rope_scaling` as dicts (the nested `model.moe.*` and
        `model.rope_scaling.*` keys)."""
        out = {name: f.default for name, f in cls.declared().items()}
        out["moe"] = dataclasses.asdict(out["moe"])
        out["rope_scaling"] = dataclasses.asdict(out["rope_scaling"])
        return out

    @classmethod
    def validate(cls, values: dict[str, Any], prefix: str = "model.") -> None:
        """Checks every value and the relations between them; raises ConfigError naming the key."""
        for name, f in cls.declared().items():
            ok, accepted = f.metadata["check"]
            if name in values and not ok(values[name]):
                fail(prefix + name, values[name], accepted)
        moe_values = _section_values(values.get("moe"), MoEConfig, prefix + "moe.")
        rope = _section_values(
            values.get("rope_scaling"), RopeScalingConfig, prefix + "rope_scaling."
        )
        _validate_rope_scaling({**cls.defaults()["rope_scaling"], **rope}, prefix)
        v = {**cls.defaults(), **values}
        moe = {**cls.defaults()["moe"], **moe_values}
        if moe["num_experts"] and moe["top_k"] > moe["num_experts"]:
            fail(
                prefix + "moe.top_k",
                moe["top_k"],
                f"at most {prefix}moe.num_experts={moe['num_experts']}",
            )
        if moe["num_experts"]:
            _validate_groups(moe, prefix)
        if moe["num_experts"] and moe["first_dense_layers"] >= v["n_layers"]:
            fail(
                prefix + "moe.first_dense_layers",
                moe["first_dense_layers"],
                f"fewer than {prefix}n_layers={v['n_layers']} (else no layer is MoE: set "
                f"{prefix}moe.num_experts=0)",
            )
        if v["attention"] == "mla" and v["qk_rope_head_dim"] % 2:
            fail(
                prefix + "qk_rope_head_dim",
                v["qk_rope_head_dim"],
                "an even number (rotary embedding pairs)",
            )
        if v["attention"] != "mla" and v["n_heads"] % v["n_kv_heads"]:  # MLA has no K/V heads
            fail(
                prefix + "n_kv_heads",
                v["n_kv_heads"],
                f"a divisor of {prefix}n_heads={v['n_heads']} (grouped-query attention)",
            )
        if v["mtp_share_depths"] and v["mtp_layout"] != "sequential":
            fail(
                prefix + "mtp_share_depths",
                v["mtp_share_depths"],
                f"False with {prefix}mtp_layout={v['mtp_layout']!r}: parallel heads all read "
                "h^0, so one shared head would predict the same token at every depth",
            )
        if v["mtp_hidden_mixing"] and v["mtp_layout"] != "sequential":
            fail(
                prefix + "mtp_hidden_mixing",
                v["mtp_hidden_mixing"],
                f"0 with {prefix}mtp_layout={v['mtp_layout']!r}: parallel heads all read h^0, "
                "there are no earlier depth states to mix",
            )
        if v["mtp_hidden_mixing"] and v["mtp_depth"] < 2:
            fail(
                prefix + "mtp_depth",
                v["mtp_depth"],
                f">= 2 with {prefix}mtp_hidden_mixing={v['mtp_hidden_mixing']} (depth k >= 2 "
                "mixes in earlier states), or set the mixing to 0",
            )
        if v["attention"] != "mla" and v["head_dim"] % 2:  # MLA rotates qk_rope_head_dim only
            fail(prefix + "head_dim", v["head_dim"], "an even number (rotary embedding pairs)")

    @property
    def compute_dtype(self) -> Any:
        import jax.numpy as jnp

        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> Any:
        import jax.numpy as jnp

        return jnp.dtype(self.param_dtype)


def _section_values(section: Any, cls: type, prefix: str) -> dict[str, Any]:
    """A nested section (dataclass, ConfigDict or dict) as a dict, each value checked."""
    section = section or {}
    if dataclasses.is_dataclass(section):
        section = dataclasses.asdict(section)
    section = section.to_dict() if hasattr(section, "to_dict") else dict(section)
    for name, f in cls.declared().items():
        ok, accepted = f.metadata["check"]
        if name in section and not ok(section[name]):
            fail(prefix + name, section[name], accepted)
    return section


def _validate_rope_scaling(r: dict[str, Any], prefix: str) -> None:
    """Relations inside model.rope_scaling: llama3's band needs high > low freq factor, yarn's
    ramp beta_fast >= beta_slow (Kimi-K2 ships 1 and 1)."""
    key = prefix + "rope_scaling."
    if r["type"] == "llama3" and r["high_freq_factor"] <= r["low_freq_factor"]:
        fail(
            key + "high_freq_factor",
            r["high_freq_factor"],
            f"more than {key}low_freq_factor={r['low_freq_factor']} (llama3's smooth band)",
        )
    if r["type"] == "yarn" and r["beta_fast"] < r["beta_slow"]:
        fail(key + "beta_fast", r["beta_fast"], f"at least {key}beta_slow={r['beta_slow']}")


def _validate_groups(moe: dict[str, Any], prefix: str) -> None:
    """Group-limited routing: n_group divides num_experts into groups of >= 2 (a group's score
    is the sum of its top two), topk_group <= n_group, and the kept groups hold >= top_k."""
    e, g, tg = moe["num_experts"], moe["n_group"], moe["topk_group"]
    if e % g or (g > 1 and e // g < 2):
        fail(
            prefix + "moe.n_group",
            g,
            f"a divisor of {prefix}moe.num_experts={e} leaving groups of at least 2 experts "
            "(a group's score is the sum of its two best), or 1",
        )
    if tg > g:
        fail(prefix + "moe.topk_group", tg, f"at most {prefix}moe.n_group={g}")
    if moe["top_k"] > tg * (e // g):
        fail(
            prefix + "moe.top_k",
            moe["top_k"],
            f"at most {prefix}moe.topk_group x experts per group = {tg * (e // g)} (the "
            f"experts of the kept groups)",
        )
