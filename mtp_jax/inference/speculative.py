"""Self-speculative decoding: the MTP depths draft, the trunk verifies.

Notation: a row knows tokens t[0 .. n-1]; the trunk has consumed t[0 .. n-2] (its KV cache and
the pre-norm hidden states h0 are verified up to position n-2) and t[n-1] is the token it
emitted last. One step of the loop:

1. **Draft** D tokens t[n .. n+D-1] at position i = n-2 with the drafter:
   - sequential chain (DeepSeek-V3): depth k reads h^{k-1}_i and Emb(t[i+k]) and predicts
     t[i+k+1]; t[i+k] for k >= 2 is the draft the previous depth just proposed;
   - parallel heads (Stern-style blockwise): head k reads h0_i only and predicts t[i+k+1].
2. **Verify**: one trunk forward over the D+1 candidates t[n-1], d_n .. d_{n+D-1} at positions
   n-1 .. n+D-1 gives the trunk's own distribution for t[n .. n+D].
3. **Accept** the longest prefix of drafts the trunk agrees with (greedy: equal to its argmax;
   sampling: accepted with probability min(1, p/q), Leviathan et al. / Chen et al.), then one
   token from the trunk: its argmax / a draw from norm(max(0, p - q)) at the first rejection,
   or from p after D accepted drafts (the "bonus"). Rows advance by 1 .. D+1 tokens each.

Rolling back is implicit: every cache writes its keys at absolute positions and attends to
slots at or before the query, so positions past the accepted prefix are simply rewritten by
the next step before anything reads them.

MTP caches. Depth k's slot j is *verified* when it was computed from the trunk's verified h0_j
and the true tokens t[j+1 .. j+k] (the same wiring as in training), i.e. for j <= n-1-k.
Drafting at i = n-2 also needs slots n-k .. n-2 of depth k, which depend on drafted tokens.
Each draft phase therefore recomputes a window of D+1 positions [n-2-D, n-2] at every depth
(clamped at 0), reading h0 from a per-position history buffer and tokens from the sequence
buffer (true tokens where known, the fresh drafts after them). Since a step advances a row by
at most D+1 tokens, the window always covers every slot that became verifiable since the last
window and every slot that was computed from a since-rejected draft; slots before it were
computed from verified inputs and are left alone. Parallel heads need only h0, so their
window is recomputed in one call over all heads.

Greedy speculative decoding returns exactly the tokens of plain greedy decoding (`generate`);
with sampling, each emitted token follows the trunk's sampling distribution (the same
temperature / top-k / top-p transform is applied to the trunk's p and the drafter's q).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax.inference.decode import (
    DecodeResult,
    Sampler,
    check_inputs,
    eos_array,
    finish,
    gather_rows,
    prefill_last_logits,
    run_cached,
    sample_from,
    write_rows,
)
from mtp_jax.model.config import ModelConfig
from mtp_jax.model.decoding import Caches, DecodeParams, Decoder, prompt_positions
from mtp_jax.model.model import Model

Array = jax.Array


class SpecState(NamedTuple):
    """The loop state (all arrays; B rows, L cache slots, N = max_new_tokens).

    n [B]: tokens known per row (prompt + generated); seq [B, L]: those tokens, then drafts;
    hist [B, L, E]: the trunk's pre-norm h0 per position (verified up to n-2);
    trunk, mtp: caches, one KVCache [B, L, K, H] (MLA: LatentCache) per trunk layer / per MTP
    depth (see `mtp_jax.model.decoding` for why they are not stacked);
    out [B, N+D+1], count [B], done [B]: the generated tokens; drafted [B, N+D+1]: per entry
    of out, whether it is an accepted draft (False: the trunk's own token); row_drafted [B]:
    accepted drafts kept in out (a step cut short by EOS or max_new_tokens keeps fewer);
    step: verify steps so far; accepted [D]: accepted drafts per draft position, summed over
    active rows and steps; emitted: tokens accepted per verify step, summed; row_steps:
    active (row, step) pairs.
    """

    n: Array
    seq: Array
    hist: Array
    trunk: Caches
    mtp: Caches
    out: Array
    count: Array
    done: Array
    drafted: Array
    row_drafted: Array
    step: Array
    accepted: Array
    emitted: Array
    row_steps: Array


# ------------------------------------------------------------------------------ drafting


def _draft_window(n: Array, depth: int) -> tuple[Array, Array]:
    """n [B] -> (window positions [B, D+1] starting at max(n-2-D, 0), index of n-2 in it [B])."""
    start = jnp.maximum(n - 2 - depth, 0)
    return start[:, None] + jnp.arange(depth + 1, dtype=jnp.int32), n - 2 - start


def _at(x: Array, index: Array) -> Array:
    """x [B, T, ...], index [B] -> x[b, index[b]] as [B, ...]."""
    return jnp.take_along_axis(x, index.reshape((-1,) + (1,) * (x.ndim - 1)), axis=1)[:, 0]


def draft_tokens(
    dec: Decoder, sampler: Sampler, params: DecodeParams, s: SpecState, key: Array
) -> tuple[Array, Array, Array, Caches]:
    """The drafter proposes t[n .. n+D-1] from position i = n-2, recomputing every depth over
    the window [n-2-D, n-2] (see the module docstring).

    Sequential chain: depth k reads h^{k-1} and t[i+k] (`depth_tokens` on the row buffer, which
    holds this step's drafts at n .. n+k-2 by the time depth k runs) and proposes t[n+k-1].
    Parallel heads: head k reads h0 alone; the D draws are independent.
    Returns (drafts [B, D], their distributions q [B, D, V] (greedy: [B, D, 0], unused), seq
    with the drafts written at n .. n+D-1, the updated MTP caches, one per depth).
    """
    depth = dec.cfg.mtp_depth
    window, query = _draft_window(s.n, depth)
    h0 = gather_rows(s.hist, window)  # [B, D+1, E]
    h, seq, caches, drafts, probs = h0, s.seq, list(s.mtp), [], []
    for k in range(1, depth + 1):
        h, out, caches[k - 1] = dec.depth_step(params, k, h, seq, window, caches[k - 1])
        logits = dec.logits(params, _at(out, query))  # [B, V], at position n-2
        draft = sampler.sample(jax.random.fold_in(key, k), logits)
        seq = write_rows(seq, draft[:, None], s.n + k - 1)
        drafts.append(draft)
        if not sampler.greedy:
            probs.append(sampler.probs(logits))
    drafts = jnp.stack(drafts, 1)
    q = jnp.stack(probs, 1) if probs else jnp.zeros(drafts.shape + (0,), jnp.float32)
    return drafts, q, seq, tuple(caches)


# ------------------------------------------------------------------------------ verification


def accept(
    sampler: Sampler, drafts: Array, q: Array, logits: Array, key: Array
) -> tuple[Array, Array]:
    """Chooses the tokens to emit from the trunk's verdict.

    drafts [B, D], q [B, D, V] (draft distributions), logits [B, D+1, V] (trunk at the D+1
    candidates) -> (m [B]: number of accepted drafts, tokens [B, D+1]: the first m drafts then
    the trunk's token at index m; entries past m are meaningless).
    """
    depth = drafts.shape[1]
    if sampler.greedy:
        target = jnp.argmax(logits, -1).astype(jnp.int32)  # [B, D+1]
        agree = drafts == target[:, :depth]
        return jnp.sum(jnp.cumprod(agree, axis=1), axis=1), target
    u_key, r_key = jax.random.split(key)
    p = sampler.probs(logits)  # [B, D+1, V]
    p_d = jnp.take_along_axis(p[:, :depth], drafts[..., None], -1)[..., 0]
    q_d = jnp.take_along_axis(q, drafts[..., None], -1)[..., 0]
    u = jax.random.uniform(u_key, drafts.shape)
    agree = u * q_d < p_d  # accept with probability min(1, p/q)
    m = jnp.sum(jnp.cumprod(agree, axis=1), axis=1)
    residual = jnp.maximum(p[:, :depth] - q, 0.0)
    total = residual.sum(-1, keepdims=True)
    residual = jnp.where(total > 0, residual / jnp.where(total > 0, total, 1.0), p[:, :depth])
    fixes = sample_from(r_key, jnp.concatenate([residual, p[:, depth:]], axis=1))  # [B, D+1]
    fix = _at(fixes, m)
    pos = jnp.arange(depth + 1)[None, :]
    drafts_ext = jnp.pad(drafts, ((0, 0), (0, 1)))
    return m, jnp.where(pos < m[:, None], drafts_ext, fix[:, None]).astype(jnp.int32)


def _emit(
    s: SpecState, m: Array, tokens: Array, max_new_tokens: int, eos_id: Array
) -> tuple[Array, Array, Array, Array, Array, Array]:
    """Appends the accepted tokens [B, D+1] (first m+1 valid) of the active rows.

    Returns (out, drafted, row_drafted, count, done, n) after the step.
    """
    active = ~s.done
    pos = jnp.arange(tokens.shape[1])[None, :]
    is_eos = (tokens == eos_id) & (pos <= m[:, None])
    has_eos = jnp.any(is_eos, axis=1)
    emitted = jnp.where(has_eos, jnp.argmax(is_eos, axis=1) + 1, m + 1)
    done = s.done | (active & has_eos)
    # A finished row's count no longer moves, so writing there only touches entries past it.
    out = write_rows(s.out, tokens, s.count)
    drafted = write_rows(s.drafted, pos < m[:, None], s.count)
    kept = jnp.minimum(emitted, max_new_tokens - s.count)  # what `finish` will keep
    row_drafted = s.row_drafted + jnp.where(active, jnp.minimum(m, kept), 0)
    count = s.count + jnp.where(active, emitted, 0)
    done = done | (count >= max_new_tokens)
    return out, drafted, row_drafted, count, done, s.n + jnp.where(active, m + 1, 0)


# ------------------------------------------------------------------------------ the loop


def _prefill(
    dec: Decoder,
    sampler: Sampler,
    params: DecodeParams,
    prompts: Array,
    lengths: Array,
    key: Array,
    max_new_tokens: int,
    eos_id: Array,
) -> SpecState:
    """Trunk over the prompts, the first token from the trunk, MTP caches over the prompts."""
    batch, plen = prompts.shape
    depth = dec.cfg.mtp_depth
    slots = plen + max_new_tokens + 2 * depth + 2
    h0, logits, trunk = dec.prefill(params, prompts, slots)
    first = sampler.sample(key, prefill_last_logits(logits, lengths))
    seq = jnp.zeros((batch, slots), jnp.int32).at[:, :plen].set(prompts)
    seq = write_rows(seq, first[:, None], lengths)
    hist = jnp.zeros((batch, slots, dec.cfg.d_model), h0.dtype).at[:, :plen].set(h0)
    # Slot j of depth k is right wherever t[j+1 .. j+k] are known; the rest is redone in the
    # first draft window.
    empty = dec.init_cache(batch, slots).mtp
    _, mtp = dec.mtp_step(params, h0, seq, prompt_positions(batch, plen), empty)
    out = jnp.zeros((batch, max_new_tokens + depth + 1), jnp.int32).at[:, 0].set(first)
    done = jnp.full((batch,), max_new_tokens <= 1) | (first == eos_id)
    zero = jnp.zeros((), jnp.int32)
    return SpecState(
        n=lengths + 1,
        seq=seq,
        hist=hist,
        trunk=trunk,
        mtp=mtp,
        out=out,
        count=jnp.ones((batch,), jnp.int32),
        done=done,
        drafted=jnp.zeros(out.shape, bool),
        row_drafted=jnp.zeros((batch,), jnp.int32),
        step=zero,
        accepted=jnp.zeros((depth,), jnp.int32),
        emitted=zero,
        row_steps=zero,
    )


def _step(
    dec: Decoder,
    sampler: Sampler,
    params: DecodeParams,
    s: SpecState,
    key: Array,
    max_new_tokens: int,
    eos_id: Array,
) -> SpecState:
    """One draft -> verify -> accept step for every row (finished rows stay put)."""
    depth = dec.cfg.mtp_depth
    draft_key, accept_key = jax.random.split(key)
    drafts, q, seq, mtp = draft_tokens(dec, sampler, params, s, draft_key)
    start = s.n - 1
    candidates = jnp.concatenate([_at(seq, start)[:, None], drafts], axis=1)  # [B, D+1]
    positions = start[:, None] + jnp.arange(depth + 1, dtype=jnp.int32)
    h0, logits, trunk = dec.trunk_step(params, candidates, positions, s.trunk)
    m, tokens = accept(sampler, drafts, q, logits, accept_key)
    active = ~s.done
    out, drafted, row_drafted, count, done, n = _emit(s, m, tokens, max_new_tokens, eos_id)
    # Entries past the accepted tokens are garbage, but they lie at n' or later: never trusted.
    seq = jnp.where(active[:, None], write_rows(seq, tokens, s.n), s.seq)
    hit = (jnp.arange(depth)[None, :] < m[:, None]) & active[:, None]
    return SpecState(
        n=n,
        seq=seq,
        hist=write_rows(s.hist, h0, start),
        trunk=trunk,
        mtp=mtp,
        out=out,
        count=count,
        done=done,
        drafted=drafted,
        row_drafted=row_drafted,
        step=s.step + 1,
        accepted=s.accepted + hit.sum(0).astype(jnp.int32),
        emitted=s.emitted + jnp.sum(jnp.where(active, m + 1, 0)),
        row_steps=s.row_steps + jnp.sum(active).astype(jnp.int32),
    )


def _spec_loop(cfg: ModelConfig, sampler: Sampler, max_new_tokens: int) -> Callable[..., SpecState]:
    """The jittable loop: (params, prompts [B, P], lengths [B], rng, eos_id) -> SpecState;
    params as `Decoder.prepare` makes them."""
    dec = Decoder(cfg)

    def run(params, prompts, lengths, rng, eos_id):
        prefill_key, loop_key = jax.random.split(rng)
        s = _prefill(dec, sampler, params, prompts, lengths, prefill_key, max_new_tokens, eos_id)

        def body(s: SpecState) -> SpecState:
            key = jax.random.fold_in(loop_key, s.step)
            return _step(dec, sampler, params, s, key, max_new_tokens, eos_id)

        return jax.lax.while_loop(lambda s: ~jnp.all(s.done), body, s)

    return run


def speculative_decode_state(
    model: Model,
    params: Any,
    prompts: Any,
    lengths: Any,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    rng: Array | None = None,
) -> tuple[SpecState, float, float]:
    """`speculative_generate`'s loop, returning its final state (for tests and debugging).

    Returns (SpecState on the host, compile seconds, run seconds).
    """
    cfg = ModelConfig.from_any(model.config)
    if not cfg.mtp_depth:
        raise ValueError("speculative decoding needs a model with mtp_depth >= 1")
    sampler = Sampler(temperature, top_k, top_p)
    prompts, lengths = check_inputs(prompts, lengths, max_new_tokens)
    params = model.decoder().prepare(params)
    rng = jax.random.key(0) if rng is None else rng
    key = ("speculative", cfg, sampler, max_new_tokens)
    build = lambda: _spec_loop(cfg, sampler, max_new_tokens)  # noqa: E731
    return run_cached(key, build, params, prompts, lengths, rng, eos_array(eos_id))


def speculative_generate(
    model: Model,
    params: Any,
    prompts: Any,
    lengths: Any,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    rng: Array | None = None,
    pad_id: int = 0,
) -> DecodeResult:
    """Self-speculative decoding with the model's MTP depths (or parallel heads) as drafter.

    prompts [B, P] int (right-padded), lengths [B] -> DecodeResult(tokens [B, max_new_tokens],
    num_generated [B], stats). Greedy (temperature 0) gives exactly `generate`'s tokens;
    sampling gives tokens distributed as `generate`'s. stats: `acceptance` [D] (fraction of
    verify steps, over active rows, in which draft position j+1 was accepted), `mean_accepted`
    (tokens emitted per row per verify step, 1 .. D+1), `steps` (verify steps), `tokens_per_sec`
    (excluding compilation), `seconds`, `compile_seconds`, `total_tokens`, and per-token
    provenance `drafted`: per row, a list of num_generated booleans, True where that token is
    an accepted MTP draft, False where the trunk produced it (the first token, and each verify
    step's correction or bonus token); `accepted_drafts`: per row, the count of True (kept
    separately on the device, as a consistency check).
    """
    s, compile_s, run_s = speculative_decode_state(
        model,
        params,
        prompts,
        lengths,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_id=eos_id,
        rng=rng,
    )
    tokens, count = finish(s.out, s.count, max_new_tokens, pad_id)
    drafted = [row[:c].tolist() for row, c in zip(np.asarray(s.drafted, bool), count)]
    total = int(count.sum())
    row_steps = max(int(s.row_steps), 1)
    stats = {
        "acceptance": (np.asarray(s.accepted) / row_steps).tolist(),
        "mean_accepted": int(s.emitted) / row_steps,
        "steps": int(s.step),
        "seconds": run_s,
        "compile_seconds": compile_s,
        "tokens_per_sec": total / run_s if run_s > 0 else float("inf"),
        "total_tokens": total,
        "drafted": drafted,
        "accepted_drafts": np.asarray(s.row_drafted).tolist(),
    }
    return DecodeResult(tokens=tokens, num_generated=count, stats=stats)
