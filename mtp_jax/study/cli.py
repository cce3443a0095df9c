"""`mtp-study --out DIR [--grid FILE] [--seeds N] [--steps N] [--corpus PATH]
[--config.KEY=VALUE ...]` (also `python -m mtp_jax.study`): does MTP pay on your data?

Trains every run of the grid (default: D=0; sequential D=1, 2, 4; parallel n=2, 4; shared-weight
D=4; a λ curriculum) on the same data and token budget with N seeds, measures each, and writes
DIR/results.md, DIR/results.json and PNG plots. Resumable: a finished run is not re-run.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time

PROG = "mtp-study"


def parse_args(argv):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the study's directory (runs and results)")
    p.add_argument("--grid", help="a JSON or Python grid file (default: the built-in grid)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per run (default 2)")
    p.add_argument("--steps", type=int, default=800, help="train steps per run (default 800)")
    p.add_argument("--corpus", help="data.corpus for every run (default: the stdlib corpus)")
    p.add_argument("--log_level", default="WARNING")
    args, rest = p.parse_known_args(argv)
    bad = [r for r in rest if not r.startswith("--config.")]
    if bad:
        p.error(f"unrecognised arguments: {' '.join(bad)} (overrides: --config.KEY=VALUE)")
    if args.seeds < 1 or args.steps < 8:
        p.error("--seeds must be >= 1 and --steps >= 8 (8 evaluations per run)")
    args.overrides = [r[len("--config.") :] for r in rest]
    if args.corpus:
        args.overrides.insert(0, f"data.corpus={args.corpus}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    from mtp_jax.config import ConfigError
    from mtp_jax.data import DataError
    from mtp_jax.study.grid import GridError, load_grid
    from mtp_jax.study.report import write
    from mtp_jax.study.runner import StudySpec, run_config, run_study

    start = time.time()
    try:
        runs = load_grid(args.grid)
        spec = StudySpec(steps=args.steps, seeds=args.seeds, overrides=tuple(args.overrides))
        for run in runs:  # every config is checked before the first run trains
            try:
                run_config(spec, run, 0)
            except ConfigError as e:
                raise ConfigError(f"run {run.name!r}: {e}") from e
        results = run_study(args.out, runs, spec)
    except (ConfigError, DataError, GridError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    header = (
        f"# Does MTP pay? {len(runs)} runs x {args.seeds} seeds, {args.steps} steps each\n\n"
        f"`mtp-study --out {args.out} --seeds {args.seeds} --steps {args.steps}"
        + "".join(f" --config.{o}" for o in args.overrides)
        + f"`; {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"this invocation {time.time() - start:.0f} s (runs finished before are not re-run)."
    )
    done = write(args.out, results, header)
    print(open(os.path.join(args.out, "results.md")).read())
    for path in done["plots"]:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
