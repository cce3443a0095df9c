"""Corpora: finding the documents, splitting them, reading and tokenizing them.

A corpus spec is one of
- `'stdlib'`: every `*.py` of the running interpreter's standard library (no test dirs, no
  site-packages), one document per file;
- a directory: every non-hidden file below it, one document per file;
- a glob (`'data/**/*.txt'`) or a single file: the matching files, one document per file;
- a `.jsonl` path or glob: one document per non-blank line, its text in `text_field`.

Files are sorted, so the document order is deterministic. Text is decoded as UTF-8 with
`errors='replace'` (undecodable bytes become U+FFFD, the same text the byte tokenizer's
`decode` gives back); a file that cannot be read at all (missing, permissions, a dangling link)
is a `DataError` naming it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from mtp_jax.data.errors import DataError
from mtp_jax.data.tokenizer import ByteTokenizer, Tokenizer, get_tokenizer

STDLIB_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages"})


@dataclass(frozen=True)
class Corpus:
    """The files of a corpus; `keys[i]` names file i stably (relative to the corpus root)."""

    spec: str
    description: str  # recorded in the manifest as the store's source
    files: tuple[str, ...]
    keys: tuple[str, ...]
    jsonl: bool


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def python_version() -> str:
    return ".".join(str(v) for v in sys.version_info[:3])


def _stdlib_files(root: str) -> list[str]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS and d != "__pycache__"
        )
        files.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(files)


def _tree_files(root: str) -> list[str]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        files.extend(os.path.join(dirpath, f) for f in filenames if not f.startswith("."))
    return sorted(files)


def _glob_root(pattern: str) -> str:
    parts = pattern.split(os.sep)
    fixed = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return os.sep.join(fixed) or "."


def find_corpus(spec: str) -> Corpus:
    """Resolves a corpus spec to its sorted files; DataError when it names nothing."""
    if spec == "stdlib":
        root = stdlib_dir()
        files = _stdlib_files(root)
        desc = f"stdlib (Python {python_version()}, {root})"
    else:
        path = os.path.expanduser(spec)
        if os.path.isdir(path):
            root, files = path, _tree_files(path)
        elif glob.has_magic(path):
            root = _glob_root(path)
            files = sorted(f for f in glob.glob(path, recursive=True) if not os.path.isdir(f))
        elif os.path.lexists(path):
            root, files = os.path.dirname(path) or ".", [path]
        else:
            raise DataError(
                f"corpus {spec!r} does not exist: give 'stdlib', a directory, a glob of text "
                "files or a .jsonl file"
            )
        desc = os.path.abspath(path)
    if not files:
        raise DataError(f"corpus {spec!r} is empty: no files found ({desc})")
    keys = tuple(os.path.relpath(f, root) for f in files)
    jsonl = all(f.endswith(".jsonl") for f in files)
    return Corpus(spec=spec, description=desc, files=tuple(files), keys=keys, jsonl=jsonl)


def open_text(path: str) -> str:
    """A file's text (UTF-8, undecodable bytes replaced); DataError naming an unreadable file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"cannot read corpus file {path!r}: {e.strerror or e}") from e
    return data.decode("utf-8", errors="replace")


def _jsonl_lines(path: str) -> Iterator[tuple[int, str]]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    yield lineno, line
    except OSError as e:
        raise DataError(f"cannot read corpus file {path!r}: {e.strerror or e}") from e


# A task is one document to tokenize: (index, path, line number, raw JSON line or None).
Task = tuple[int, str, int, "str | None"]


def document_keys(corpus: Corpus) -> list[str]:
    """A stable key per document (file key, or `file:line` for JSONL) in document order."""
    if not corpus.jsonl:
        return list(corpus.keys)
    return [f"{k}:{n}" for f, k in zip(corpus.files, corpus.keys) for n, _ in _jsonl_lines(f)]


def iter_tasks(corpus: Corpus) -> Iterator[Task]:
    """The documents in order, as tasks for `tokenize_tasks` (JSONL lines read here)."""
    if not corpus.jsonl:
        for i, f in enumerate(corpus.files):
            yield i, f, 0, None
        return
    i = 0
    for f in corpus.files:
        for lineno, line in _jsonl_lines(f):
            yield i, f, lineno, line
            i += 1


def assign_val(keys: Sequence[str], val_fraction: float, seed: int) -> np.ndarray:
    """bool [n_docs]: True for the documents held out for validation.

    A document goes to val when the hash of (seed, key) falls below `val_fraction`, so the split
    depends only on its key, not on the other documents; with val_fraction > 0 and >= 2
    documents, at least one goes to val and at least one stays in train.
    """
    u = np.array(
        [
            int.from_bytes(hashlib.sha256(f"{seed}:{k}".encode()).digest()[:8], "big") / 2.0**64
            for k in keys
        ]
    )
    is_val = u < val_fraction
    if val_fraction > 0 and len(keys) >= 2:
        if not is_val.any():
            is_val[int(np.argmin(u))] = True
        if is_val.all():
            is_val[int(np.argmax(u))] = False
    return is_val


# ------------------------------------------------------------------------------ tokenizing

_worker: dict = {}


def init_worker(tokenizer_spec: str, text_field: str, dtype: str) -> None:
    """Pool initializer: builds the tokenizer once per worker process."""
    _worker.update(tokenizer=get_tokenizer(tokenizer_spec), field=text_field, dtype=dtype)


def _text_of(task: Task, text_field: str) -> str:
    _, path, lineno, line = task
    if line is None:
        return open_text(path)
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"corpus file {path!r} line {lineno}: not valid JSON ({e})") from e
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        raise DataError(
            f"corpus file {path!r} line {lineno}: no string field {text_field!r} "
            "(set data.text_field / --text_field)"
        )
    return record[text_field]


def encode_document(tokenizer: Tokenizer, text: str, dtype: str) -> np.ndarray:
    """tokens [n + 1] of one document: its text's ids followed by EOS."""
    if isinstance(tokenizer, ByteTokenizer):
        ids = tokenizer.encode_array(text)
    else:
        ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    out = np.empty(len(ids) + 1, dtype=dtype)
    out[:-1] = ids
    out[-1] = tokenizer.eos_id
    return out


def tokenize_tasks(tasks: Sequence[Task]) -> list[tuple[int, np.ndarray, int]]:
    """(index, tokens [n + 1], text bytes) per task, with the worker's tokenizer."""
    tokenizer, field, dtype = _worker["tokenizer"], _worker["field"], _worker["dtype"]
    out = []
    for task in tasks:
        text = _text_of(task, field)
        out.append((task[0], encode_document(tokenizer, text, dtype), len(text.encode("utf-8"))))
    return out
