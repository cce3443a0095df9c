"""`mtp-plan`: compile the real train step for a TPU slice on this host and print what it needs.

    mtp-plan --config configs/tpu_7b.py --topology v5p:4x4x4 [--plan_json plan.json]
    mtp-plan --config configs/tpu_7b.py --topology v5p:4x4x4 --search

The plan gives per-chip memory against HBM, FLOPs and bytes accessed per step, the chip's
peak and bandwidth, and the roofline: a lower bound on the step time and an upper bound on
MFU. `--search` compiles a small set of layouts (fsdp/tensor splits of the slice x remat
policies x microbatches) and ranks those that fit by that bound: a bound, not a promise.
Needs libtpu (`pip install 'mtp_jax[tpu]'`), used as a compiler only. Exit status: 0 fits
(with --search: at least one candidate fits), 1 does not, 2 a usage or config error.
"""

from __future__ import annotations

import argparse
import json
import sys

from mtp_jax.config import ConfigError, load_config


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(prog="mtp-plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="config file, e.g. configs/tpu_7b.py")
    p.add_argument("--topology", required=True, help="TPU slice, e.g. v5p:4x4x4 or v5e:4x4")
    p.add_argument("--plan_json", help="also write the plan (or the ranked search) as JSON")
    p.add_argument("--search", action="store_true", help="rank a few layouts by the roofline")
    p.add_argument("--max_candidates", type=int, default=12, help="layouts tried by --search")
    args, rest = p.parse_known_args(argv)
    bad = [r for r in rest if not r.startswith("--config.")]
    if bad:
        p.error(f"unrecognised arguments: {' '.join(bad)} (overrides: --config.KEY=VALUE)")
    return args, rest


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    from mtp_jax.train.plan import plan, plan_verdict, search, search_table

    try:
        config = load_config(args.config, overrides)
        if not args.search:
            report = plan(config, args.topology)
            print(report.to_text())
            print("\n" + plan_verdict(config, args.config, report))
            _write_json(args.plan_json, report.to_dict())
            return 0 if report.fits else 1
        found = search(
            config,
            args.topology,
            args.max_candidates,
            progress=lambda c: print(
                f"mtp-plan: planned {c.overrides}: "
                + ("error" if c.report is None else "fits" if c.report.fits else "does not fit"),
                file=sys.stderr,
                flush=True,
            ),
        )
    except ConfigError as e:
        print(f"mtp-plan: error: {e}", file=sys.stderr)
        return 2
    print(search_table(found))
    print(
        "\nRanked by the roofline bound (compiled FLOPs and bytes, or model FLOPs where the "
        "compiler counts fewer): a lower bound on the step time, not a promise."
    )
    _write_json(
        args.plan_json,
        [
            {"overrides": c.overrides, "error": c.error, **(c.report.to_dict() if c.report else {})}
            for c in found
        ],
    )
    return 0 if any(c.report is not None and c.report.fits for c in found) else 1


def _write_json(path: str | None, value) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(value, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
