"""Prefill + cached incremental decoding (greedy or sampled), batched with ragged prompts.

```
result = generate(model, params, prompts [B, P], lengths [B], max_new_tokens=64)
result.tokens        # [B, max_new_tokens] int32, padded with `pad_id` past num_generated
result.num_generated # [B] (an EOS, when one is produced, is included and ends its row)
result.stats         # {'tokens_per_sec', 'steps', 'seconds', 'compile_seconds', ...}
```
Prompts are right-padded: row b's prompt is `prompts[b, :lengths[b]]`, at positions
`0 .. lengths[b]-1`. The whole loop (prefill, then one trunk step per token) is one jitted
function with a preallocated KV cache of `P + max_new_tokens` slots (P rounded up by
`prompt_width`, so that nearby prompt lengths share one compiled loop) and a `lax.while_loop`
that stops once every row is finished. Padding slots of a short prompt hold garbage keys, but
the row's first decode step overwrites slot `lengths[b]` before attending and the causal
mask hides every slot past the query's position, so they are never read.

Every model computation is the model's own decoding API (`mtp_jax.model.decoding.Decoder`:
prefill, cached trunk and depth steps on the model's parameter tree); this package holds the
loops, sampling and acceptance. Parameters may be sharded over a mesh (`load_params(...,
mesh=...)`): the loop is compiled for their shardings and gives the tokens of one device.

Sampling applies `Sampler` (temperature, then top-k, then top-p) to the trunk's logits;
`temperature=0` is greedy (argmax). The compiled loop is cached per model config, shapes
and sampling settings; `stats['tokens_per_sec']` excludes compilation.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax.model.config import ModelConfig
from mtp_jax.model.decoding import Caches, Decoder
from mtp_jax.model.model import Model

Array = jax.Array


@dataclasses.dataclass
class DecodeResult:
    """What a decode returns (host arrays).

    tokens [B, N] int32 (N = max_new_tokens, entries past num_generated are `pad_id`),
    num_generated [B] int32, stats: a dict of plain Python numbers / lists.
    """

    tokens: np.ndarray
    num_generated: np.ndarray
    stats: dict[str, Any]

    def as_lists(self) -> list[list[int]]:
        """The generated tokens of each row, without padding."""
        return [row[:n].tolist() for row, n in zip(self.tokens, self.num_generated)]


@dataclasses.dataclass(frozen=True)
class Sampler:
    """The token-selection rule: temperature, then top-k, then top-p (nucleus) filtering.

    temperature 0 means greedy (argmax); top_k 0 and top_p 1 disable those filters.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def probs(self, logits: Array) -> Array:
        """logits [..., V] -> the distribution tokens are drawn from, [..., V] float32."""
        if self.greedy:
            return jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1], dtype=jnp.float32)
        x = logits.astype(jnp.float32) / self.temperature
        vocab = x.shape[-1]
        if 0 < self.top_k < vocab:
            kth = jax.lax.top_k(x, self.top_k)[0][..., -1:]
            x = jnp.where(x < kth, -jnp.inf, x)
        if self.top_p < 1.0:
            desc = -jnp.sort(-x, axis=-1)
            p = jax.nn.softmax(desc, axis=-1)
            keep = (jnp.cumsum(p, axis=-1) - p) < self.top_p  # the smallest prefix reaching top_p
            threshold = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
            x = jnp.where(x < threshold, -jnp.inf, x)
        return jax.nn.softmax(x, axis=-1)

    def sample(self, key: Array, logits: Array) -> Array:
        """logits [..., V] -> tokens [...] int32 (independent draws per leading index)."""
        if self.greedy:
            return jnp.argmax(logits, -1).astype(jnp.int32)
        return sample_from(key, self.probs(logits))


def sample_from(key: Array, probs: Array) -> Array:
    """probs [..., V] -> tokens [...] int32, one independent draw per leading index."""
    return jax.random.categorical(key, jnp.log(probs), axis=-1).astype(jnp.int32)


# ------------------------------------------------------------------------------ shared helpers


MIN_PROMPT_WIDTH = 16


def prompt_width(width: int) -> int:
    """The compiled prompt width for prompts [B, width]: the next power of two, at least 16.

    Prompts are right-padded to it, so prompts of different lengths share one compiled loop
    (a notebook trying prompts of 9, 12 and 15 tokens compiles once, not three times); the
    padding columns are never read (see the module docstring).
    """
    return max(MIN_PROMPT_WIDTH, 1 << (width - 1).bit_length())


def check_inputs(prompts: Any, lengths: Any, max_new_tokens: int) -> tuple[Array, Array]:
    """Validates prompts [B, P] and lengths [B]; returns them as int32 device arrays, the
    prompts right-padded (with 0) to `prompt_width(P)` columns."""
    prompts = np.asarray(prompts)
    lengths = np.asarray(lengths)
    if prompts.ndim != 2 or prompts.shape[1] < 1:
        raise ValueError(f"prompts must be [B, P] with P >= 1, got shape {prompts.shape}")
    if lengths.shape != prompts.shape[:1]:
        raise ValueError(f"lengths must be [B]={prompts.shape[:1]}, got {lengths.shape}")
    if lengths.min() < 1 or lengths.max() > prompts.shape[1]:
        raise ValueError(f"lengths must lie in [1, {prompts.shape[1]}], got {lengths.tolist()}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    pad = prompt_width(prompts.shape[1]) - prompts.shape[1]
    prompts = np.pad(prompts, ((0, 0), (0, pad)))
    return jnp.asarray(prompts, jnp.int32), jnp.asarray(lengths, jnp.int32)


def write_rows(buffer: Array, new: Array, start: Array) -> Array:
    """Per row b, buffer[b, start[b] : start[b] + T] = new[b].

    buffer [B, L, ...], new [B, T, ...], start [B] -> [B, L, ...].
    """
    return jax.vmap(lambda b, n, s: jax.lax.dynamic_update_slice_in_dim(b, n, s, axis=0))(
        buffer, new.astype(buffer.dtype), start
    )


def gather_rows(buffer: Array, index: Array) -> Array:
    """buffer [B, L, ...], index [B, T] -> buffer[b, index[b, t]] as [B, T, ...]."""
    return jax.vmap(lambda b, i: jnp.take(b, i, axis=0, mode="clip"))(buffer, index)


def finish(out: Any, count: Any, max_new_tokens: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """out [B, >=N], count [B] -> (tokens [B, N] with entries past count = pad_id, count [B])."""
    count = np.minimum(np.asarray(count), max_new_tokens).astype(np.int32)
    out = np.asarray(out)[:, :max_new_tokens].astype(np.int32)
    valid = np.arange(max_new_tokens)[None, :] < count[:, None]
    return np.where(valid, out, pad_id).astype(np.int32), count


def eos_array(eos_id: int | None) -> Array:
    """The EOS id as a traced int32 scalar (-1, which no token equals, for none)."""
    return jnp.asarray(-1 if eos_id is None else eos_id, jnp.int32)


_COMPILED: dict[Any, Any] = {}


def run_cached(
    key: Any, build: Callable[[], Callable[..., Any]], *args: Any
) -> tuple[Any, float, float]:
    """Runs `jax.jit(build())(*args)`, compiling once per (key, argument shapes).

    Returns (outputs on the host, compile seconds (0 when cached), run seconds: the device
    computation alone, without the host transfer of the outputs).
    """
    leaves, tree = jax.tree.flatten(args)
    layout = tuple((x.shape, str(x.dtype), getattr(x, "sharding", None)) for x in leaves)
    full_key = (key, tree, layout)
    compile_s = 0.0
    if full_key not in _COMPILED:
        t0 = time.perf_counter()
        _COMPILED[full_key] = jax.jit(build()).lower(*args).compile()
        compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = jax.block_until_ready(_COMPILED[full_key](*args))
    run_s = time.perf_counter() - t0
    return jax.device_get(out), compile_s, run_s


def prefill_last_logits(logits: Array, lengths: Array) -> Array:
    """logits [B, P, V] of a prefill -> those at each row's last prompt token, [B, V]."""
    return jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]


# ------------------------------------------------------------------------------ plain decoding


class _PlainState(NamedTuple):
    step: Array  # scalar int32: tokens generated so far (per active row)
    logits: Array  # [B, V] the trunk's logits for the next token
    caches: Caches  # one per layer: KVCache [B, L, K, H] or (MLA) LatentCache
    out: Array  # [B, N] (entries of finished rows are garbage)
    count: Array  # [B]
    done: Array  # [B] bool


def _plain_loop(
    cfg: ModelConfig, sampler: Sampler, max_new_tokens: int
) -> Callable[..., tuple[Array, Array, Array]]:
    """The jittable loop: (params, prompts, lengths, rng, eos_id) -> (out, count, steps);
    params as `Decoder.prepare(..., with_depths=False)` makes them."""
    dec = Decoder(cfg)

    def run(params, prompts, lengths, rng, eos_id):
        batch, plen = prompts.shape
        _, logits, caches = dec.prefill(params, prompts, plen + max_new_tokens)
        state = _PlainState(
            step=jnp.int32(0),
            logits=prefill_last_logits(logits, lengths),
            caches=caches,
            out=jnp.zeros((batch, max_new_tokens), jnp.int32),
            count=jnp.zeros((batch,), jnp.int32),
            done=jnp.zeros((batch,), bool),
        )

        def cond(s: _PlainState):
            return (s.step < max_new_tokens) & ~jnp.all(s.done)

        def body(s: _PlainState):
            tok = sampler.sample(jax.random.fold_in(rng, s.step), s.logits)
            active = ~s.done
            out = s.out.at[:, s.step].set(tok)
            done = s.done | (s.step + 1 >= max_new_tokens) | (tok == eos_id)
            pos = (lengths + s.step)[:, None]
            _, logits, caches = dec.trunk_step(params, tok[:, None], pos, s.caches)
            return _PlainState(
                s.step + 1, logits[:, 0], caches, out, s.count + active.astype(jnp.int32), done
            )

        final = jax.lax.while_loop(cond, body, state)
        return final.out, final.count, final.step

    return run


def generate(
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
    """Plain autoregressive decoding with the trunk (the MTP depths are not used).

    prompts [B, P] int (right-padded), lengths [B] -> DecodeResult(tokens [B, max_new_tokens],
    num_generated [B], stats). A row stops after producing `eos_id` (included) or
    `max_new_tokens` tokens. `rng` (a `jax.random.key`) seeds sampling; default key 0.
    """
    sampler = Sampler(temperature, top_k, top_p)
    prompts, lengths = check_inputs(prompts, lengths, max_new_tokens)
    # The trunk alone: plain decoding of every D and layout shares one compiled loop.
    cfg = dataclasses.replace(
        ModelConfig.from_any(model.config), mtp_depth=0, mtp_layout="sequential"
    )
    params = model.decoder().prepare(params, with_depths=False)
    rng = jax.random.key(0) if rng is None else rng
    key = ("plain", cfg, sampler, max_new_tokens)
    build = lambda: _plain_loop(cfg, sampler, max_new_tokens)  # noqa: E731
    (out, count, steps), compile_s, run_s = run_cached(
        key, build, params, prompts, lengths, rng, eos_array(eos_id)
    )
    tokens, count = finish(out, count, max_new_tokens, pad_id)
    total = int(count.sum())
    stats = {
        "steps": int(steps),
        "seconds": run_s,
        "compile_seconds": compile_s,
        "tokens_per_sec": total / run_s if run_s > 0 else float("inf"),
        "total_tokens": total,
    }
    return DecodeResult(tokens=tokens, num_generated=count, stats=stats)
