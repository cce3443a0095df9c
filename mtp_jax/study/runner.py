"""Runs the grid: every (run, seed) trains on the same data and token budget, then is measured.

A run lives in OUT/runs/<name>/seed<k>/: an ordinary mtp-train workdir plus `result.json`,
written last. A run with a result is never re-run; one without resumes from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from mtp_jax.config import ConfigDict, load_config
from mtp_jax.study.grid import Run

log = logging.getLogger(__name__)

SMOKE = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "smoke.py")
EVALS_PER_RUN = 8  # eval points per run: the baseline's loss curve for the fit
PROMPTS, PROMPT_TOKENS, NEW_TOKENS = 8, 32, 64  # held-out decoding prompts


@dataclasses.dataclass(frozen=True)
class StudySpec:
    """What every run shares: steps, seeds, base config and overrides (corpus included)."""

    steps: int = 800
    seeds: int = 2
    base_config: str = SMOKE
    overrides: tuple[str, ...] = ()
    eval_steps: int = 8


def run_config(spec: StudySpec, run: Run, seed: int) -> ConfigDict:
    every = max(1, spec.steps // EVALS_PER_RUN)
    overrides = [
        f"seed={seed}",
        f"train.steps={spec.steps}",
        f"train.eval_every={every}",
        f"train.eval_steps={spec.eval_steps}",
        f"train.log_every={min(every, 25)}",
        f"checkpoint.every={every}",
        "checkpoint.keep=1",
        *spec.overrides,
        *run.overrides,
    ]
    return load_config(spec.base_config, overrides)


def run_dir(out: str, run: Run, seed: int) -> str:
    return os.path.join(out, "runs", run.name, f"seed{seed}")


def _read(path: str) -> dict[str, Any] | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def run_study(out: str, runs: Sequence[Run], spec: StudySpec) -> list[dict[str, Any]]:
    """Trains and measures every (run, seed) not finished yet; returns all results."""
    os.makedirs(out, exist_ok=True)
    jobs = [(run, seed) for seed in range(spec.seeds) for run in runs]
    results = []
    bar = tqdm(jobs, desc="study", unit="run", dynamic_ncols=True)
    for run, seed in bar:
        workdir = run_dir(out, run, seed)
        bar.set_postfix(run=f"{run.name}/seed{seed}")
        done = _read(os.path.join(workdir, "result.json"))
        if done is None:
            done = measure_run(run, seed, workdir, spec)
            tmp = os.path.join(workdir, "result.json.tmp")
            with open(tmp, "w") as f:
                json.dump(done, f, indent=1)
            os.replace(tmp, os.path.join(workdir, "result.json"))
        else:
            log.info("%s seed %d: finished before, not re-run", run.name, seed)
        results.append(done)
    return results


def measure_run(run: Run, seed: int, workdir: str, spec: StudySpec) -> dict[str, Any]:
    """Trains one run (resuming if it was interrupted) and measures it."""
    from mtp_jax.train import train
    from mtp_jax.train.metrics import read_metrics

    config = run_config(spec, run, seed)
    log.info("%s seed %d: training %d steps in %s", run.name, seed, spec.steps, workdir)
    start = time.perf_counter()
    result = train(config, workdir, progress=False)
    wall = time.perf_counter() - start
    records = read_metrics(workdir)
    tokens_per_step = config.data.batch_size * config.data.seq_len
    evals = [r for r in records if "eval/loss/depth_0" in r]
    speeds = [r["tokens_per_sec"] for r in records if "tokens_per_sec" in r][1:]  # not compile
    last = evals[-1]
    depth = config.model.mtp_depth
    out: dict[str, Any] = {
        "name": run.name,
        "overrides": list(run.overrides),
        "seed": seed,
        "steps": spec.steps,
        "tokens": spec.steps * tokens_per_step,
        "mtp_depth": depth,
        "layout": config.model.mtp_layout,
        "val_loss": last["eval/loss/depth_0"],
        "val_bpb": (
            last["eval/loss/depth_0"] / math.log(2) if config.data.tokenizer == "byte" else None
        ),
        "curve": [[r["step"] * tokens_per_step, r["eval/loss/depth_0"]] for r in evals],
        "accuracy": [last.get(f"eval/accuracy/depth_{k}") for k in range(depth + 1)],
        "agreement": [last.get(f"eval/agreement/depth_{k}") for k in range(1, depth + 1)],
        "accept_len": last.get("eval/accept_len"),
        "tokens_per_sec": float(np.median(speeds)) if speeds else None,
        "train_seconds": wall,
    }
    if depth and result.state is not None:
        out.update(speculative_speedup(config, result.state.params))
    return out


def held_out_prompts(config: ConfigDict) -> np.ndarray:
    """int32 [PROMPTS, PROMPT_TOKENS]: the starts of the first validation windows."""
    from mtp_jax.data import ensure_store, make_dataset

    d = ConfigDict(config.data.to_dict())
    d.path = ensure_store(d, vocab_size=config.model.vocab_size)
    d.batch_size, d.prefetch = PROMPTS, 0
    ds = make_dataset(
        d,
        seq_len=max(config.data.seq_len, PROMPT_TOKENS),
        mtp_depth=0,
        split="val",
        shuffle=False,
        process_index=0,
        process_count=1,
    )
    return np.asarray(next(iter(ds))["tokens"][:, :PROMPT_TOKENS], np.int32)


def speculative_speedup(config: ConfigDict, params: Any) -> dict[str, Any]:
    """Greedy self-speculative vs plain decoding of the held-out prompts: wall-time speedup
    (second call of each, after compiling) and tokens per trunk step."""
    from mtp_jax.inference import generate, speculative_generate
    from mtp_jax.model import Model

    model = Model(config.model)
    params = jax.device_get(params)
    prompts = held_out_prompts(config)
    lengths = np.full((len(prompts),), prompts.shape[1], np.int32)
    timings, outputs = {}, {}
    for name, fn in (("plain", generate), ("speculative", speculative_generate)):
        for _ in range(2):  # the first call compiles
            start = time.perf_counter()
            res = fn(model, params, prompts, lengths, max_new_tokens=NEW_TOKENS)
            jax.block_until_ready(res.tokens)
            timings[name] = time.perf_counter() - start
        outputs[name] = res
    same = np.array_equal(
        np.asarray(outputs["plain"].tokens), np.asarray(outputs["speculative"].tokens)
    )
    return {
        "decode_speedup": timings["plain"] / timings["speculative"],
        "tokens_per_step": float(outputs["speculative"].stats["mean_accepted"]),
        "greedy_tokens_identical": bool(same),
    }
