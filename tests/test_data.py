"""Data: prepare -> store -> Grain windows; determinism, resume, process sharding, CLI.

Also holds the helpers (tiny corpora, configs) the other tests/test_data_*.py import."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mtp_jax.cli.prepare import main as prepare_main
from mtp_jax.config import base_config
from mtp_jax.data import (
    ByteTokenizer,
    DataError,
    default_store_path,
    make_dataset,
    prepare,
    to_global_batch,
)
from mtp_jax.data import store as store_lib
from mtp_jax.data.corpus import find_corpus
from mtp_jax.data.pipeline import make_source

REPO = pathlib.Path(__file__).resolve().parents[1]

EOS = 258

# Short documents so that windows of a few tokens span two or three of them.
DOCS = {
    "a.txt": "alpha doc one.",
    "b.txt": "bb",
    "c.txt": "c",
    "d/e.txt": "delta: the fourth document, a bit longer than the others.",
    "d/f.txt": "f\u00e9e \u2603 unicode",
    "g.txt": "gamma gamma gamma gamma",
}


def write_corpus(root: str, docs: dict[str, str] = DOCS) -> str:
    """Writes `docs` (relative path -> text) under `root`; returns `root`."""
    for rel, text in docs.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return root


def byte_stream(texts: list[str]) -> np.ndarray:
    """The token stream a byte-tokenizer store holds for `texts`: each text's bytes + EOS."""
    out: list[int] = []
    for t in texts:
        out.extend(t.encode("utf-8"))
        out.append(EOS)
    return np.array(out, dtype=np.int32)


def random_docs(n: int, seed: int = 0, lo: int = 5, hi: int = 60) -> dict[str, str]:
    """`n` documents of random lowercase letters (so windows are distinct)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz "))
    return {
        f"doc{i:04d}.txt": "".join(rng.choice(letters, size=int(rng.integers(lo, hi))))
        for i in range(n)
    }


def data_config(path: str = "", **overrides):
    """`base_config().data` with `path` and the given fields set."""
    cfg = base_config().data
    cfg.path = path
    cfg.prefetch = 0
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def prepared(tmp_path, docs=DOCS, name="store", **kwargs) -> str:
    """Prepares `docs` (written under tmp_path/corpus-<name>) into tmp_path/<name>."""
    corpus = write_corpus(str(tmp_path / f"corpus-{name}"), docs)
    out = str(tmp_path / name)
    kwargs.setdefault("val_fraction", 0.0)
    prepare(corpus, out, num_workers=1, progress=False, **kwargs)
    return out


def take(ds, n: int) -> list[dict[str, np.ndarray]]:
    it = iter(ds)
    return [next(it) for _ in range(n)]


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in ("tokens", "segment_ids")
    )


@pytest.fixture(scope="module")
def random_store(tmp_path_factory) -> str:
    """A byte store of 40 random-letter documents (distinct windows), all in train."""
    return prepared(tmp_path_factory.mktemp("random"), random_docs(40))


# ------------------------------------------------------------------------------ round trip


def test_round_trip_windows_decode_to_text_and_segments_follow_documents(tmp_path):
    path = prepared(tmp_path)
    texts = [DOCS[k] for k in sorted(DOCS)]  # files are read in sorted order
    stream = byte_stream(texts)
    lengths = [len(t.encode()) + 1 for t in texts]

    split = store_lib.open_split(path, "train")
    np.testing.assert_array_equal(split.offsets, np.concatenate([[0], np.cumsum(lengths)]))
    np.testing.assert_array_equal(split.tokens.read().result(), stream)

    S, D = 8, 2
    W = S + D + 1
    ds = make_dataset(data_config(path, batch_size=1), seq_len=S, mtp_depth=D, shuffle=False)
    n_windows = (len(stream) - W) // S + 1
    windows = [b["tokens"][0] for b in take(ds, n_windows)]
    segs = [b["segment_ids"][0] for b in take(ds, n_windows)]
    doc_of = np.repeat(np.arange(len(texts)), lengths)
    tok = ByteTokenizer()
    spans_three = False
    for j, (w, s) in enumerate(zip(windows, segs)):
        assert w.dtype == np.int32 and w.shape == (W,) and s.dtype == np.int32
        np.testing.assert_array_equal(w, stream[j * S : j * S + W])
        np.testing.assert_array_equal(s, doc_of[j * S : j * S + W] - doc_of[j * S] + 1)
        # The window's bytes (EOS dropped) are a span of the documents' text.
        assert bytes(w[w != EOS].astype(np.uint8)) in "".join(texts).encode()
        spans_three |= s.max() >= 3
    assert spans_three, "the corpus should have a window spanning three documents"
    # The windows' stride parts decode back to the original documents, EOS-separated.
    covered = np.concatenate([w[:S] for w in windows] + [windows[-1][S:]])
    pieces = np.split(covered, np.flatnonzero(covered == EOS) + 1)[:-1]  # complete docs
    assert len(pieces) >= len(texts) - 1
    assert [tok.decode(p) for p in pieces] == texts[: len(pieces)]
    # Window 1 covers "e." EOS "bb" EOS "c" EOS ...: segment ids change right after each EOS.
    w1, s1 = windows[1], segs[1]
    eos_at = np.flatnonzero(w1 == EOS)
    assert len(eos_at) >= 2
    for e in eos_at[:-1]:
        assert s1[e + 1] == s1[e] + 1  # a document's EOS belongs to it; the next one starts
    # The repeat starts the stream over (shuffle=False): window n_windows is window 0 again.
    again = take(ds, n_windows + 1)[-1]["tokens"][0]
    np.testing.assert_array_equal(again, windows[0])


def test_every_token_is_a_next_token_target_exactly_once(random_store):
    S, D = 16, 3
    n = store_lib.open_split(random_store, "train").num_tokens
    ds = make_dataset(
        data_config(random_store, batch_size=1),
        seq_len=S,
        mtp_depth=D,
        shuffle=False,
        repeat=False,
    )
    batches = list(ds)
    assert len(batches) == (n - (S + D + 1)) // S + 1
    targets = np.concatenate([b["tokens"][0, 1 : S + 1] for b in batches])
    stream = store_lib.open_split(random_store, "train").tokens.read().result()
    np.testing.assert_array_equal(targets, stream[1 : 1 + len(targets)])


def test_split_by_document_is_deterministic_and_keeps_val_nonempty(tmp_path):
    docs = random_docs(30, seed=1)
    a = prepared(tmp_path, docs, name="a", val_fraction=0.1, seed=3)
    b = prepared(tmp_path, docs, name="b", val_fraction=0.1, seed=3)
    c = prepared(tmp_path, docs, name="c", val_fraction=0.1, seed=4)
    ma, mb, mc = (store_lib.load_manifest(p) for p in (a, b, c))
    assert ma["splits"] == mb["splits"]
    assert ma["splits"]["val"]["docs"] >= 1
    assert ma["splits"]["train"]["docs"] + ma["splits"]["val"]["docs"] == 30
    val_a = store_lib.open_split(a, "val").tokens.read().result()
    val_c = store_lib.open_split(c, "val").tokens.read().result()
    assert not np.array_equal(val_a, val_c)  # another seed holds out other documents
    # Two documents and a tiny fraction: still one in each split.
    tiny = prepared(tmp_path, {"x.txt": "x", "y.txt": "y"}, name="tiny", val_fraction=0.01)
    assert store_lib.load_manifest(tiny)["splits"]["val"]["docs"] == 1


def test_parallel_prepare_equals_in_process(tmp_path):
    corpus = write_corpus(str(tmp_path / "corpus"), random_docs(80, seed=2))
    one = prepare(corpus, str(tmp_path / "one"), num_workers=1, progress=False)
    two = prepare(corpus, str(tmp_path / "two"), num_workers=2, progress=False)
    assert one["splits"] == two["splits"]
    for split in ("train", "val"):
        x = store_lib.open_split(str(tmp_path / "one"), split)
        y = store_lib.open_split(str(tmp_path / "two"), split)
        np.testing.assert_array_equal(x.tokens.read().result(), y.tokens.read().result())
        np.testing.assert_array_equal(x.offsets, y.offsets)


def test_jsonl_corpus(tmp_path):
    lines = [{"text": "first record"}, {"text": "second", "id": 2}, {"text": "third one"}]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines[:2]) + "\n\n" + json.dumps(lines[2]))
    manifest = prepare(str(path), str(tmp_path / "s"), val_fraction=0.0, progress=False)
    assert manifest["splits"]["train"]["docs"] == 3
    tokens = store_lib.open_split(str(tmp_path / "s"), "train").tokens.read().result()
    np.testing.assert_array_equal(tokens, byte_stream([x["text"] for x in lines]))


def test_stdlib_corpus_discovery():
    corpus = find_corpus("stdlib")
    rel = corpus.keys
    assert "os.py" in rel and "json/decoder.py" in rel
    assert list(corpus.files) == sorted(corpus.files)
    assert all(f.endswith(".py") for f in rel)
    for excluded in ("test", "tests", "idle_test", "site-packages", "dist-packages"):
        assert not any(excluded in k.split(os.sep)[:-1] for k in rel), excluded
    assert sys.version.split()[0] in default_store_path("stdlib", "byte")


# ------------------------------------------------------------------------------ order


def test_same_seed_same_batches_other_seed_other_order(random_store):
    cfg = data_config(random_store, batch_size=4)
    kw = dict(seq_len=16, mtp_depth=2)
    a = take(make_dataset(cfg, seed=0, **kw), 12)
    b = take(make_dataset(cfg, seed=0, **kw), 12)
    c = take(make_dataset(cfg, seed=1, **kw), 12)
    assert same(a, b)
    assert not same(a, c)
    # One epoch of either seed is a permutation of all windows.
    cfg1 = data_config(random_store, batch_size=1)
    n = len(make_source(cfg1, **kw))
    epochs = [list(make_dataset(cfg1, seed=seed, repeat=False, **kw)) for seed in (0, 1)]
    rows = [[x["tokens"][0].tobytes() for x in e] for e in epochs]
    assert len(rows[0]) == n and len(set(rows[0])) == n
    assert set(rows[0]) == set(rows[1]) and rows[0] != rows[1]


def test_each_epoch_is_reshuffled(random_store):
    cfg = data_config(random_store, batch_size=1)
    kw = dict(seq_len=16, mtp_depth=2)
    n = len(make_source(cfg, **kw))
    batches = take(make_dataset(cfg, **kw), 2 * n)
    first = [b["tokens"].tobytes() for b in batches[:n]]
    second = [b["tokens"].tobytes() for b in batches[n:]]
    assert sorted(first) == sorted(second) and first != second


# ------------------------------------------------------------------------------ resume


def test_iterator_state_round_trip_resumes_exactly(random_store):
    cfg = data_config(random_store, batch_size=2, prefetch=2)
    kw = dict(seq_len=16, mtp_depth=2, seed=5)
    it = iter(make_dataset(cfg, **kw))
    for _ in range(7):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(6)]

    fresh = take(make_dataset(cfg, **kw), 6)
    assert not same(fresh, expected)  # the test can fail: a fresh iterator starts elsewhere
    restored = iter(make_dataset(cfg, **kw))
    restored.set_state(state)
    assert restored.get_state() == state
    assert same([next(restored) for _ in range(6)], expected)


def test_iterator_checkpoint_through_orbax_manager(random_store, tmp_path):
    cfg = data_config(random_store, batch_size=2)
    kw = dict(seq_len=16, mtp_depth=2, seed=9)
    it = iter(make_dataset(cfg, **kw))
    for _ in range(5):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = [next(it) for _ in range(4)]

    restored = iter(make_dataset(cfg, **kw))
    before = [next(restored) for _ in range(4)]
    assert not same(before, expected)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        assert mngr.latest_step() == 5
        mngr.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    assert same([next(restored) for _ in range(4)], expected)


# ------------------------------------------------------------------------------ processes


def test_process_shards_are_disjoint_and_concatenate_to_the_global_batch(random_store):
    B = 4
    cfg = data_config(random_store, batch_size=B)
    kw = dict(seq_len=16, mtp_depth=2, seed=3)
    n = len(make_source(cfg, **kw))
    steps = n // B
    glob = list(make_dataset(cfg, process_index=0, process_count=1, repeat=False, **kw))
    shards = [
        list(make_dataset(cfg, process_index=p, process_count=2, repeat=False, **kw))
        for p in range(2)
    ]
    assert len(glob) == len(shards[0]) == len(shards[1]) == steps
    seen = [set(), set()]
    for t in range(steps):
        for k in ("tokens", "segment_ids"):
            assert shards[0][t][k].shape == (B // 2, 16 + 2 + 1)
            np.testing.assert_array_equal(
                np.concatenate([shards[0][t][k], shards[1][t][k]]), glob[t][k]
            )
        for p in range(2):
            seen[p].update(r.tobytes() for r in shards[p][t]["tokens"])
    assert not seen[0] & seen[1]
    source = make_source(cfg, **kw)
    all_windows = {source[j]["tokens"].tobytes() for j in range(n)}
    assert len(all_windows) == n
    assert len(seen[0] | seen[1]) == steps * B and (seen[0] | seen[1]) <= all_windows
    # Infinite train streams agree too, across the epoch boundary.
    g = take(make_dataset(cfg, process_count=1, process_index=0, **kw), steps + 3)
    s1 = take(make_dataset(cfg, process_count=2, process_index=1, **kw), steps + 3)
    for a, b in zip(g, s1):
        np.testing.assert_array_equal(a["tokens"][B // 2 :], b["tokens"])


def test_to_global_batch_builds_sharded_arrays(random_store):
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    B = len(jax.devices())
    batch = take(make_dataset(data_config(random_store, batch_size=B), seq_len=8, mtp_depth=1), 1)
    out = to_global_batch(batch[0], sharding)
    assert out["tokens"].shape == (B, 10) and out["tokens"].dtype == np.int32
    assert out["tokens"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(out["segment_ids"]), batch[0]["segment_ids"])


# ------------------------------------------------------------------------------ synthetic


def test_synthetic_source_shapes_range_determinism_and_layout():
    cfg = data_config(source="synthetic", batch_size=4)
    kw = dict(seq_len=32, mtp_depth=2, vocab_size=50)
    a = take(make_dataset(cfg, seed=0, **kw), 3)
    b = take(make_dataset(cfg, seed=0, **kw), 3)
    c = take(make_dataset(cfg, seed=1, **kw), 3)
    assert same(a, b) and not same(a, c)
    for x in a:
        assert x["tokens"].shape == x["segment_ids"].shape == (4, 35)
        assert x["tokens"].dtype == x["segment_ids"].dtype == np.int32
        assert x["tokens"].min() >= 0 and x["tokens"].max() < 50
        s = x["segment_ids"]
        assert (s[:, 0] == 1).all() and set(np.unique(np.diff(s, axis=1))) <= {0, 1}
    assert max(x["segment_ids"].max() for x in a) > 1  # documents do end inside windows
    src = make_source(cfg, seq_len=32, mtp_depth=2, vocab_size=50)
    w0, w1 = src[10], src[11]
    np.testing.assert_array_equal(w0["tokens"][32:], w1["tokens"][:3])  # overlap of D + 1
    with pytest.raises(DataError, match="vocab_size"):
        make_dataset(cfg, seq_len=32, mtp_depth=2)


def test_synthetic_iterator_resumes():
    cfg = data_config(source="synthetic", batch_size=2)
    kw = dict(seq_len=8, mtp_depth=1, vocab_size=20, seed=4)
    it = iter(make_dataset(cfg, **kw))
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    restored = iter(make_dataset(cfg, **kw))
    restored.set_state(state)
    assert same([next(restored) for _ in range(3)], expected)


# ------------------------------------------------------------------------------ CLI


def test_cli_main_and_module(tmp_path, capsys):
    corpus = write_corpus(str(tmp_path / "corpus"))
    out = str(tmp_path / "out")
    assert prepare_main(["--corpus", corpus, "--out", out, "--quiet", "--val_fraction", "0.2"]) == 0
    assert "train:" in capsys.readouterr().out
    manifest = store_lib.load_manifest(out)
    assert manifest["splits"]["val"]["docs"] >= 1 and manifest["tokenizer"] == "byte"

    out2 = str(tmp_path / "out2")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mtp_jax.cli.prepare",
            "--corpus",
            corpus,
            "--out",
            out2,
            "--quiet",
            "--val_fraction",
            "0.2",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "RuntimeWarning" not in proc.stderr
    assert store_lib.load_manifest(out2)["splits"] == manifest["splits"]
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "mtp_jax.cli.prepare",
            "--corpus",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "o3"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert bad.returncode == 2 and "nope" in bad.stderr


def test_worker_processes_keep_the_order_and_resume(random_store):
    cfg = data_config(random_store, batch_size=2)
    kw = dict(seq_len=16, mtp_depth=2, seed=2)
    expected = take(make_dataset(cfg, **kw), 8)
    cfg.worker_count = 2
    it = iter(make_dataset(cfg, **kw))
    try:
        got = [next(it) for _ in range(5)]
        state = it.get_state()
    finally:
        it.close()
    assert same(got, expected[:5])
    restored = iter(make_dataset(cfg, **kw))  # the same worker_count: states differ by it
    try:
        restored.set_state(state)
        assert same([next(restored) for _ in range(3)], expected[5:])
    finally:
        restored.close()
