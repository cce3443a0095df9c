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


def setting(default: Any, doc: str, check: Check) -> Any:
    """A declared setting: its default, what it means, and its check."""
    return dataclasses.field(default=default, metadata={"doc": doc, "check": check})


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
        "attention kernel: auto (splash on TPUs, cuDNN on GPUs when possible) | xla | cudnn | "
        "splash (Pallas TPU kernel; sequence a multiple of 128)",
        choice(ATTENTION_IMPLS),
    )

    @classmethod
    def from_any(cls, config: Any) -> ModelConfig:
        """Accepts a ModelConfig, a `config.model` ConfigDict or a plain dict."""
        if isinstance(config, cls):
            return config
        values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    @classmethod
    def declared(cls) -> dict[str, dataclasses.Field]:
        """name -> field (default, metadata 'doc' and 'check') of every setting."""
        return {f.name: f for f in dataclasses.fields(cls)}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {name: f.default for name, f in cls.declared().items()}

    @classmethod
    def validate(cls, values: dict[str, Any], prefix: str = "model.") -> None:
        """Checks every value and the relations between them; raises ConfigError naming the key."""
        for name, f in cls.declared().items():
            ok, accepted = f.metadata["check"]
            if name in values and not ok(values[name]):
                fail(prefix + name, values[name], accepted)
        v = {**cls.defaults(), **values}
        if v["n_heads"] % v["n_kv_heads"]:
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
        if v["head_dim"] % 2:
            fail(prefix + "head_dim", v["head_dim"], "an even number (rotary embedding pairs)")

    @property
    def compute_dtype(self) -> Any:
        import jax.numpy as jnp

        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> Any:
        import jax.numpy as jnp

        return jnp.dtype(self.param_dtype)
