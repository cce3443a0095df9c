"""Decode speed: plain vs self-speculative greedy decoding, D = 1, 2, 3 and parallel heads.

    python benchmarks/decode.py                      # trains two small byte models first
    python benchmarks/decode.py --workdir runs/smoke # or uses a training run's checkpoint

Without --workdir it trains the smoke config's byte-level model (E=128, 2 layers, vocab 259)
with D=3 sequential MTP depths and, separately, with D=3 parallel heads, on the Python stdlib
source (a few hundred Adam steps, a few minutes on 2 CPU cores). D=1 and D=2 use the first 1
or 2 depths of the D=3 model. Prompts are the openings of held-out stdlib functions; every
prompt is decoded alone (batch 1, the latency setting speculative decoding is for), greedily,
for --max-new-tokens tokens. Prints a markdown table: tokens/s, speedup over plain decoding,
acceptance per draft position, tokens per verify step, and whether the tokens are identical.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sysconfig
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import mtp_jax
from mtp_jax.inference import generate, speculative_generate

EOS = 258  # ByteTokenizer: bytes 0..255, PAD 256, BOS 257, EOS 258


SMOKE = pathlib.Path(__file__).resolve().parents[1] / "configs" / "smoke.py"


def smoke_config(layout: str, steps: int, depth: int = 3):
    """configs/smoke.py (byte model, E=128, 2 layers) with `depth` MTP depths of `layout`."""
    overrides = [f"model.mtp_depth={depth}", f"model.mtp_layout={layout}", f"train.steps={steps}"]
    return mtp_jax.load_config(str(SMOKE), overrides)


def stdlib_files() -> list[pathlib.Path]:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if p.stat().st_size > 2000)


def corpus(files: list[pathlib.Path]) -> np.ndarray:
    """Byte tokens of the files, each followed by EOS."""
    parts = []
    for f in files:
        parts += [np.frombuffer(f.read_bytes(), np.uint8).astype(np.int32), np.array([EOS])]
    return np.concatenate(parts)


def train(config, tokens: np.ndarray, seed: int = 0):
    """The smoke config's optimizer, schedule, loss weights, batch and length, on random
    windows of `tokens`. Returns (ModelConfig, params, mean loss of the last 25 steps)."""
    from mtp_jax.config import mtp_lambdas
    from mtp_jax.train.state import make_optimizer

    cfg = mtp_jax.ModelConfig.from_any(config.model)
    model = mtp_jax.Model(cfg)
    seq, batch, steps = config.data.seq_len, config.data.batch_size, config.train.steps
    window = seq + cfg.mtp_depth + 1
    params = nn.unbox(
        jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, seq + cfg.mtp_depth), jnp.int32))
    )["params"]
    opt = make_optimizer(config)
    lambdas = jnp.asarray(mtp_lambdas(config))
    chunk_size = config.loss.chunk_size
    data = jnp.asarray(tokens)
    chunk = 25

    @jax.jit
    def run(params, opt_state, key):
        def step(carry, key):
            params, opt_state = carry
            starts = jax.random.randint(key, (batch,), 0, data.shape[0] - window)
            w = jax.vmap(lambda s: jax.lax.dynamic_slice_in_dim(data, s, window))(starts)
            loss, grads = jax.value_and_grad(
                lambda p: mtp_jax.loss_and_metrics(model, p, {"tokens": w}, lambdas, chunk_size)[0]
            )(params)
            updates, opt_state = opt.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(
            step, (params, opt_state), jax.random.split(key, chunk)
        )
        return params, opt_state, losses.mean()

    opt_state = opt.init(params)
    key = jax.random.key(seed + 1)
    loss = float("nan")
    for i in range(0, steps, chunk):
        params, opt_state, loss = run(params, opt_state, jax.random.fold_in(key, i))
    return cfg, params, float(loss)


def code_prompts(files: list[pathlib.Path], count: int, length: int = 48) -> list[bytes]:
    """Openings of `def` blocks in held-out files, `length` bytes each."""
    prompts = []
    for f in files:
        text = f.read_bytes()
        at = text.find(b"\n    def ", len(text) // 3)
        if at > 0:
            prompts.append(text[at + 1 : at + 1 + length])
        if len(prompts) == count:
            break
    return prompts


def sliced(cfg, params, depth: int):
    """The model with only its first `depth` MTP depths."""
    return (
        mtp_jax.Model(dataclasses.replace(cfg, mtp_depth=depth)),
        {**params, "mtp": jax.tree.map(lambda p: p[:depth], params["mtp"])},
    )


def timed(fn, model, params, prompts, max_new: int, repeats: int):
    """Decodes each prompt alone (after one warm-up); returns (tokens, tokens/s, stats)."""
    outs, stats, seconds, total = [], [], 0.0, 0
    for p in prompts:
        ids = np.frombuffer(p, np.uint8).astype(np.int32)[None]
        args = (model, params, ids, np.array([ids.shape[1]]))
        fn(*args, max_new_tokens=max_new)  # compile / warm up
        for _ in range(repeats):
            res = fn(*args, max_new_tokens=max_new)
            seconds += res.stats["seconds"]  # the jitted loop alone, host overhead excluded
            total += int(res.num_generated.sum())
        outs.append(res.tokens[0])
        stats.append(res.stats)
    return np.stack(outs), total / seconds, stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", help="use this training run's newest checkpoint")
    ap.add_argument("--steps", type=int, default=300, help="training steps per model")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    files = stdlib_files()
    held_out, train_files = files[::10], [f for i, f in enumerate(files) if i % 10]
    models = {}
    if args.workdir:
        from mtp_jax.train.checkpoint import load_checkpoint

        config, params = load_checkpoint(args.workdir)
        cfg = mtp_jax.ModelConfig.from_any(config.model)
        models[cfg.mtp_layout] = (cfg, jax.device_get(params))
        print(f"checkpoint {args.workdir}: {cfg}")
    else:
        tokens = corpus(train_files)
        for layout in ("sequential", "parallel"):
            t0 = time.perf_counter()
            cfg, params, loss = train(smoke_config(layout, args.steps), tokens)
            models[layout] = (cfg, params)
            print(
                f"trained {layout} D=3 for {args.steps} steps on {tokens.size / 1e6:.1f}M bytes: "
                f"loss {loss:.3f} ({time.perf_counter() - t0:.0f}s)"
            )

    prompts = code_prompts(held_out, args.prompts)
    n, r = args.max_new_tokens, args.repeats
    rows = []
    plain_tokens = {}
    for layout, (cfg, params) in models.items():
        base, base_tps, _ = timed(generate, mtp_jax.Model(cfg), params, prompts, n, r)
        plain_tokens[layout] = base
        rows.append((f"plain ({layout} trunk)", base_tps, 1.0, "-", 1.0, "-"))
        for depth in range(1, cfg.mtp_depth + 1):
            model, p = sliced(cfg, params, depth)
            toks, tps, stats = timed(speculative_generate, model, p, prompts, n, r)
            acc = np.mean([s["acceptance"] for s in stats], axis=0)
            mean = float(np.mean([s["mean_accepted"] for s in stats]))
            same = "yes" if np.array_equal(toks, base) else "NO"
            name = f"speculative {layout} D={depth}"
            rows.append((name, tps, tps / base_tps, "/".join(f"{a:.2f}" for a in acc), mean, same))

    print(
        f"\nbatch 1, {len(prompts)} code prompts x {n} new tokens, greedy, "
        f"{jax.devices()[0].platform} ({jax.device_count()} device)\n"
    )
    print("| decoding | tokens/s | speedup | acceptance per position | tokens/step | identical |")
    print("|---|---:|---:|---|---:|---|")
    for name, tps, speed, acc, mean, same in rows:
        print(f"| {name} | {tps:.0f} | {speed:.2f}x | {acc} | {mean:.2f} | {same} |")
    sample = bytes(int(t) for t in plain_tokens[next(iter(models))][0] if t < 256)
    print(
        "\nprompt 0 + greedy continuation:\n"
        + prompts[0].decode()
        + sample.decode("utf-8", "replace")
    )


if __name__ == "__main__":
    main()
