"""mtp-tokenizer train: a byte-level BPE trained on a corpus streamed document by document."""

from __future__ import annotations

import json

import pytest

from mtp_jax.checks import ConfigError
from mtp_jax.cli.tokenizer import main as tokenizer_main
from mtp_jax.data import get_tokenizer, prepare
from mtp_jax.data import store as store_lib
from mtp_jax.data.tokenizer import check_vocab_size

pytest.importorskip("tokenizers")

DOCS = [
    "def add(a, b):\n    return a + b\n",
    "Les élèves étudient l'été. Ünïcödé, 日本語のテキスト, emoji 🙂 and tabs\tend.\n",
    "the quick brown fox jumps over the lazy dog " * 20,
    "\x00 control \x7f bytes and    runs of     spaces\n\n\n",
    "for i in range(10):\n    print(i * i)  # squares\n" * 5,
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok_corpus")
    with open(root / "docs.jsonl", "w", encoding="utf-8") as f:
        for doc in DOCS:
            f.write(json.dumps({"body": doc}) + "\n")
    return str(root / "docs.jsonl")


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    args = ["train", "--corpus", corpus, "--text-field", "body", "--vocab-size", "320"]
    assert tokenizer_main([*args, "--out", str(out), "--quiet"]) == 0
    return str(out)


def test_trained_tokenizer_round_trips_the_corpus_with_documented_special_ids(trained):
    tok = get_tokenizer(trained)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert 259 < tok.vocab_size <= 320
    for doc in DOCS:
        ids = tok.encode(doc)
        assert tok.decode(ids) == doc
        assert not {0, 1, 2} & set(ids)  # text never encodes to a special id
    # BPE merged something: the repeated sentence takes fewer ids than bytes.
    assert len(tok.encode(DOCS[2])) < len(DOCS[2].encode()) / 2


def test_a_store_prepared_with_the_trained_tokenizer(trained, corpus, tmp_path):
    out = str(tmp_path / "store")
    manifest = prepare(corpus, out, tokenizer=trained, text_field="body", progress=False)
    assert manifest["vocab_size"] == get_tokenizer(trained).vocab_size
    tokens = store_lib.open_split(out, "train").tokens.read().result()
    assert tokens.max() < manifest["vocab_size"] and (tokens == 2).sum() >= 1  # EOS per doc


def test_vocab_size_smaller_than_the_tokenizer_is_a_config_error(trained):
    n = get_tokenizer(trained).vocab_size
    with pytest.raises(ConfigError, match=f"'model.vocab_size' has value 300.*the {n} ids"):
        check_vocab_size(trained, 300)
    check_vocab_size(trained, n)  # equal is fine


def test_bad_vocab_size_and_corpus_are_named(corpus, tmp_path, capsys):
    out = str(tmp_path / "t.json")
    assert tokenizer_main(["train", "--corpus", corpus, "--vocab-size", "100", "--out", out]) == 2
    assert "--vocab-size 100 is too small" in capsys.readouterr().err
    missing = str(tmp_path / "nope")
    assert tokenizer_main(["train", "--corpus", missing, "--vocab-size", "300", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
