"""Data throughput: `prepare` on the full stdlib corpus, and the Grain pipeline to host arrays.

    python benchmarks/data_throughput.py [--batches 200] [--workers 2]

Prints a markdown table: prepare MB/s of text (byte tokenizer, in-process and with spawned
workers) and pipeline tokens/s (S=1024, D=2, global batch 32, shuffled) in-process and with
`mp_prefetch` workers.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from mtp_jax.config import base_config
from mtp_jax.data import make_dataset, prepare


def bench_prepare(out: str, num_workers: int | None) -> tuple[dict, float]:
    start = time.perf_counter()
    manifest = prepare("stdlib", out, num_workers=num_workers, progress=False)
    return manifest, time.perf_counter() - start


def bench_pipeline(path: str, worker_count: int, batches: int, prefetch: int) -> float:
    """tokens/s of `batches` batches (after 5 warm-up batches)."""
    cfg = base_config().data
    cfg.path, cfg.batch_size, cfg.worker_count, cfg.prefetch = path, 32, worker_count, prefetch
    it = iter(make_dataset(cfg, seq_len=1024, mtp_depth=2, seed=0))
    try:
        for _ in range(5):
            next(it)
        start = time.perf_counter()
        n = 0
        for _ in range(batches):
            n += next(it)["tokens"].size
        return n / (time.perf_counter() - start)
    finally:
        if hasattr(it, "close"):
            it.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "stdlib")
        rows = []
        for num_workers in (None, args.workers):
            manifest, seconds = bench_prepare(path, num_workers)
            mb = manifest["text_bytes"] / 1e6
            tokens = sum(s["tokens"] for s in manifest["splits"].values())
            docs = sum(s["docs"] for s in manifest["splits"].values())
            how = (
                "in-process (default for byte)" if num_workers is None else f"{num_workers} workers"
            )
            rows.append(
                (
                    f"prepare stdlib, byte tokenizer ({docs} files, {mb:.1f} MB), {how}",
                    f"{mb / seconds:.1f} MB/s ({tokens / seconds / 1e6:.1f} M tokens/s, "
                    f"{seconds:.2f} s)",
                )
            )
        for workers, prefetch in ((0, 0), (0, 2), (args.workers, 2)):
            rate = bench_pipeline(path, workers, args.batches, prefetch)
            label = f"pipeline S=1024 D=2 B=32, worker_count={workers}, prefetch={prefetch}"
            rows.append((label, f"{rate / 1e6:.2f} M tokens/s ({rate / 32 / 1027:.0f} batches/s)"))
    print("| benchmark | throughput |")
    print("|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    main()
