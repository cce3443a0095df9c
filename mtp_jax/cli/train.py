"""`mtp-train --config configs/smoke.py --workdir DIR [--config.a.b=v ...] [--compile_only]`.

Also `python -m mtp_jax.cli.train ...`. Ends (unless --no_sample) by printing a short sample
drawn with self-speculative decoding.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from mtp_jax.config import ConfigError, load_config
from mtp_jax.xla_cpu import reexec_with_tuned_malloc

log = logging.getLogger("mtp_jax")


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(
        prog="mtp-train",
        description="Train a multi-token-prediction language model.",
        epilog="Any config key can be overridden: --config.model.mtp_depth=3 "
        "--config.train.steps=1000 (see configs/*.py and mtp_jax/config.py).",
    )
    parser.add_argument("--config", required=True, help="config file, e.g. configs/smoke.py")
    parser.add_argument("--workdir", required=True, help="checkpoints, metrics, TensorBoard")
    parser.add_argument(
        "--compile_only",
        action="store_true",
        help="compile the train step, report per-device memory and stop",
    )
    parser.add_argument(
        "--topology",
        help="with --compile_only: plan for a TPU slice, e.g. v5p:4x4x4 (compiles on this host "
        "with libtpu; needs the [tpu] extra)",
    )
    parser.add_argument(
        "--plan_json", help="with --compile_only: also write the plan (memory, roofline) as JSON"
    )
    parser.add_argument(
        "--no_sample", action="store_true", help="do not print a generated sample at the end"
    )
    parser.add_argument("--log_level", default="INFO")
    hosts = parser.add_argument_group(
        "multi-process runs (auto-detected on Cloud TPU pods, SLURM and Open MPI)"
    )
    hosts.add_argument(
        "--coordinator_address", help="HOST:PORT of process 0 (env MTP_COORDINATOR_ADDRESS)"
    )
    hosts.add_argument("--num_processes", type=int, help="env MTP_NUM_PROCESSES")
    hosts.add_argument("--process_id", type=int, help="env MTP_PROCESS_ID")
    hosts.add_argument(
        "--heartbeat_timeout",
        type=int,
        default=None,
        help="seconds after which a silent peer fails the run (default 100)",
    )
    args, rest = parser.parse_known_args(argv)
    overrides, unknown = [], []
    for item in rest:
        (overrides if item.startswith("--config.") else unknown).append(item)
    if unknown:
        parser.error(
            f"unrecognised arguments: {' '.join(unknown)} "
            "(config overrides look like --config.train.steps=100)"
        )
    return args, overrides


def entry() -> int:
    """The `mtp-train` console script: `main` in a process with tuned malloc (`xla_cpu`)."""
    reexec_with_tuned_malloc("mtp-train")
    return main()


def main(argv: list[str] | None = None, on_step=None) -> int:
    """`mtp-train` in this process; returns the exit status (2: a usage, config or data
    error, a workdir that cannot be written or is in use, a failed write; 3: a non-finite
    loss). `on_step(step)` is passed to `mtp_jax.train.train`."""
    args, overrides = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,  # absl/jax may have configured the root logger already
    )
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for logger in ("absl", "asyncio", "concurrent.futures"):
        logging.getLogger(logger).addFilter(_storage_noise)
    _enable_compilation_cache()
    from mtp_jax import distributed
    from mtp_jax.data import DataError
    from mtp_jax.train import CheckpointError, NonFiniteLossError, train

    if args.topology and not args.compile_only:
        print("mtp-train: error: --topology needs --compile_only", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config, overrides)
        if args.topology:
            return plan_main(config, args.config, args.topology, args.plan_json)
        try:
            distributed.initialize(
                args.coordinator_address,
                args.num_processes,
                args.process_id,
                args.heartbeat_timeout,
            )
        except ValueError as e:  # missing multi-process flags: a usage error
            raise ConfigError(str(e)) from e
        if not args.compile_only and "://" not in args.workdir:
            try:
                os.makedirs(args.workdir, exist_ok=True)
            except OSError as e:
                raise CheckpointError(
                    f"cannot create the workdir {args.workdir} ({e.strerror or e})"
                ) from e
        result = train(config, args.workdir, compile_only=args.compile_only, on_step=on_step)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError) as e:
        print(f"mtp-train: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"mtp-train: {e}", file=sys.stderr)
        return 3
    if result.status == "compiled":
        report = {
            "compile_seconds": round(result.compile_seconds, 2),
            **result.memory,
            **(result.roofline or {}),
        }
        if args.plan_json:
            with open(args.plan_json, "w") as f:
                json.dump(report, f, indent=1)
        print(json.dumps(report))
        return 0
    final = {k: round(v, 4) for k, v in result.metrics.items() if "/" not in k or "depth" in k}
    log.info("%s at step %d: %s", result.status, result.step, final)
    import jax

    if result.status == "completed" and not args.no_sample and jax.process_index() == 0:
        _print_sample(config, result.state.params)
    return 0


_STORAGE_FAILURES = (
    "No space left on device",
    "Read-only file system",
    # what the interrupted writes of a failed save report as the process exits
    "Event loop is closed",
    "cannot schedule new futures after interpreter shutdown",
)


def _storage_noise(record: logging.LogRecord) -> bool:
    """Drops Orbax's background-thread tracebacks of a failed write to a full (or read-only)
    disk: the run stops with one `StorageError` naming the path and the intact checkpoint."""
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
        error, seen = record.exc_info[1], set()
        while error is not None and id(error) not in seen:
            seen.add(id(error))
            text += " " + str(error)
            error = error.__cause__ or error.__context__
    return not any(f in text for f in _STORAGE_FAILURES)


def _enable_compilation_cache() -> None:
    """Persistent XLA compilation cache (restarts after preemption skip recompiling).

    JAX_COMPILATION_CACHE_DIR wins; else $MTP_JAX_CACHE (default ~/.cache/mtp_jax)/jax_cache.
    """
    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir:
        return
    root = os.environ.get(
        "MTP_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mtp_jax")
    )
    jax.config.update("jax_compilation_cache_dir", os.path.join(root, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


SAMPLE_PROMPT = "    def __init__(self"


def _print_sample(config, params, seed: int = 0) -> None:
    """A short sample (T=0.7, top-k 40) drawn with self-speculative rejection sampling, and
    how many of the MTP depths' drafts the trunk accepted."""
    import jax
    import numpy as np

    from mtp_jax.data import get_tokenizer
    from mtp_jax.inference import generate, speculative_generate
    from mtp_jax.model import Model

    tokenizer = get_tokenizer(config.data.tokenizer)
    ids = np.asarray([tokenizer.encode(SAMPLE_PROMPT)], np.int32)
    fn = speculative_generate if config.model.mtp_depth else generate
    out = fn(
        Model(config.model),
        jax.device_get(params),
        ids,
        np.asarray([ids.shape[1]], np.int32),
        max_new_tokens=120,
        temperature=0.7,
        top_k=40,
        eos_id=tokenizer.eos_id,
        rng=jax.random.key(seed),
    )
    how = "self-speculative" if config.model.mtp_depth else "plain"
    print(f"----- sample (temperature 0.7, top-k 40, {how} decoding) -----")
    print(SAMPLE_PROMPT + tokenizer.decode(out.as_lists()[0]))
    if "acceptance" in out.stats:
        acc = ", ".join(f"{a:.2f}" for a in out.stats["acceptance"])
        print(
            f"----- drafts accepted per MTP depth: [{acc}]; "
            f"tokens per trunk step: {out.stats['mean_accepted']:.2f}"
        )


def plan_main(config, config_path: str, topology: str, plan_json: str | None = None) -> int:
    """`mtp-train --compile_only --topology NAME [--plan_json F]`: prints the plan (and writes
    it as JSON); 0 fits, 1 not, 2 error. `mtp-plan` is the same with a layout search."""
    from mtp_jax.train.plan import plan, plan_verdict

    try:
        report = plan(config, topology)
    except ConfigError as e:
        print(f"mtp-train: error: {e}", file=sys.stderr)
        return 2
    print(report.to_text())
    print("\n" + plan_verdict(config, config_path, report))
    if plan_json:
        with open(plan_json, "w") as f:
            json.dump(report.to_dict(), f, indent=1)
    return 0 if report.fits else 1


if __name__ == "__main__":
    sys.exit(entry())
