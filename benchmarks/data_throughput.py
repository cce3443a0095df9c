"""Data throughput: `prepare` on the full stdlib corpus, and the Grain pipeline to host arrays.

    python benchmarks/data_throughput.py [--batches 200] [--workers 2]

Prints a markdown table: prepare MB/s of text (byte tokenizer, in-process and with spawned
workers; the same text from a directory of files and from one Parquet file of row groups),
pipeline tokens/s (S=1024, D=2, global batch 32, shuffled) in-process and with `mp_prefetch`
workers, and the same pipeline over a 3-store `data.mixture` (weights 0.5/0.3/0.2).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from mtp_jax.config import base_config
from mtp_jax.data import make_dataset, prepare


def bench_prepare(out: str, num_workers: int | None) -> tuple[dict, float]:
    return bench_prepare_corpus("stdlib", out, num_workers)


def bench_prepare_corpus(corpus: str, out: str, num_workers: int | None) -> tuple[dict, float]:
    start = time.perf_counter()
    manifest = prepare(corpus, out, num_workers=num_workers, progress=False)
    return manifest, time.perf_counter() - start


def write_parquet(out: str) -> str:
    """The stdlib corpus as one Parquet file (a `text` column, row groups of 256 documents)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mtp_jax.data.corpus import find_corpus

    corpus = find_corpus("stdlib")
    texts = [open(f, encoding="utf-8", errors="replace").read() for f in corpus.files]
    path = os.path.join(out, "stdlib.parquet")
    pq.write_table(pa.table({"text": texts}), path, row_group_size=256)
    return path


def bench_pipeline(
    path: str, worker_count: int, batches: int, prefetch: int, mixture: tuple = ()
) -> float:
    """tokens/s of `batches` batches (after 5 warm-up batches)."""
    cfg = base_config().data
    cfg.path, cfg.batch_size, cfg.worker_count, cfg.prefetch = path, 32, worker_count, prefetch
    cfg.mixture = mixture
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
        parquet = write_parquet(tmp)
        manifest, seconds = bench_prepare_corpus(parquet, os.path.join(tmp, "pq"), None)
        mb = manifest["text_bytes"] / 1e6
        rows.append(
            (
                f"prepare the same text from one Parquet file ({mb:.1f} MB, row groups of 256), "
                "in-process",
                f"{mb / seconds:.1f} MB/s ({seconds:.2f} s)",
            )
        )
        for workers, prefetch in ((0, 0), (0, 2), (args.workers, 2)):
            rate = bench_pipeline(path, workers, args.batches, prefetch)
            label = f"pipeline S=1024 D=2 B=32, worker_count={workers}, prefetch={prefetch}"
            rows.append((label, f"{rate / 1e6:.2f} M tokens/s ({rate / 32 / 1027:.0f} batches/s)"))
        stores = [path]
        for name in ("copy_b", "copy_c"):  # the same tokens under other paths: 3 sources
            stores.append(os.path.join(tmp, name))
            shutil.copytree(path, stores[-1])
        mixture = tuple(zip(stores, (0.5, 0.3, 0.2), strict=True))
        for workers, prefetch in ((0, 2), (args.workers, 2)):
            rate = bench_pipeline("", workers, args.batches, prefetch, mixture)
            label = (
                f"3-store mixture 0.5/0.3/0.2, S=1024 D=2 B=32, worker_count={workers}, "
                f"prefetch={prefetch}"
            )
            rows.append((label, f"{rate / 1e6:.2f} M tokens/s ({rate / 32 / 1027:.0f} batches/s)"))
    print("| benchmark | throughput |")
    print("|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    main()
