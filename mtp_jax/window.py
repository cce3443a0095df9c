"""The one statement of what a training example is: a window of S + D + 1 tokens.

The trunk reads w[0:S]; depth k (0 = next-token head) reads up to w[S + k - 1] and is scored
against w[k+1 : S+k+1]; the model's input is w[0 : S+D] and the targets end at w[S+D]. Data
cuts windows of `length`, init and compile build `model_input` / `abstract_batch` examples,
the loss splits a window into per-depth targets (`mtp_jax.loss.mtp_targets`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

BATCH_KEYS = ("tokens", "segment_ids")


@dataclasses.dataclass(frozen=True)
class WindowSpec:
    """S (`data.seq_len`), D (`model.mtp_depth`) and the global batch B (`data.batch_size`)."""

    seq_len: int
    mtp_depth: int
    batch_size: int = 1

    @classmethod
    def from_config(cls, config: Any) -> WindowSpec:
        return cls(config.data.seq_len, config.model.mtp_depth, config.data.batch_size)

    @classmethod
    def of_window(cls, length: int, mtp_depth: int) -> WindowSpec:
        """The spec whose windows hold `length` tokens: S = length - D - 1 (ValueError if < 1)."""
        seq = length - mtp_depth - 1
        if seq < 1:
            raise ValueError(f"windows of length {length} are too short for D={mtp_depth}")
        return cls(seq, mtp_depth)

    @property
    def length(self) -> int:
        """Tokens per window: S + D + 1."""
        return self.seq_len + self.mtp_depth + 1

    @property
    def model_input(self) -> int:
        """Tokens the model reads per example: S + D (the window without its last token)."""
        return self.seq_len + self.mtp_depth

    def num_windows(self, num_tokens: int) -> int:
        """Windows of a stream of `num_tokens` tokens, consecutive windows S apart."""
        return 0 if num_tokens < self.length else (num_tokens - self.length) // self.seq_len + 1

    def abstract_batch(self, sharding: Any = None) -> dict[str, Any]:
        """{'tokens', 'segment_ids'}: int32 [B, S+D+1] `jax.ShapeDtypeStruct`s."""
        import jax
        import jax.numpy as jnp

        shape = (self.batch_size, self.length)
        return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding) for k in BATCH_KEYS}

    def example_input(self) -> Any:
        """A zero int32 [1, S+D] model input (for init and shape evaluation)."""
        import jax.numpy as jnp

        return jnp.zeros((1, self.model_input), jnp.int32)
