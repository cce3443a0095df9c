"""Corpora: finding the documents, splitting them, reading and tokenizing them.

A corpus spec is one of
- `'stdlib'`: every `*.py` of the running interpreter's standard library (no test dirs, no
  site-packages), one document per file;
- a directory: every non-hidden file below it, one document per file;
- a glob (`'data/**/*.txt'`) or a single file: the matching files, one document per file;
- a `.jsonl` path or glob: one document per non-blank line, its text in `text_field`;
- Parquet (`.parquet`) or Arrow IPC (`.arrow`, `.feather`) files, a path, glob or directory of
  them, local or `gs://`: one document per row, its text in column `text_field`, read in record
  batches with pyarrow (never whole into memory).

A bad table file (unreadable, without the text column) and a bad row (null, or bytes that are
not UTF-8) are `DataError`s naming the file (and row); with `skip_bad` they are counted and
skipped instead (`Corpus.skipped_files`, and the row counts `prepare` reports).

Files are sorted, so the document order is deterministic. Text is decoded as UTF-8 with
`errors='replace'` (undecodable bytes become U+FFFD, the same text the byte tokenizer's
`decode` gives back); a file that cannot be read at all (missing, permissions, a dangling link)
is a `DataError` naming it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

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
    table: bool = False  # Parquet / Arrow files: one document per row
    text_field: str = "text"  # the JSONL field / table column holding the text
    rows: tuple[int, ...] = ()  # table files: rows per file
    skipped_files: tuple[str, ...] = ()  # table files skipped as bad (skip_bad)


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


TABLE_SUFFIXES = (".parquet", ".arrow", ".feather")


def find_corpus(spec: str, text_field: str = "text", skip_bad: bool = False) -> Corpus:
    """Resolves a corpus spec to its sorted files; DataError when it names nothing.

    Table files (Parquet / Arrow) are opened here to count their rows and check the
    `text_field` column: a bad one is a DataError, or skipped with `skip_bad`.
    """
    if spec.startswith("gs://"):
        return _table_corpus(spec, *_remote_files(spec), text_field, skip_bad)
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
    if all(f.endswith(TABLE_SUFFIXES) for f in files):
        return _table_corpus(spec, desc, root, files, text_field, skip_bad)
    keys = tuple(os.path.relpath(f, root) for f in files)
    jsonl = all(f.endswith(".jsonl") for f in files)
    return Corpus(
        spec=spec,
        description=desc,
        files=tuple(files),
        keys=keys,
        jsonl=jsonl,
        text_field=text_field,
    )


# ------------------------------------------------------------------------------ tables


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.fs  # noqa: F401
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise DataError(
            "Parquet / Arrow corpora need the 'pyarrow' package: pip install pyarrow "
            "(or mtp_jax[data])"
        ) from e
    return pyarrow


def _filesystem(path: str):
    """(pyarrow FileSystem, path within it) for a local path or a gs:// URL."""
    pa = _pyarrow()
    if path.startswith("gs://"):
        return pa.fs.FileSystem.from_uri(path)
    return pa.fs.LocalFileSystem(), os.path.abspath(path)


def _remote_files(spec: str) -> tuple[str, str, list[str]]:
    """(description, root, sorted table files) of a gs:// file, directory or glob."""
    import fnmatch

    pa = _pyarrow()
    fs, path = _filesystem(spec)
    root = path if not glob.has_magic(path) else _glob_root(path)
    info = fs.get_file_info(root)
    if info.type == pa.fs.FileType.File:
        names = [root]
    elif info.type == pa.fs.FileType.Directory:
        selector = pa.fs.FileSelector(root, recursive=True)
        names = [i.path for i in fs.get_file_info(selector) if i.type == pa.fs.FileType.File]
        if glob.has_magic(path):
            names = [n for n in names if fnmatch.fnmatch(n, path)]
    else:
        raise DataError(f"corpus {spec!r} does not exist")
    files = sorted(f"gs://{n}" for n in names if n.endswith(TABLE_SUFFIXES))
    if not files:
        raise DataError(f"corpus {spec!r} holds no Parquet / Arrow files")
    return spec, f"gs://{root}" if info.type == pa.fs.FileType.Directory else spec, files


def _open_table(path: str, column: str | None = None) -> tuple[Any, Iterator[Any]]:
    """(schema, record batches) of one table file, read lazily: a Parquet file's (of `column`
    alone, when given), an Arrow IPC file's, or an Arrow IPC stream's, one at a time."""
    pa = _pyarrow()
    fs, inner = _filesystem(path)
    if path.endswith(".parquet"):
        parquet = pa.parquet.ParquetFile(fs.open_input_file(inner))
        columns = None if column is None else [column]
        return parquet.schema_arrow, parquet.iter_batches(batch_size=1024, columns=columns)
    try:
        ipc = pa.ipc.open_file(fs.open_input_file(inner))
        return ipc.schema, (ipc.get_batch(i) for i in range(ipc.num_record_batches))
    except pa.ArrowInvalid:  # not the file format: the streaming format
        stream = pa.ipc.open_stream(fs.open_input_stream(inner))
        return stream.schema, iter(stream)


def _table_rows(path: str, text_field: str) -> int:
    """Rows of a table file; DataError when it is unreadable or lacks the text column."""
    pa = _pyarrow()
    try:
        if path.endswith(".parquet"):  # the footer has the count
            fs, inner = _filesystem(path)
            parquet = pa.parquet.ParquetFile(fs.open_input_file(inner))
            schema, rows = parquet.schema_arrow, parquet.metadata.num_rows
        else:
            schema, batches = _open_table(path)
            rows = sum(batch.num_rows for batch in batches)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"cannot read corpus file {path!r}: {_first_line(e)}") from e
    if text_field not in schema.names:
        raise DataError(
            f"corpus file {path!r} has no column {text_field!r} (columns: "
            f"{', '.join(schema.names)}): set data.text_field / --text-field"
        )
    return int(rows)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _table_corpus(
    spec: str, desc: str, root: str, files: list[str], text_field: str, skip_bad: bool
) -> Corpus:
    kept, rows, skipped = [], [], []
    for f in files:
        try:
            rows.append(_table_rows(f, text_field))
            kept.append(f)
        except DataError as e:
            if not skip_bad:
                raise
            skipped.append(f)
            logging.getLogger(__name__).warning("skipping bad corpus file: %s", e)
    if not kept:
        raise DataError(f"corpus {spec!r} has no readable table files ({len(skipped)} skipped)")
    keys = tuple(
        f[len(root) :].lstrip("/") if f.startswith(root) and f != root else os.path.basename(f)
        for f in kept
    )
    return Corpus(
        spec=spec,
        description=desc,
        files=tuple(kept),
        keys=keys,
        jsonl=False,
        table=True,
        text_field=text_field,
        rows=tuple(rows),
        skipped_files=tuple(skipped),
    )


def _table_texts(path: str, text_field: str) -> Iterator[tuple[int, Any]]:
    """(row, text or a `BadRow`) of one table file, read one record batch at a time."""
    pa = _pyarrow()
    row = 0
    try:
        _, batches = _open_table(path, text_field)
        for batch in batches:
            for value in batch.column(batch.schema.get_field_index(text_field)).to_pylist():
                yield row, _row_text(value)
                row += 1
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"corpus file {path!r} row {row}: {_first_line(e)}") from e


class BadRow(str):
    """A row whose text cannot be used (the reason); skipped with skip_bad, else an error."""


def _row_text(value: Any) -> str:
    if value is None:
        return BadRow("the text is null")
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            return BadRow(f"the text is not valid UTF-8 ({e.reason} at byte {e.start})")
    if not isinstance(value, str):
        return BadRow(f"the text is a {type(value).__name__}, not a string")
    return value


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


class Task(NamedTuple):
    """One document to tokenize: a whole file (line None, text None), a JSONL line (the raw
    line) or a table row (its text, already read; a `BadRow` when unusable)."""

    index: int
    path: str
    row: int  # JSONL line number or table row; 0 for a whole file
    line: str | None = None
    text: str | None = None


def document_keys(corpus: Corpus) -> list[str]:
    """A stable key per document (file key, `file:line` for JSONL, `file:row` for tables) in
    document order."""
    if corpus.table:
        return [f"{k}:{r}" for k, n in zip(corpus.keys, corpus.rows) for r in range(n)]
    if not corpus.jsonl:
        return list(corpus.keys)
    return [f"{k}:{n}" for f, k in zip(corpus.files, corpus.keys) for n, _ in _jsonl_lines(f)]


def iter_tasks(corpus: Corpus) -> Iterator[Task]:
    """The documents in order, as tasks for `tokenize_tasks` (JSONL lines and table rows read
    here, in the main process)."""
    i = 0
    for f in corpus.files:
        if corpus.table:
            for row, text in _table_texts(f, corpus.text_field):
                yield Task(i, f, row, None, text)
                i += 1
        elif corpus.jsonl:
            for lineno, line in _jsonl_lines(f):
                yield Task(i, f, lineno, line)
                i += 1
        else:
            yield Task(i, f, 0)
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


def init_worker(tokenizer_spec: str, text_field: str, dtype: str, skip_bad: bool = False) -> None:
    """Pool initializer: builds the tokenizer once per worker process."""
    _worker.update(
        tokenizer=get_tokenizer(tokenizer_spec), field=text_field, dtype=dtype, skip_bad=skip_bad
    )


def text_of(task: Task, text_field: str) -> str:
    """The text of one task: a file's contents, a JSONL line's `text_field` or a table row's.

    DataError naming the file and row for a bad table row (`BadRow`)."""
    _, path, lineno, line, text = task
    if isinstance(text, BadRow):
        raise DataError(f"corpus file {path!r} row {lineno}: {text}")
    if text is not None:
        return text
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


def tokenize_tasks(tasks: Sequence[Task]) -> list[tuple[int, np.ndarray | None, int]]:
    """(index, tokens [n + 1], text bytes) per task, with the worker's tokenizer; tokens are
    None for a bad table row skipped under skip_bad."""
    tokenizer, field, dtype = _worker["tokenizer"], _worker["field"], _worker["dtype"]
    out = []
    for task in tasks:
        if isinstance(task.text, BadRow) and _worker.get("skip_bad"):
            out.append((task.index, None, 0))
            continue
        text = text_of(task, field)
        out.append((task[0], encode_document(tokenizer, text, dtype), len(text.encode("utf-8"))))
    return out
