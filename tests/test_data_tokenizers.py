"""Data: byte, SentencePiece and Hugging Face tokenizers, and stores made with them."""

from __future__ import annotations

import numpy as np
import pytest
from test_data import DOCS, data_config, write_corpus

from mtp_jax.data import ByteTokenizer, get_tokenizer, make_dataset, prepare
from mtp_jax.data import store as store_lib

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jam".split()


def _sentences(n: int = 300) -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(4, 12)))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory) -> str:
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_sentences(), trainer=trainer)
    path = str(tmp_path_factory.mktemp("hf") / "tokenizer.json")
    tok.save(path)
    return path


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> str:
    spm = pytest.importorskip("sentencepiece")
    root = tmp_path_factory.mktemp("sp")
    text = root / "text.txt"
    text.write_text("\n".join(_sentences()))
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(root / "sp"),
        vocab_size=100,
        model_type="bpe",
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return str(root / "sp.model")


def test_byte_tokenizer():
    tok = get_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and tok.name == "byte"
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 256, 257, 258)
    text = "h\u00e9llo \u2603"
    ids = tok.encode(text)
    assert ids == list(text.encode()) and max(ids) < 256
    assert tok.decode([257, *ids, 258, 256]) == text  # special ids skipped
    assert tok.decode([0xE2, 0x98]) == "\ufffd"  # invalid UTF-8 replaced


@pytest.mark.parametrize("kind", ["hf", "sp"])
def test_file_tokenizer_round_trip_and_store(kind, hf_tokenizer, sp_model, tmp_path):
    spec = hf_tokenizer if kind == "hf" else sp_model
    tok = get_tokenizer(spec)
    assert tok.name == spec and tok.eos_id >= 0 and tok.vocab_size <= 400
    text = "the lazy dog jumps over seven wizards"
    ids = tok.encode(text)
    assert 0 < len(ids) < len(text) and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode([tok.eos_id, *ids, tok.eos_id]) == text

    corpus = write_corpus(str(tmp_path / "corpus"), DOCS)
    out = str(tmp_path / "store")
    manifest = prepare(corpus, out, tokenizer=spec, val_fraction=0.0, progress=False)
    assert manifest["tokenizer"] == spec and manifest["vocab_size"] == tok.vocab_size
    assert manifest["dtype"] == "uint16" and manifest["eos_id"] == tok.eos_id
    split = store_lib.open_split(out, "train")
    tokens = split.tokens.read().result()
    expected = np.concatenate([[*tok.encode(DOCS[k]), tok.eos_id] for k in sorted(DOCS)])
    np.testing.assert_array_equal(tokens, expected)
    first = tokens[split.offsets[0] : split.offsets[1]]
    assert tok.decode(first) == DOCS["a.txt"]
    batch = next(iter(make_dataset(data_config(out, tokenizer=spec), seq_len=4, mtp_depth=1)))
    assert batch["tokens"].max() < tok.vocab_size
    # A store is matched to a moved copy of the same tokenizer file by content.
    moved = tmp_path / ("copy" + spec[spec.rindex(".") :])
    moved.write_bytes(open(spec, "rb").read())
    make_dataset(data_config(out, tokenizer=str(moved)), seq_len=4, mtp_depth=1)


def test_parallel_prepare_with_file_tokenizer(hf_tokenizer, tmp_path):
    docs = {f"d{i:03d}.txt": s for i, s in enumerate(_sentences(70))}
    corpus = write_corpus(str(tmp_path / "corpus"), docs)
    a = prepare(corpus, str(tmp_path / "a"), tokenizer=hf_tokenizer, num_workers=2, progress=False)
    b = prepare(corpus, str(tmp_path / "b"), tokenizer=hf_tokenizer, num_workers=1, progress=False)
    assert a["splits"] == b["splits"]
    ta = store_lib.open_split(str(tmp_path / "a"), "train").tokens.read().result()
    tb = store_lib.open_split(str(tmp_path / "b"), "train").tokens.read().result()
    np.testing.assert_array_equal(ta, tb)
