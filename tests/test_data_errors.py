"""Data: every bad input is a DataError naming the path; nothing half-written looks valid."""

from __future__ import annotations

import json
import os
import sys

import pytest
from test_data import DOCS, data_config, prepared, take, write_corpus

from mtp_jax.data import DataError, ensure_store, make_dataset, prepare
from mtp_jax.data import store as store_lib

KW = dict(seq_len=8, mtp_depth=2)


def test_missing_store(tmp_path):
    path = str(tmp_path / "nowhere")
    with pytest.raises(DataError, match="does not exist") as e:
        make_dataset(data_config(path), **KW)
    assert path in str(e.value) and "mtp-prepare" in str(e.value)


def test_store_without_manifest_is_incomplete(tmp_path):
    path = prepared(tmp_path)
    make_dataset(data_config(path, batch_size=1), **KW)  # fine while complete
    os.remove(os.path.join(path, "manifest.json"))
    with pytest.raises(DataError, match="incomplete") as e:
        make_dataset(data_config(path), **KW)
    assert path in str(e.value)
    with pytest.raises(DataError, match="incomplete"):  # never silently re-prepared over
        ensure_store(data_config(path, corpus=str(tmp_path / "corpus-store")))


def test_manifest_counts_must_match_arrays(tmp_path):
    path = prepared(tmp_path)
    manifest_path = os.path.join(path, "manifest.json")
    manifest = json.load(open(manifest_path))
    manifest["splits"]["train"]["tokens"] += 5
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    with pytest.raises(DataError, match="incomplete") as e:
        make_dataset(data_config(path), **KW)
    assert path in str(e.value) and "tokens" in str(e.value)


def test_crash_mid_prepare_leaves_nothing_that_looks_valid(tmp_path, monkeypatch):
    corpus = write_corpus(str(tmp_path / "corpus"))
    out = str(tmp_path / "store")

    def boom(self):
        raise RuntimeError("disk full")

    monkeypatch.setattr(store_lib.SplitWriter, "close", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare(corpus, out, num_workers=1, progress=False)
    assert not os.path.exists(out)
    assert os.listdir(tmp_path) == ["corpus"]  # the temporary sibling is gone too
    with pytest.raises(DataError, match="does not exist"):
        make_dataset(data_config(out), **KW)


def test_crash_while_replacing_keeps_the_old_store(tmp_path, monkeypatch):
    path = prepared(tmp_path)
    before = store_lib.load_manifest(path)
    monkeypatch.setattr(
        store_lib, "write_manifest", lambda *a: (_ for _ in ()).throw(RuntimeError("killed"))
    )
    with pytest.raises(RuntimeError, match="killed"):
        prepare(str(tmp_path / "corpus-store"), path, val_fraction=0.5, progress=False)
    monkeypatch.undo()
    assert store_lib.load_manifest(path) == before
    assert sorted(os.listdir(tmp_path)) == ["corpus-store", "store"]


def test_tokenizer_mismatch(tmp_path):
    path = prepared(tmp_path)
    other = tmp_path / "tok.model"
    other.write_bytes(b"not really a model")
    with pytest.raises(DataError, match="tokenizer") as e:
        make_dataset(data_config(path, tokenizer=str(other)), **KW)
    assert path in str(e.value) and "'byte'" in str(e.value)
    with pytest.raises(DataError, match="tokenizer"):
        ensure_store(data_config(path, tokenizer=str(other)))


def test_vocab_too_small(tmp_path):
    path = prepared(tmp_path)
    with pytest.raises(DataError, match="259") as e:
        make_dataset(data_config(path), vocab_size=100, **KW)
    assert path in str(e.value) and "model.vocab_size" in str(e.value)
    with pytest.raises(DataError, match="259"):
        ensure_store(data_config(path), vocab_size=258)
    assert ensure_store(data_config(path), vocab_size=259) == path


def test_window_longer_than_data(tmp_path):
    path = prepared(tmp_path)
    n = store_lib.load_manifest(path)["splits"]["train"]["tokens"]
    with pytest.raises(DataError) as e:
        make_dataset(data_config(path), seq_len=n, mtp_depth=2)
    msg = str(e.value)
    assert path in msg and "'train'" in msg and str(n) in msg and str(n + 3) in msg


def test_unreadable_input_file(tmp_path):
    corpus = write_corpus(str(tmp_path / "corpus"))
    broken = os.path.join(corpus, "broken.txt")
    os.symlink(str(tmp_path / "gone.txt"), broken)  # a dangling link: open() fails
    with pytest.raises(DataError, match="cannot read") as e:
        prepare(corpus, str(tmp_path / "store"), num_workers=1, progress=False)
    assert broken in str(e.value)
    assert not os.path.exists(tmp_path / "store")


def test_undecodable_bytes_are_replaced(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "latin1.txt").write_bytes("caf\u00e9".encode("latin-1"))
    out = str(tmp_path / "store")
    prepare(str(corpus), out, val_fraction=0.0, progress=False)
    tokens = store_lib.open_split(out, "train").tokens.read().result()
    assert bytes(tokens[:-1].astype("uint8")).decode() == "caf\ufffd"


def test_empty_corpus(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty") as e:
        prepare(str(empty), str(tmp_path / "s"), progress=False)
    assert str(empty) in str(e.value)
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    with pytest.raises(DataError, match="empty") as e:
        prepare(str(blank), str(tmp_path / "s"), progress=False)
    assert str(blank) in str(e.value)
    with pytest.raises(DataError, match="empty"):
        prepare(str(tmp_path / "nope" / "*.txt"), str(tmp_path / "s"), progress=False)
    assert not os.path.exists(tmp_path / "s")


def test_bad_jsonl_records(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(DataError, match="line 2") as e:
        prepare(str(path), str(tmp_path / "s"), progress=False)
    assert str(path) in str(e.value) and "'text'" in str(e.value)
    path.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match="line 2"):
        prepare(str(path), str(tmp_path / "s"), progress=False)


def test_batch_not_divisible_by_processes(tmp_path):
    path = prepared(tmp_path)
    with pytest.raises(DataError, match="batch_size=3"):
        make_dataset(data_config(path, batch_size=3), process_index=0, process_count=2, **KW)


def test_unknown_tokenizer_and_missing_file(tmp_path):
    corpus = write_corpus(str(tmp_path / "corpus"), DOCS)
    with pytest.raises(DataError, match="unknown tokenizer"):
        prepare(corpus, str(tmp_path / "s"), tokenizer="gpt2", progress=False)
    missing = str(tmp_path / "none.json")
    with pytest.raises(DataError, match="does not exist") as e:
        prepare(corpus, str(tmp_path / "s"), tokenizer=missing, progress=False)
    assert missing in str(e.value)


def test_ensure_store_prepares_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MTP_JAX_CACHE", str(tmp_path / "cache"))
    corpus = write_corpus(str(tmp_path / "corpus"))
    cfg = data_config(corpus=corpus, batch_size=2)
    path = ensure_store(cfg, vocab_size=259)
    assert path.startswith(str(tmp_path / "cache" / "stores" / "corpus-byte-"))
    assert store_lib.load_manifest(path)["corpus"] == corpus

    prepare_module = sys.modules["mtp_jax.data.prepare"]  # the attribute is the function
    monkeypatch.setattr(prepare_module, "prepare", lambda *a, **k: pytest.fail("re-prepared"))
    assert ensure_store(cfg, vocab_size=259) == path
    assert len(take(make_dataset(cfg, **KW), 2)) == 2  # make_dataset finds the cached store
    assert ensure_store(data_config(source="synthetic")) == ""
