"""Drafters on a frozen trunk: one trained trunk, D=3 MTP depths trained on it per objective.

    python benchmarks/drafters.py            # about 10 min on 2 CPU cores (256x6 trunk)
    python benchmarks/drafters.py --quick    # about 3 min: a 128x2 trunk, few steps
    python benchmarks/drafters.py --trunk 256x8 --trunk-steps 300 --steps 150
                                             # 18 min with the 2 cores shared (load 4.5)

1. Trains a trunk without MTP depths (D=0) with the real loop (`mtp_jax.train`) on the smoke
   config's data (the Python stdlib, byte-level, vocab 259): --trunk E x layers (MLP 3E, 4
   heads), --trunk-steps steps at peak LR --lr.
2. For each objective of `loss.mtp_objective` (ce, distill, tv): a D=3 sequential model
   started from that trunk (`init.from_workdir`: its trunk, embedding and head) and trained
   with `train.trainable=mtp` for --steps steps by the same loop: the same fresh depths and
   the same batches for every objective.
3. Measures on held-out data and code prompts (as `benchmarks/decode.py`):
   - sim. greedy: simulated tokens per verify step under teacher forcing (`loss.accept_length`):
     1 + the mean over held-out positions of the number of leading depths whose argmax equals
     the trunk's argmax at the same target token (the prefix a greedy verifier accepts);
   - sim. T=1: 1 + sum_j P(drafts 1..j accepted) under rejection sampling at temperature 1,
     from the per-position acceptance sum_v min(p, q) (what the tv objective maximises);
   - greedy / T=0.7 / T=1.0: measured tokens per verify step of `speculative_generate` and its
     speedup over `generate` with the same sampler (batch 1, best of --repeats runs per prompt);
   - trunk: whether a checksum of every non-depth parameter is unchanged by the depth training.
The trunk is D=0: its plain decoding is shared by every row. Speedups on a CPU need a trunk
whose weights stream from memory each step (see `benchmarks/decode.py`: 384x16); on a small
trunk a speculative step costs several plain ones and the speedup stays below 1 whatever the
acceptance.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import mtp_jax
from mtp_jax.inference import generate, speculative_generate
from mtp_jax.xla_cpu import reexec_with_tuned_malloc

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from decode import code_prompts, stdlib_files, timed  # noqa: E402

SMOKE = pathlib.Path(__file__).resolve().parents[1] / "configs" / "smoke.py"
OBJECTIVES = ("ce", "distill", "tv")
DEPTH = 3


def make_config(width: int, layers: int, steps: int, lr: float, *overrides: str):
    """configs/smoke.py with an E=`width`, `layers`-layer trunk (MLP 3E, 4 heads of E/4)."""
    return mtp_jax.load_config(
        str(SMOKE),
        [
            f"model.n_layers={layers}",
            f"model.d_model={width}",
            f"model.mlp_dim={3 * width}",
            f"model.head_dim={width // 4}",
            f"train.steps={steps}",
            f"train.warmup_steps={max(steps // 10, 1)}",
            f"train.lr={lr}",
            f"train.log_every={steps}",
            f"train.eval_every={steps}",
            f"checkpoint.every={steps}",
            *overrides,
        ],
    )


def trunk_checksum(params) -> str:
    """sha256 over every parameter outside the MTP depths (trunk, embedding, head, norm)."""
    from mtp_jax.model.model import mtp_param_mask

    h = hashlib.sha256()
    leaves = jax.tree.leaves_with_path(params)
    for (path, x), in_depth in zip(leaves, jax.tree.leaves(mtp_param_mask(params)), strict=True):
        if not in_depth:
            h.update(jax.tree_util.keystr(path).encode())
            h.update(np.asarray(jax.device_get(x)).tobytes())
    return h.hexdigest()[:12]


def simulated_acceptance(config, params, batches: int) -> tuple[float, float]:
    """(greedy, T=1) simulated tokens per verify step on `batches` held-out batches."""
    from mtp_jax.loss import accept_length
    from mtp_jax.train.loop import make_datasets
    from mtp_jax.train.step import loss_and_metrics

    model = mtp_jax.Model(config.model)
    lambdas = jnp.zeros((DEPTH,), jnp.float32)

    @jax.jit
    def stats(params, batch):
        _, (sums, pred, mask) = loss_and_metrics(
            model, params, batch, lambdas, config.loss.chunk_size, objective="tv"
        )
        accepted, count = accept_length(pred, mask)  # 1 + greedy prefix, summed
        return accepted, count, sums.objective, sums.objective_count

    val = make_datasets(config)[1]
    val = next(iter(val.values())) if isinstance(val, dict) else val
    it = iter(val)
    total = None
    for _ in range(batches):
        local = {k: jnp.asarray(v) for k, v in next(it).items() if k != "mixture_counts"}
        out = jax.device_get(stats(params, local))
        total = out if total is None else jax.tree.map(np.add, total, out)
    accepted, count, objective, objective_count = total
    greedy = float(accepted) / max(float(count), 1.0)
    # tv's objective/depth_j = mean(1 - P(drafts 1..j accepted)) at temperature 1
    at_t1 = 1.0 + sum(
        1.0 - objective[j] / max(objective_count[j], 1.0) for j in range(1, DEPTH + 1)
    )
    return greedy, float(at_t1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small trunk, few steps (~3 min)")
    ap.add_argument("--trunk", default="256x6", help="E x layers of the trunk")
    ap.add_argument("--trunk-steps", type=int, default=250)
    ap.add_argument("--steps", type=int, default=120, help="depth training steps per objective")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak LR, trunk and depths")
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    if args.quick:
        args.trunk, args.trunk_steps, args.steps, args.lr = "128x2", 100, 60, 3e-3
        args.eval_batches, args.max_new_tokens, args.prompts, args.repeats = 2, 48, 2, 1
    try:
        width, layers = (int(v) for v in args.trunk.lower().split("x"))
    except ValueError:
        ap.error(f"--trunk {args.trunk!r}: expected WIDTHxLAYERS, e.g. 256x8")

    root = tempfile.TemporaryDirectory()
    trunk_dir = os.path.join(root.name, "trunk")
    t0 = time.perf_counter()
    trunk_config = make_config(width, layers, args.trunk_steps, args.lr, "model.mtp_depth=0")
    result = mtp_jax.train(trunk_config, trunk_dir, progress=False)
    _, trunk_params = mtp_jax.load_checkpoint(trunk_dir)
    trunk_sum = trunk_checksum(trunk_params)
    print(
        f"trunk E={width} x {layers} layers, D=0, {args.trunk_steps} steps at peak LR "
        f"{args.lr:g}: loss {result.metrics['loss']:.3f} ({time.perf_counter() - t0:.0f}s)",
        flush=True,
    )

    prompts = code_prompts(stdlib_files()[::10], args.prompts)
    n, r = args.max_new_tokens, args.repeats
    temperatures = (0.0, 0.7, 1.0)
    trunk_model = mtp_jax.Model(mtp_jax.ModelConfig.from_any(trunk_config.model))
    plain = {}
    for temp in temperatures:
        fn = functools.partial(generate, temperature=temp)
        plain[temp] = timed(fn, trunk_model, trunk_params, prompts, n, r)[1]

    rows = []
    for objective in OBJECTIVES:
        t0 = time.perf_counter()
        config = make_config(
            width,
            layers,
            args.steps,
            args.lr,
            f"model.mtp_depth={DEPTH}",
            "train.trainable=mtp",
            f"loss.mtp_objective={objective}",
            f"init.from_workdir={trunk_dir}",
        )
        result = mtp_jax.train(config, os.path.join(root.name, objective), progress=False)
        params, seconds = result.state.params, time.perf_counter() - t0
        sim = simulated_acceptance(config, params, args.eval_batches)
        model = mtp_jax.Model(mtp_jax.ModelConfig.from_any(config.model))
        measured = []
        for temp in temperatures:
            fn = functools.partial(speculative_generate, temperature=temp)
            _, tps, stats = timed(fn, model, params, prompts, n, r)
            mean = float(np.mean([s["mean_accepted"] for s in stats]))
            measured.append((mean, tps / plain[temp]))
        same = "yes" if trunk_checksum(params) == trunk_sum else "NO"
        ce = "/".join(f"{result.metrics[f'loss/depth_{k}']:.2f}" for k in range(DEPTH + 1))
        rows.append((objective, sim, measured, same, ce))
        print(
            f"{objective}: {args.steps} depth steps in {seconds:.0f}s with compiles (train CE "
            f"per depth {ce}); "
            f"row done in {time.perf_counter() - t0:.0f}s",
            flush=True,
        )

    print(
        f"\nD={DEPTH} depths on a frozen E={width} x {layers} trunk, {args.steps} steps each; "
        f"{len(prompts)} code prompts x {n} new tokens, batch 1, best of {r}; "
        f"{jax.devices()[0].platform}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}\n"
    )
    print(
        "| objective | sim. greedy | sim. T=1 | greedy tok/step | speedup | T=0.7 tok/step "
        "| speedup | T=1.0 tok/step | speedup | trunk unchanged |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for objective, (sim_g, sim_t), measured, same, _ in rows:
        cells = " | ".join(f"{m:.2f} | {s:.2f}x" for m, s in measured)
        print(f"| {objective} | {sim_g:.2f} | {sim_t:.2f} | {cells} | {same} ({trunk_sum}) |")
    root.cleanup()


if __name__ == "__main__":
    reexec_with_tuned_malloc()  # huge-page malloc, as mtp-train runs (mtp_jax/xla_cpu.py)
    main()
