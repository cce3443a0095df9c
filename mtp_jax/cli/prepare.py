"""`mtp-prepare --corpus PATH --out STORE [--tokenizer ...]`: a corpus -> a token store."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from mtp_jax.data import DataError, default_store_path, prepare


def main(argv: Sequence[str] | None = None) -> int:
    """`mtp-prepare`: tokenize a corpus into a token store; prints the manifest."""
    parser = argparse.ArgumentParser(prog="mtp-prepare", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--corpus",
        default="stdlib",
        help="'stdlib', a dir, a glob, .jsonl, or Parquet / Arrow files (local or gs://)",
    )
    parser.add_argument("--out", default="", help="store path or gs:// URL (default: cache)")
    parser.add_argument("--tokenizer", default="byte", help="'byte', a .model or tokenizer.json")
    parser.add_argument("--val_fraction", type=float, default=0.02)
    parser.add_argument(
        "--text_field",
        "--text-field",
        dest="text_field",
        default="text",
        help="JSONL field / Parquet or Arrow column with the text",
    )
    parser.add_argument(
        "--skip-bad",
        "--skip_bad",
        dest="skip_bad",
        action="store_true",
        help="count and skip bad table files and rows (unreadable, no text column, null or "
        "non-UTF-8 text) instead of failing",
    )
    parser.add_argument(
        "--num_workers", type=int, default=None, help="default: 1 for 'byte', else all cores"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = args.out or default_store_path(args.corpus, args.tokenizer, args.val_fraction)
    try:
        manifest = prepare(
            args.corpus,
            out,
            tokenizer=args.tokenizer,
            val_fraction=args.val_fraction,
            text_field=args.text_field,
            num_workers=args.num_workers,
            seed=args.seed,
            progress=not args.quiet,
            skip_bad=args.skip_bad,
        )
    except DataError as e:
        print(f"mtp-prepare: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    for split, counts in manifest["splits"].items():
        print(f"  {split}: {counts['tokens']:,} tokens in {counts['docs']:,} documents")
    if "skipped" in manifest:
        skipped = manifest["skipped"]
        print(f"  skipped: {len(skipped['files'])} bad files, {skipped['rows']} bad rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
