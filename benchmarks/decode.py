"""Decode speed: plain vs self-speculative greedy decoding, D = 1, 2, 3 and parallel heads.

    python benchmarks/decode.py                      # trains three byte models first (~17 min)
    python benchmarks/decode.py --workdir runs/smoke # or uses a training run's checkpoint

Without --workdir it trains, with the real training loop (`mtp_jax.train.train`) on the smoke
config's data store (the Python stdlib, byte-level, vocab 259), three models with D=3 MTP
depths: the smoke model (E=128, 2 layers) with sequential depths, the same with parallel
heads, and a --big E x layers model (default 384x16, MLP 3E, 4 heads, sequential depths,
--big-steps 300 steps at peak LR --big-lr 1e-3: about 9 of the 17 minutes on 2 CPU cores; the
smoke config's 3e-3 trains this deeper trunk worse, loss/depth_0 1.99 against 1.83).

Why two sizes: a speculative step costs one trunk forward over D+1 positions plus D depth
blocks, and emits up to D+1 tokens. It pays when that forward costs little more than a
one-token step, i.e. when decoding is bound by reading the weights, as it is for real models
on accelerators. The smoke model's weights (1.1M parameters, 4.5 MB) sit in the CPU's
caches, so its steps are bound by per-op overhead and compute: at D=3 the 4-position forward
and the three depth blocks (more than its 2-layer trunk) cost about 5x a plain step and
speculation loses. The big model's weights (34.6M parameters, 138 MB) stream from memory at
every step, which makes the 4-position forward cost ~1.2x a plain step and the three depth
blocks ~0.2x (2-core EPYC).
`benchmarks/decode_step_cost.py` measures that cost ratio across sizes on random weights.

D=1 and D=2 use the first 1 or 2 depths of a D=3 model. Prompts are the openings of stdlib
functions (`def` blocks a third into every 10th file); every prompt is decoded alone (batch 1,
the latency setting speculative decoding is for), greedily, for --max-new-tokens tokens. Prints
a markdown table: tokens/s (best of --repeats runs per prompt), speedup over plain decoding of
the same trunk, acceptance per draft position and tokens per verify step (both pooled over
the prompts' verify steps), the cost of one speculative step in plain-token times (tokens per
step / speedup), whether the tokens equal plain greedy's, and the 1-minute load average.
Tokens/s count the whole call, prefill included (with speculation, 128 tokens take ~40 verify
steps, so the prefill weighs ~3x more than in plain decoding), and the step cost is derived
from them, prefill included.

Next to the measured tokens per verify step, the simulated acceptance length three ways,
each with its gap to the measured figure: `eval/accept_len` (`mtp_jax.loss.accept_length`,
from the eval step's predictions: at every position, 1 + how many drafts of depths 1..D in a
row equal the trunk's own argmax) on --eval-batches held-out windows of the training store
(teacher forcing on real text, what training logs); the same count on each prompt followed by
the trunk's own greedy continuation, averaged over the positions the decoder can draft from
(the prompt's last onward); and `mtp_jax.inference.simulated_acceptance` on that text, which
replays the decoder's own sequence of draft origins on the same teacher-forced predictions
(`loss.accept_walk`) and so equals the measured figure. Measured figures: see the closing
notes and benchmarks/README.md.

Then, per model, each prompt's speedup at the deepest D (3 for the models trained here) next
to its greedy continuation. Briefly trained byte models fall into repetitive greedy
continuations (runs of spaces, underscores, repeated words), which the drafts predict well:
acceptance, and with it the speedup, depends on the prompt and on training (--big-steps,
--big-lr), so read the speedup together with the step cost and the continuations.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import pathlib
import sysconfig
import tempfile
import time

import jax
import numpy as np

import mtp_jax
from mtp_jax.inference import generate, simulated_acceptance, speculative_generate
from mtp_jax.train.step import make_eval_step
from mtp_jax.xla_cpu import reexec_with_tuned_malloc

SMOKE = pathlib.Path(__file__).resolve().parents[1] / "configs" / "smoke.py"


def smoke_config(
    layout: str,
    steps: int,
    depth: int = 3,
    layers: int = 2,
    width: int = 128,
    lr: float | None = None,
):
    """configs/smoke.py (byte model) with `depth` MTP depths of `layout` and an E=`width`,
    `layers`-layer trunk (MLP 3E, 4 heads of E/4: the smoke model at width 128); `lr` replaces
    the smoke config's peak learning rate."""
    overrides = [
        f"model.mtp_depth={depth}",
        f"model.mtp_layout={layout}",
        f"model.n_layers={layers}",
        f"model.d_model={width}",
        f"model.mlp_dim={3 * width}",
        f"model.head_dim={width // 4}",
        f"train.steps={steps}",
        f"train.eval_every={steps}",
        f"checkpoint.every={steps}",
    ] + ([f"train.lr={lr}"] if lr is not None else [])
    return mtp_jax.load_config(str(SMOKE), overrides)


def stdlib_files() -> list[pathlib.Path]:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if p.stat().st_size > 2000)


def train(config):
    """Trains `config` with the real loop in a scratch workdir.

    Returns (ModelConfig, params (on the device), final train metrics)."""
    from mtp_jax.train.loop import train as train_loop

    with tempfile.TemporaryDirectory() as workdir:
        result = train_loop(config, workdir, progress=False)
        config, params = mtp_jax.load_checkpoint(workdir)
    return mtp_jax.ModelConfig.from_any(config.model), params, result.metrics


def losses(metrics: dict) -> str:
    """'loss L, per depth a/b/c/d' from the last logged train metrics."""
    per_depth = [v for k, v in sorted(metrics.items()) if k.startswith("loss/depth_")]
    text = f"loss {metrics.get('loss', float('nan')):.3f}"
    return text + (", per depth " + "/".join(f"{v:.2f}" for v in per_depth) if per_depth else "")


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


def held_out_batches(config, count: int) -> list[dict]:
    """`count` batches of held-out windows (S + D + 1 tokens) of the run's store, as the
    training loop's evals read them."""
    from mtp_jax.train.loop import make_datasets

    config = copy.deepcopy(config)
    config.train.eval_every = max(config.train.eval_every, 1)
    (val,) = make_datasets(config)[1].values()
    it = iter(val)
    return [next(it) for _ in range(count)]


def simulated_accept_len(config, model, params, batches) -> float:
    """`eval/accept_len` of `model` (depth D) over `batches` ({'tokens' [B, >= S+D+1],
    optional 'segment_ids'}), computed by the training eval step."""
    config = copy.deepcopy(config)
    depth = config.model.mtp_depth = model.config.mtp_depth
    config.loss.chunk_size = 0
    step = jax.jit(make_eval_step(config, model))
    total = count = 0.0
    for b in batches:
        width = b["tokens"].shape[1] if "segment_ids" not in b else config.data.seq_len + depth + 1
        out = step(params, {k: jax.numpy.asarray(v[:, :width]) for k, v in b.items()})
        total, count = total + float(out["accept_sum"]), count + float(out["accept_count"])
    return total / max(count, 1.0)


def own_text(model, params, prompts: list[bytes], max_new: int) -> tuple[np.ndarray, np.ndarray]:
    """Each prompt followed by the trunk's greedy continuation, long enough for
    `simulated_acceptance` to replay `max_new` tokens of decoding: (text [N, T], lengths [N])."""
    ids = np.stack([np.frombuffer(p, np.uint8) for p in prompts]).astype(np.int32)
    lengths = np.full(len(prompts), ids.shape[1])
    more = max_new + 2 * model.config.mtp_depth
    res = generate(model, params, ids, lengths, max_new_tokens=more)
    return np.concatenate([ids, np.asarray(res.tokens)], axis=1), lengths


def timed(fn, model, params, prompts, max_new: int, repeats: int):
    """Decodes each prompt alone (after one warm-up), `repeats` times, keeping each prompt's
    fastest run (the machine may be shared). Returns (tokens, tokens/s, stats per prompt)."""
    outs, stats, seconds, total = [], [], 0.0, 0
    for p in prompts:
        ids = np.frombuffer(p, np.uint8).astype(np.int32)[None]
        args = (model, params, ids, np.array([ids.shape[1]]))
        fn(*args, max_new_tokens=max_new)  # compile / warm up
        runs = [fn(*args, max_new_tokens=max_new) for _ in range(repeats)]
        res = min(runs, key=lambda r: r.stats["seconds"])  # the jitted loop alone
        seconds += res.stats["seconds"]
        total += int(res.num_generated.sum())
        outs.append(res.tokens[0])
        stats.append(res.stats)
    return np.stack(outs), total / seconds, stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", help="use this training run's newest checkpoint")
    ap.add_argument("--steps", type=int, default=300, help="training steps, 2-layer models")
    ap.add_argument("--big", default="384x16", help="E x layers of the big model; 'none': skip")
    ap.add_argument("--big-steps", type=int, default=300, help="training steps, big model")
    ap.add_argument(
        "--big-lr", type=float, default=1e-3, help="peak LR, big model (smoke config: 3e-3)"
    )
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--eval-batches", type=int, default=8, help="held-out batches for the simulated length"
    )
    args = ap.parse_args()

    models = {}
    if args.workdir:
        config, params = mtp_jax.load_checkpoint(args.workdir)
        cfg = mtp_jax.ModelConfig.from_any(config.model)
        name = f"E={cfg.d_model} {cfg.n_layers}-layer {cfg.mtp_layout}"
        models[name] = (cfg, params, config)
        print(f"checkpoint {args.workdir}: {cfg}")
    else:
        runs = [("sequential", 128, 2, args.steps, None), ("parallel", 128, 2, args.steps, None)]
        if args.big.lower() != "none":
            try:
                width, layers = (int(v) for v in args.big.lower().split("x"))
            except ValueError:
                ap.error(f"--big {args.big!r}: expected WIDTHxLAYERS, e.g. 384x16, or 'none'")
            runs.append(("sequential", width, layers, args.big_steps, args.big_lr))
        for layout, width, layers, steps, lr in runs:
            t0 = time.perf_counter()
            config = smoke_config(layout, steps, layers=layers, width=width, lr=lr)
            cfg, params, metrics = train(config)
            name = f"E={width} {layers}-layer {layout}"
            models[name] = (cfg, params, config)
            print(
                f"trained {name} D=3 for {steps} steps at peak LR {config.train.lr:g}: "
                f"{losses(metrics)} "
                f"({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )

    prompts = code_prompts(stdlib_files()[::10], args.prompts)
    n, r = args.max_new_tokens, args.repeats
    rows = []
    per_prompt = {}  # name -> (plain tokens, plain stats, deepest depth's stats)
    for name, (cfg, params, config) in models.items():
        load = os.getloadavg()[0]
        base, base_tps, base_stats = timed(generate, mtp_jax.Model(cfg), params, prompts, n, r)
        rows.append((f"plain, {name} trunk", base_tps, 1.0, "-", 1.0, "-", load, None, None, None))
        if cfg.mtp_depth:
            held_out = held_out_batches(config, args.eval_batches)
            text, lengths = own_text(mtp_jax.Model(cfg), params, prompts, n)
        for depth in range(1, cfg.mtp_depth + 1):
            load = os.getloadavg()[0]
            model, p = sliced(cfg, params, depth)
            toks, tps, stats = timed(speculative_generate, model, p, prompts, n, r)
            # Pooled over the prompts' verify steps (each prompt is decoded alone: batch 1).
            steps = np.array([s["steps"] for s in stats], float)
            accepted = np.array([s["acceptance"] for s in stats]) * steps[:, None]
            acc = "/".join(f"{a:.2f}" for a in accepted.sum(0) / steps.sum())
            mean = float(np.dot([s["mean_accepted"] for s in stats], steps) / steps.sum())
            same = "yes" if np.array_equal(toks, base) else "NO"
            replay = simulated_acceptance(model, p, text, lengths, n)
            sim = (
                simulated_accept_len(config, model, p, held_out),
                replay["accept_len"],
                replay["tokens_per_step"],
            )
            rows.append(
                (f"speculative {name} D={depth}", tps, tps / base_tps, acc, mean, same, load, *sim)
            )
        if cfg.mtp_depth:  # a checkpoint without MTP depths has no speculative rows
            per_prompt[name] = (base, base_stats, stats)

    print(
        f"\nbatch 1, {len(prompts)} code prompts x {n} new tokens, greedy, best of {r} runs, "
        f"{jax.devices()[0].platform} ({jax.device_count()} device, {os.cpu_count()} cores)\n"
    )
    head = "| decoding | tokens/s | speedup | acceptance per position | tokens/step |"
    head += " sim. held-out (gap) | sim. own text (gap) | sim. own text, replayed (gap) |"
    print(head + " step cost | identical | load |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---|---:|")

    def sim(value, measured):
        return "-" if value is None else f"{value:.2f} ({value / measured - 1:+.0%})"

    for name, tps, speed, acc, mean, same, load, held, own, replayed in rows:
        cost = f"{mean / speed:.2f}x"  # one verify step, in plain decoding's per-token time
        print(
            f"| {name} | {tps:.0f} | {speed:.2f}x | {acc} | {mean:.2f} | {sim(held, mean)} "
            f"| {sim(own, mean)} | {sim(replayed, mean)} | {cost} | {same} | {load:.1f} |"
        )
    for name, (toks, base_stats, stats) in per_prompt.items():
        # What the speedup rests on: acceptance follows how predictable each continuation is.
        print(f"\n{name}, D={len(stats[0]['acceptance'])}, per prompt:\n")
        print("| prompt | speedup | tokens/step | prompt end + greedy continuation |")
        print("|---:|---:|---:|---|")
        for i, (prompt, row, b, sp) in enumerate(zip(prompts, toks, base_stats, stats)):
            text = prompt[-16:] + bytes(int(t) for t in row if t < 256)
            shown = (
                repr(text.decode("utf-8", "replace"))[1:81].replace("|", "\\|").replace("`", "'")
            )
            speed = b["seconds"] / sp["seconds"]
            print(f"| {i} | {speed:.2f}x | {sp['mean_accepted']:.2f} | `{shown}` |")


if __name__ == "__main__":
    reexec_with_tuned_malloc()  # huge-page malloc, as mtp-train runs (mtp_jax/xla_cpu.py)
    main()
