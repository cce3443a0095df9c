"""`mtp-tokenizer train`: a byte-level BPE tokenizer trained on your corpus.

    mtp-tokenizer train --corpus 'data/*.jsonl' --text-field text --vocab-size 32000 \
        --out tokenizer.json

Special tokens at fixed ids: <pad> 0, <s> 1, </s> 2 (see `mtp_jax.data.train_tokenizer`).
Use the result with `mtp-prepare --tokenizer tokenizer.json` or `data.tokenizer=...`, and a
`model.vocab_size` of at least its vocabulary.
"""

from __future__ import annotations

import argparse
import json
import sys

from mtp_jax.data import DataError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mtp-tokenizer", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a byte-level BPE on a corpus")
    t.add_argument("--corpus", required=True, help="'stdlib', a dir, a glob or .jsonl")
    t.add_argument("--text-field", "--text_field", dest="text_field", default="text")
    t.add_argument("--vocab-size", "--vocab_size", dest="vocab_size", type=int, required=True)
    t.add_argument("--out", required=True, help="where to write tokenizer.json")
    t.add_argument("--min-frequency", dest="min_frequency", type=int, default=2)
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    from mtp_jax.data.train_tokenizer import train_tokenizer

    try:
        result = train_tokenizer(
            args.corpus,
            args.out,
            args.vocab_size,
            text_field=args.text_field,
            min_frequency=args.min_frequency,
            progress=not args.quiet,
        )
    except DataError as e:
        print(f"mtp-tokenizer: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
