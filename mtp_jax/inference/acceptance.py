"""Greedy self-speculative decoding simulated from one teacher-forced forward pass.

Under greedy decoding a verify step at draft origin i accepts depth k's draft while depths
1..k all equal the trunk's argmax at i + k, given the true tokens up to i + k: exactly what a
teacher-forced forward over the decoded text computes (the speculative decoder recomputes
every depth slot it drafts from out of verified inputs; see `speculative`'s docstring). So on
text that is the trunk's own greedy output, the forward's predictions replay the decoder's
steps (`loss.accept_walk`), and its tokens per step come out without decoding.
"""

from __future__ import annotations

import functools
from typing import Any

import jax.numpy as jnp
import numpy as np

from mtp_jax.inference.decode import run_cached
from mtp_jax.loss import accept_length, accept_walk, mtp_targets
from mtp_jax.model.config import ModelConfig
from mtp_jax.model.model import Model


def simulated_acceptance(
    model: Model, params: Any, text: Any, prompt_lengths: Any, max_new_tokens: int
) -> dict[str, float]:
    """Tokens per verify step of greedy self-speculative decoding of `max_new_tokens` tokens,
    from the decoded text.

    text [B, T] int: row b is its prompt (prompt_lengths[b] tokens) followed by the trunk's
    greedy continuation (`generate`'s tokens), at least max_new_tokens + 2D - 1 of it (the
    last verify step drafts D tokens past max_new_tokens, and the model's forward over a
    window of S + D tokens has depth outputs at its first S positions only; anything may
    follow in the row).
    Returns {'tokens_per_step': the decoder's step sequence replayed from the prompt's last
    position (draft origin P-1), 'accept_len': 1 + accepted prefix averaged over every origin
    the decoder could draft from (P-1 .. P+max_new_tokens-3) instead, 'steps': the replayed
    verify steps}. `speculative_generate`'s stats['mean_accepted'] on the same prompts equals
    'tokens_per_step' (up to argmax ties broken differently by the cached and full forwards,
    and, for MoE models with `moe.capacity_factor` > 0, tokens the full forward drops: cached
    decoding routes dropless).
    """
    cfg = ModelConfig.from_any(model.config)
    if not cfg.mtp_depth:
        raise ValueError("simulated_acceptance needs a model with mtp_depth >= 1")
    text = jnp.asarray(text, jnp.int32)
    plen = jnp.asarray(prompt_lengths, jnp.int32)
    need = int(np.max(prompt_lengths)) + max_new_tokens + 2 * cfg.mtp_depth - 1
    if text.ndim != 2 or text.shape[1] < need:
        raise ValueError(
            f"text {tuple(text.shape)}: need [B, >= {need}] (longest prompt + max_new_tokens "
            f"{max_new_tokens} + 2 x mtp_depth {cfg.mtp_depth} - 1 tokens)"
        )
    build = lambda: functools.partial(_replay, Model(cfg), max_new_tokens)  # noqa: E731
    key = ("simulated_acceptance", cfg, max_new_tokens)
    (tokens, steps, total, count), _, _ = run_cached(key, build, params, text, plen)
    return {
        "tokens_per_step": float(tokens / max(steps, 1.0)),
        "accept_len": float(total / max(count, 1.0)),
        "steps": int(steps),
    }


def _replay(model, max_new_tokens, params, text, plen):
    """Every depth's argmax over text[:, :-1], restricted to the decoder's draft origins,
    replayed (`accept_walk`) and averaged (`accept_length`)."""
    depth = model.config.mtp_depth
    pred = jnp.argmax(model.apply({"params": params}, text[:, :-1]).logits, -1)  # [D+1, B, S]
    _, mask = mtp_targets(text, None, depth)
    i = jnp.arange(mask.shape[-1])[None, :]
    origin = (i >= plen[:, None] - 1) & (i < plen[:, None] - 2 + max_new_tokens)
    mask = mask & origin[None]
    return (*accept_walk(pred, mask), *accept_length(pred, mask))
