"""The token store: per split a flat token array and document offsets, plus a manifest.

Layout under a store root (a local directory or a `gs://bucket/path` URL, both through
tensorstore kvstores):
```
manifest.json          written last; without it (or with counts that disagree) the store is
                       incomplete and never used
train/tokens           zarr, uint16 (vocab <= 65536) or uint32, shape [N]: every document's
                       tokens followed by EOS, documents back to back
train/offsets          zarr, int64, shape [n_docs + 1]: document d is tokens[off[d]:off[d+1]]
val/tokens, val/offsets
```
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorstore as ts

from mtp_jax.data.errors import DataError

FORMAT = "mtp_jax.token_store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
CHUNK_TOKENS = 1 << 16  # zarr chunk of the token arrays: small enough for cheap random reads
_CACHE_BYTES = 64 << 20  # decoded-chunk cache per opened array


def is_gcs(path: str) -> bool:
    return path.startswith("gs://")


def kvstore_spec(path: str) -> dict[str, Any]:
    """The tensorstore kvstore spec of a local path or a `gs://bucket/path` URL."""
    if is_gcs(path):
        bucket, _, rest = path[len("gs://") :].partition("/")
        if not bucket:
            raise DataError(f"bad GCS URL {path!r}: expected gs://bucket/path")
        return {"driver": "gcs", "bucket": bucket, "path": rest.rstrip("/") + "/"}
    return {"driver": "file", "path": os.path.abspath(os.path.expanduser(path)) + "/"}


def join(path: str, *parts: str) -> str:
    return "/".join([path.rstrip("/"), *parts])


def storage_dtype(vocab_size: int) -> str:
    """uint16 when every id fits (vocab <= 65536), else uint32."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def _array_spec(path: str, split: str, name: str) -> dict[str, Any]:
    return {
        "driver": "zarr",
        "kvstore": kvstore_spec(join(path, split, name)),
        "context": {"cache_pool": {"total_bytes_limit": _CACHE_BYTES}},
        "recheck_cached_data": "open",
    }


# ------------------------------------------------------------------------------ manifest


def read_manifest(path: str) -> dict[str, Any] | None:
    """The parsed manifest of the store at `path`, or None when there is none."""
    kvs = ts.KvStore.open(kvstore_spec(path)).result()
    result = kvs.read(MANIFEST).result()
    if result.state != "value":
        return None
    try:
        return json.loads(result.value.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(
            f"store {path!r}: {MANIFEST} is corrupt ({e}); delete the store and "
            "prepare it again (mtp-prepare)"
        ) from e


def write_manifest(path: str, manifest: dict[str, Any]) -> None:
    kvs = ts.KvStore.open(kvstore_spec(path)).result()
    kvs.write(MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8")).result()


def delete_manifest(path: str) -> None:
    kvs = ts.KvStore.open(kvstore_spec(path)).result()
    kvs.delete_range(ts.KvStore.KeyRange(MANIFEST, MANIFEST + "\0")).result()


def store_exists(path: str) -> bool:
    """Whether anything at all is stored under `path` (complete or not)."""
    if not is_gcs(path):
        p = os.path.expanduser(path)
        return os.path.isdir(p) and bool(os.listdir(p))
    kvs = ts.KvStore.open(kvstore_spec(path)).result()
    return any(kvs.read(k).result().state == "value" for k in (MANIFEST, "train/tokens/.zarray"))


# ------------------------------------------------------------------------------ reading


@dataclass
class StoreSplit:
    """One split of an opened, validated store.

    tokens: tensorstore array [N] (uint16/uint32), read by slices.
    offsets: np.int64 [n_docs + 1], in memory (8 bytes per document).
    """

    path: str
    split: str
    tokens: ts.TensorStore
    offsets: np.ndarray
    manifest: dict[str, Any]

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_docs(self) -> int:
        return len(self.offsets) - 1


def _incomplete(path: str, why: str) -> DataError:
    return DataError(
        f"token store {path!r} is incomplete ({why}); it was probably interrupted while being "
        "written: delete it and prepare it again (mtp-prepare --corpus ... --out "
        f"{path}, or leave data.path empty to use the cache)"
    )


def load_manifest(path: str) -> dict[str, Any]:
    """The manifest of a complete store; DataError for a missing or incomplete one."""
    manifest = read_manifest(path)
    if manifest is None:
        if store_exists(path):
            raise _incomplete(path, f"no {MANIFEST}")
        raise DataError(
            f"token store {path!r} does not exist: prepare it with `mtp-prepare --corpus CORPUS "
            f"--out {path}` (or mtp_jax.data.ensure_store)"
        )
    if not isinstance(manifest, dict):
        raise _bad_manifest(path, f"it holds a {type(manifest).__name__}, not an object")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"token store {path!r} has format {manifest.get('format')!r} version "
            f"{manifest.get('format_version')!r}; this mtp_jax reads {FORMAT!r} version "
            f"{FORMAT_VERSION}: prepare it again"
        )
    _check_fields(path, manifest)
    return manifest


def _bad_manifest(path: str, why: str) -> DataError:
    return DataError(
        f"token store {path!r}: {MANIFEST} is corrupt ({why}); delete the store and prepare it "
        "again"
    )


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_fields(path: str, manifest: dict[str, Any]) -> None:
    """The fields mtp_jax reads, with their types (a manifest edited by hand, or damaged)."""
    for key, ok, what in (
        ("tokenizer", lambda v: isinstance(v, str) and v, "a tokenizer name"),
        ("tokenizer_sha256", lambda v: v is None or isinstance(v, str), "a hex digest or null"),
        ("vocab_size", lambda v: _is_count(v) and v > 0, "a positive integer"),
        ("splits", lambda v: isinstance(v, dict), "an object of splits"),
    ):
        if key not in manifest:
            raise _bad_manifest(path, f"no {key!r} field")
        if not ok(manifest[key]):
            raise _bad_manifest(path, f"{key!r} is {manifest[key]!r}, not {what}")
    for split in SPLITS:
        counts = manifest["splits"].get(split)
        if not (
            isinstance(counts, dict)
            and _is_count(counts.get("docs"))
            and _is_count(counts.get("tokens"))
        ):
            raise _bad_manifest(
                path, f"splits.{split} is {counts!r}, not {{'docs': n, 'tokens': n}}"
            )


def open_split(path: str, split: str) -> StoreSplit:
    """Opens and checks one split of a complete store (counts must match the manifest)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} of store {path!r}; use one of {SPLITS}")
    manifest = load_manifest(path)
    counts = manifest["splits"][split]
    try:
        tokens = ts.open(_array_spec(path, split, "tokens"), open=True, read=True).result()
        offsets_ts = ts.open(_array_spec(path, split, "offsets"), open=True, read=True).result()
    except ValueError as e:
        raise _incomplete(path, f"cannot open the {split} arrays: {e}") from e
    if tokens.shape[0] != counts["tokens"] or offsets_ts.shape[0] != counts["docs"] + 1:
        raise _incomplete(
            path,
            f"{split}: manifest says {counts['tokens']} tokens / {counts['docs']} documents, "
            f"arrays hold {tokens.shape[0]} tokens / {offsets_ts.shape[0] - 1} documents",
        )
    try:
        offsets = np.asarray(offsets_ts.read().result(), dtype=np.int64)
    except ValueError as e:
        raise corrupt(path, f"{split}/offsets cannot be read ({e})") from e
    if offsets[0] != 0 or offsets[-1] != counts["tokens"]:
        raise _incomplete(path, f"{split}: document offsets do not span the token array")
    if np.any(np.diff(offsets) < 0):
        bad = int(np.argmax(np.diff(offsets) < 0))
        raise corrupt(path, f"{split}/offsets decrease after document {bad}")
    return StoreSplit(path=path, split=split, tokens=tokens, offsets=offsets, manifest=manifest)


def corrupt(path: str, why: str) -> DataError:
    return DataError(
        f"token store {path!r} is corrupt: {why}. Prepare it again (mtp-prepare --corpus ... "
        f"--out {path})"
    )


def read_tokens(split: StoreSplit, start: int, stop: int) -> np.ndarray:
    """tokens[start:stop] of `split`; DataError naming the chunk file when one is unreadable
    (truncated, overwritten), instead of a tensorstore traceback."""
    try:
        return split.tokens[start:stop].read().result()
    except ValueError as e:
        first, last = start // CHUNK_TOKENS, max(start, stop - 1) // CHUNK_TOKENS
        for chunk in range(first, last + 1):  # name the first bad chunk
            lo, hi = chunk * CHUNK_TOKENS, min(split.num_tokens, (chunk + 1) * CHUNK_TOKENS)
            try:
                split.tokens[lo:hi].read().result()
            except ValueError:
                raise corrupt(
                    split.path,
                    f"chunk file {join(split.path, split.split, 'tokens', str(chunk))} (tokens "
                    f"[{lo}, {hi})) cannot be read ({str(e).splitlines()[0][:200]})",
                ) from e
        why = f"{split.split} tokens [{start}, {stop}) cannot be read: {e}"
        raise corrupt(split.path, why) from e


def check_ids(split: StoreSplit, block: np.ndarray, start: int, vocab_size: int) -> None:
    """DataError naming the position when `block` (tokens from `start`) holds an id that is
    not below `vocab_size` (model.vocab_size)."""
    if block.size and int(block.max()) >= vocab_size:
        i = int(np.argmax(block >= vocab_size))
        raise corrupt(
            split.path,
            f"{split.split} token {start + i} has id {int(block.flat[i])}, not below "
            f"model.vocab_size={vocab_size} (the manifest says a {split.manifest['vocab_size']}"
            "-token vocabulary)",
        )


def scan_tokens(split: StoreSplit, vocab_size: int | None, limit: int) -> int:
    """Reads the first `limit` tokens of `split` (all if fewer) and checks every chunk decodes
    and every id is below `vocab_size`; returns the tokens scanned. DataError names the store,
    the split and the chunk or position."""
    n = min(split.num_tokens, max(limit, 0))
    step = CHUNK_TOKENS * 64
    for start in range(0, n, step):
        block = read_tokens(split, start, min(n, start + step))
        if vocab_size is not None:
            check_ids(split, block, start, vocab_size)
    return n


# ------------------------------------------------------------------------------ writing


class SplitWriter:
    """Appends documents to one split's arrays, flushing in large contiguous writes."""

    def __init__(self, path: str, split: str, dtype: str, flush_tokens: int = 1 << 24):
        self.path, self.split, self.dtype = path, split, np.dtype(dtype)
        self._flush_tokens = flush_tokens
        self._tokens = ts.open(
            _array_spec(path, split, "tokens"),
            create=True,
            delete_existing=True,
            dtype=dtype,
            shape=[0],
            chunk_layout=ts.ChunkLayout(chunk_shape=[CHUNK_TOKENS]),
        ).result()
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self._written = 0
        self._doc_lengths: list[int] = []

    def add(self, doc_tokens: np.ndarray) -> None:
        """Appends one document: `doc_tokens [n]`, its EOS included."""
        self._buffer.append(doc_tokens)
        self._buffered += len(doc_tokens)
        self._doc_lengths.append(len(doc_tokens))
        if self._buffered >= self._flush_tokens:
            self.flush()

    def flush(self) -> None:
        if not self._buffered:
            return
        data = np.concatenate(self._buffer).astype(self.dtype, copy=False)
        end = self._written + len(data)
        self._tokens = self._tokens.resize(exclusive_max=[end]).result()
        self._tokens[self._written : end].write(data).result()
        self._written = end
        self._buffer, self._buffered = [], 0

    def close(self) -> dict[str, int]:
        """Writes what is buffered and the offsets; returns {'tokens': N, 'docs': n}."""
        self.flush()
        offsets = np.zeros(len(self._doc_lengths) + 1, dtype=np.int64)
        np.cumsum(self._doc_lengths, out=offsets[1:])
        arr = ts.open(
            _array_spec(self.path, self.split, "offsets"),
            create=True,
            delete_existing=True,
            dtype="int64",
            shape=[len(offsets)],
            chunk_layout=ts.ChunkLayout(chunk_shape=[min(len(offsets), CHUNK_TOKENS)]),
        ).result()
        arr.write(offsets).result()
        return {"tokens": self._written, "docs": len(self._doc_lengths)}
