"""Corpus -> token store (`mtp-prepare`), the default cache path, and `ensure_store`.

```
mtp-prepare --corpus stdlib --out ~/stores/stdlib-byte          # or python -m mtp_jax.cli.prepare
mtp-prepare --corpus 'docs/**/*.md' --tokenizer tok.model --out gs://bucket/stores/docs
```
Documents are tokenized in worker processes (spawned, so a parent that already runs JAX is
safe) and written to tensorstore arrays (see `store.py` for the layout). A local store is
written into a temporary sibling directory and renamed into place after `manifest.json` is
written last; on GCS (no renames) the manifest is still written last, so a store without one is
incomplete and never used.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import multiprocessing
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from typing import Any

import ml_collections
from tqdm.auto import tqdm

from mtp_jax.data import corpus as corpus_lib
from mtp_jax.data import store as store_lib
from mtp_jax.data.errors import DataError
from mtp_jax.data.tokenizer import get_tokenizer, tokenizer_fingerprint

log = logging.getLogger(__name__)

_FILES_PER_TASK = 16
_LINES_PER_TASK = 256
_MIN_DOCS_FOR_WORKERS = 64  # fewer documents are tokenized in-process (no spawn start-up)


def _chunks(it: Iterator, size: int) -> Iterator[list]:
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _tokenized(
    corpus: corpus_lib.Corpus,
    n_docs: int,
    tokenizer: str,
    text_field: str,
    dtype: str,
    num_workers: int,
    skip_bad: bool = False,
) -> Iterator[tuple[int, Any, int]]:
    """(index, tokens [n + 1] or None (a skipped bad row), text bytes) per document, in
    document order."""
    size = _LINES_PER_TASK if corpus.jsonl or corpus.table else _FILES_PER_TASK
    chunks = _chunks(corpus_lib.iter_tasks(corpus), size)
    init_args = (tokenizer, text_field, dtype, skip_bad)
    if num_workers <= 1 or n_docs < _MIN_DOCS_FOR_WORKERS:
        corpus_lib.init_worker(*init_args)
        for chunk in chunks:
            yield from corpus_lib.tokenize_tasks(chunk)
        return
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(num_workers, initializer=corpus_lib.init_worker, initargs=init_args) as pool:
        for result in pool.imap(corpus_lib.tokenize_tasks, chunks, chunksize=1):
            yield from result


def prepare(
    corpus: str,
    out_dir: str,
    tokenizer: str = "byte",
    val_fraction: float = 0.02,
    text_field: str = "text",
    num_workers: int | None = None,
    seed: int = 0,
    progress: bool = True,
    skip_bad: bool = False,
) -> dict[str, Any]:
    """Tokenizes `corpus` into a token store at `out_dir` (local or gs://) and returns its manifest.

    Each document becomes its tokens followed by EOS; documents are split train/val by a seeded
    hash of their key (`val_fraction` of them to val, at least one when there are >= 2). An
    existing store at `out_dir` is replaced only once the new one is complete.

    Args:
      corpus: 'stdlib', a directory, a glob of text files, or a .jsonl path/glob.
      out_dir: the store path, local or gs://bucket/path.
      tokenizer: 'byte', a SentencePiece .model or a tokenizer.json (see `get_tokenizer`).
      val_fraction: fraction of documents held out as the 'val' split.
      text_field: the JSONL field / Parquet or Arrow column holding a document's text.
      num_workers: tokenizer processes; default 1 for 'byte' (I/O bound), else all cores.
      seed: seed of the train/val split.
      progress: show a tqdm progress bar (documents, and MB of text).
      skip_bad: count and skip bad table files and rows (recorded in the manifest's
        'skipped') instead of failing.
    Raises:
      DataError for an empty corpus, an unreadable file, a bad JSONL line or table row, or a
      bad tokenizer. Nothing is written to `out_dir` then.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction} must be in [0, 1)")
    tok = get_tokenizer(tokenizer)
    found = corpus_lib.find_corpus(corpus, text_field=text_field, skip_bad=skip_bad)
    keys = corpus_lib.document_keys(found)
    if not keys:
        raise DataError(f"corpus {corpus!r} is empty: its JSONL files hold no documents")
    is_val = corpus_lib.assign_val(keys, val_fraction, seed)
    dtype = store_lib.storage_dtype(tok.vocab_size)
    if num_workers is None:  # bytes are I/O bound: worker start-up would cost more than it saves
        num_workers = 1 if tokenizer == "byte" else (os.cpu_count() or 1)
    log.info("preparing %d documents of %s into %s", len(keys), found.description, out_dir)

    local = not store_lib.is_gcs(out_dir)
    out_dir = os.path.abspath(os.path.expanduser(out_dir)) if local else out_dir.rstrip("/")
    work = f"{out_dir}.tmp-{uuid.uuid4().hex[:8]}" if local else out_dir
    if not local and store_lib.read_manifest(out_dir) is not None:
        store_lib.delete_manifest(out_dir)  # the old store is incomplete from here on
    try:
        writers = {s: store_lib.SplitWriter(work, s, dtype) for s in store_lib.SPLITS}
        text_bytes, skipped_rows = 0, 0
        bar = tqdm(total=len(keys), unit="doc", desc="mtp-prepare", disable=not progress)
        with bar:
            for index, tokens, n_bytes in _tokenized(
                found, len(keys), tokenizer, text_field, dtype, num_workers, skip_bad
            ):
                bar.update(1)
                if tokens is None:
                    skipped_rows += 1
                    continue
                writers["val" if is_val[index] else "train"].add(tokens)
                text_bytes += n_bytes
                bar.set_postfix(MB=f"{text_bytes / 1e6:.1f}", refresh=False)
        splits = {s: w.close() for s, w in writers.items()}
        manifest = {
            "format": store_lib.FORMAT,
            "format_version": store_lib.FORMAT_VERSION,
            "tokenizer": tok.name,
            "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "dtype": dtype,
            "source": found.description,
            "corpus": corpus,
            "val_fraction": val_fraction,
            "seed": seed,
            "text_bytes": text_bytes,
            "splits": splits,
        }
        if skip_bad:
            manifest["skipped"] = {"files": list(found.skipped_files), "rows": skipped_rows}
            if found.skipped_files or skipped_rows:
                log.warning(
                    "skipped %d bad files and %d bad rows", len(found.skipped_files), skipped_rows
                )
        store_lib.write_manifest(work, manifest)  # last: this makes the store complete
        if local:
            _publish(work, out_dir)
    finally:
        if local and os.path.exists(work):
            shutil.rmtree(work, ignore_errors=True)
    log.info("token store %s: %s", out_dir, splits)
    return manifest


def _publish(work: str, out_dir: str) -> None:
    """Renames the finished `work` directory to `out_dir`, replacing an old store there."""
    old = None
    if os.path.lexists(out_dir):
        old = f"{out_dir}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out_dir, old)
    try:
        os.replace(work, out_dir)
    except OSError:
        # Another process published the same store meanwhile: keep the complete one.
        if store_lib.read_manifest(out_dir) is None:
            raise
    if old:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------ cache


def cache_dir() -> str:
    """`$MTP_JAX_CACHE`, default `~/.cache/mtp_jax`."""
    return os.path.expanduser(os.environ.get("MTP_JAX_CACHE") or "~/.cache/mtp_jax")


def _slug_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_.") or "x"


def default_store_path(corpus: str, tokenizer: str, val_fraction: float = 0.02) -> str:
    """The cache path of a corpus/tokenizer pair: `<cache>/stores/<corpus>-<tokenizer>-<hash>`.

    For 'stdlib' the name carries the Python version; the hash covers the absolute corpus and
    tokenizer paths, the store format and `val_fraction`.
    """
    if corpus == "stdlib":
        name = f"stdlib-py{corpus_lib.python_version()}"
        ident = f"stdlib:{corpus_lib.python_version()}:{corpus_lib.stdlib_dir()}"
    else:
        base = os.path.basename(corpus.rstrip("/").replace("*", "")) or "corpus"
        name = os.path.splitext(base)[0]
        ident = os.path.abspath(os.path.expanduser(corpus))
    tok = "byte" if tokenizer == "byte" else os.path.splitext(os.path.basename(tokenizer))[0]
    tok_ident = tokenizer if tokenizer == "byte" else os.path.abspath(tokenizer)
    digest = hashlib.sha256(
        f"{ident}|{tok_ident}|{store_lib.FORMAT_VERSION}|{val_fraction!r}".encode()
    ).hexdigest()[:10]
    return os.path.join(cache_dir(), "stores", f"{_slug_part(name)}-{_slug_part(tok)}-{digest}")


def store_path(data_cfg: ml_collections.ConfigDict) -> str:
    """`data_cfg.path`, or the default cache path of its corpus and tokenizer."""
    return data_cfg.path or default_store_path(
        data_cfg.corpus, data_cfg.tokenizer, data_cfg.val_fraction
    )


def check_manifest(
    path: str, manifest: dict[str, Any], tokenizer: str, vocab_size: int | None
) -> None:
    """DataError unless the store was made with `tokenizer` and fits a `vocab_size` model."""
    same_name = manifest["tokenizer"] == tokenizer
    fingerprint = tokenizer_fingerprint(tokenizer)
    same_file = bool(fingerprint) and fingerprint == manifest.get("tokenizer_sha256")
    if not (same_name or same_file):
        raise DataError(
            f"token store {path!r} was made with tokenizer {manifest['tokenizer']!r}, but "
            f"data.tokenizer is {tokenizer!r}: set data.tokenizer to match, or point data.path "
            "at (or prepare) a store made with this tokenizer"
        )
    if vocab_size is not None and manifest["vocab_size"] > vocab_size:
        raise DataError(
            f"token store {path!r} holds ids of a {manifest['vocab_size']}-token vocabulary "
            f"({manifest['tokenizer']!r}), more than model.vocab_size={vocab_size}: raise "
            f"model.vocab_size to at least {manifest['vocab_size']}"
        )


def ensure_store(data_cfg: ml_collections.ConfigDict, vocab_size: int | None = None) -> str:
    """The path of a complete, matching store for `data_cfg`, preparing it when missing.

    Missing -> `prepare` (logged, with a progress bar). Incomplete, made with another
    tokenizer, or with a vocabulary larger than `vocab_size` -> DataError. With
    `data.source='synthetic'` there is no store and '' is returned. In a multi-host run with a
    shared (gs://) path, call it on process 0 first and barrier, then on the others.
    """
    if data_cfg.source == "synthetic":
        return ""
    path = store_path(data_cfg)
    if store_lib.read_manifest(path) is None and not store_lib.store_exists(path):
        log.info("token store %s is missing: preparing corpus %r", path, data_cfg.corpus)
        prepare(
            data_cfg.corpus,
            path,
            tokenizer=data_cfg.tokenizer,
            val_fraction=data_cfg.val_fraction,
            text_field=data_cfg.text_field,
        )
    manifest = store_lib.load_manifest(path)
    check_manifest(path, manifest, data_cfg.tokenizer, vocab_size)
    if data_cfg.path and manifest.get("val_fraction") != data_cfg.val_fraction:
        log.warning(
            "token store %s was split with val_fraction=%s, data.val_fraction is %s: using "
            "the store's split",
            path,
            manifest.get("val_fraction"),
            data_cfg.val_fraction,
        )
    for split in store_lib.SPLITS:
        store_lib.open_split(path, split)  # counts agree with the arrays
    return path
