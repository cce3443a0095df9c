"""Parquet and Arrow corpora: the same documents as JSONL give the same store; bad files and
rows are named (or counted and skipped with --skip-bad); nothing is written on failure."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from mtp_jax.cli.prepare import main as prepare_main
from mtp_jax.data import DataError, prepare
from mtp_jax.data import store as store_lib

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

DOCS = [f"document {i}: " + "héllo wörld " * (i % 7 + 1) + "\n" * (i % 3) for i in range(40)]


def _jsonl(path, docs, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({field: d, "id": 0}) + "\n")
    return str(path)


def _parquet_shards(root, docs, field="text", shards=3):
    """docs split over `shards` Parquet files (small row groups: several record batches)."""
    os.makedirs(root, exist_ok=True)
    for i, part in enumerate(np.array_split(np.arange(len(docs)), shards)):
        table = pa.table({field: [docs[j] for j in part], "id": part.tolist()})
        pq.write_table(table, os.path.join(root, f"part-{i:02d}.parquet"), row_group_size=4)
    return str(root)


def _arrow(path, docs, field="text", stream=False):
    """An Arrow IPC file (or stream) of `docs` in batches of 5 rows."""
    table = pa.table({field: docs})
    new = pa.ipc.new_stream if stream else pa.ipc.new_file
    with pa.OSFile(str(path), "wb") as sink, new(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=5)
    return str(path)


def _store(path):
    arrays = {}
    for split in store_lib.SPLITS:
        s = store_lib.open_split(path, split)
        arrays[split] = (s.tokens.read().result(), np.asarray(s.offsets))
    return arrays


def _same_stores(a, b):
    sa, sb = _store(a), _store(b)
    for split in store_lib.SPLITS:
        np.testing.assert_array_equal(sa[split][0], sb[split][0])
        np.testing.assert_array_equal(sa[split][1], sb[split][1])


def test_parquet_arrow_and_jsonl_give_identical_stores(tmp_path):
    """One document per row, in file order: the same tokens, offsets and split as JSONL (the
    split hashes keys; the table keys are `file:row`, so compare with one file each)."""
    one = [tmp_path / "one.jsonl", tmp_path / "one.parquet", tmp_path / "one.arrow"]
    one.append(tmp_path / "stream" / "one.arrow")  # the IPC streaming format
    _jsonl(one[0], DOCS)
    pq.write_table(pa.table({"text": DOCS}), str(one[1]), row_group_size=4)
    _arrow(one[2], DOCS)
    (tmp_path / "stream").mkdir()
    _arrow(one[3], DOCS, stream=True)
    stores = []
    for i, src in enumerate(one):
        out = str(tmp_path / f"store{i}")
        manifest = prepare(str(src), out, val_fraction=0.0, progress=False)
        assert manifest["splits"]["train"]["docs"] == len(DOCS)
        stores.append(out)
    for other in stores[1:]:
        _same_stores(stores[0], other)
    # Sharded Parquet with a val split: every document lands once, in order.
    out = str(tmp_path / "sharded")
    shards = _parquet_shards(tmp_path / "shards", DOCS, field="body")
    manifest = prepare(shards, out, val_fraction=0.2, text_field="body", progress=False)
    counts = manifest["splits"]
    assert counts["train"]["docs"] + counts["val"]["docs"] == len(DOCS)
    assert counts["val"]["docs"] > 0
    assert manifest["text_bytes"] == sum(len(d.encode()) for d in DOCS)


def test_bad_table_files_and_rows_are_named_and_nothing_is_written(tmp_path, capsys):
    good = _parquet_shards(tmp_path / "c", DOCS[:10], shards=1)
    out = str(tmp_path / "out")
    # Missing column: named with the file and the columns there are.
    with pytest.raises(DataError, match=r"part-00.parquet' has no column 'body' \(columns: text"):
        prepare(good, out, text_field="body", progress=False)
    # Unreadable: garbage bytes with a .parquet name.
    (tmp_path / "c" / "part-01.parquet").write_bytes(b"not a parquet file at all")
    with pytest.raises(DataError, match="cannot read corpus file .*part-01.parquet"):
        prepare(good, out, progress=False)
    # Non-UTF-8 and null rows in a binary column: named by file and row.
    os.remove(tmp_path / "c" / "part-01.parquet")
    bad_rows = [b"fine", b"\xff\xfe broken", None, b"also fine"]
    pq.write_table(pa.table({"text": pa.array(bad_rows, pa.binary())}), good + "/part-02.parquet")
    with pytest.raises(DataError, match=r"part-02.parquet' row 1: the text is not valid UTF-8"):
        prepare(good, out, progress=False)
    assert not os.path.exists(out)  # every failure above left nothing behind
    assert not [p for p in os.listdir(tmp_path) if p.startswith("out")]
    # --skip-bad: counted and skipped (CLI), the good rows kept.
    (tmp_path / "c" / "part-03.parquet").write_bytes(b"garbage")
    args = ["--corpus", good, "--out", out, "--quiet", "--val_fraction", "0", "--skip-bad"]
    assert prepare_main(args) == 0
    printed = capsys.readouterr().out
    assert "skipped: 1 bad files, 2 bad rows" in printed
    manifest = store_lib.load_manifest(out)
    assert manifest["skipped"]["rows"] == 2
    assert manifest["skipped"]["files"][0].endswith("part-03.parquet")
    assert manifest["splits"]["train"]["docs"] == 10 + 2
    assert prepare_main(["--corpus", good, "--out", str(tmp_path / "x"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cannot read corpus file" in err and "Traceback" not in err
