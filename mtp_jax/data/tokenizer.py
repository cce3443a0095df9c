"""Tokenizers behind one small interface: the byte tokenizer and file-backed ones.

`get_tokenizer(spec)` picks by spec string: `'byte'` (UTF-8 bytes, no files), a path ending in
`.model` (SentencePiece) or in `.json` (a Hugging Face `tokenizers` tokenizer.json). The spec
string is the tokenizer's `name`, recorded in a store's manifest and checked when training.
`sentencepiece` and `tokenizers` are imported only when such a tokenizer is asked for.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from mtp_jax.data.errors import DataError

# Special tokens looked up, in order of preference, in a tokenizer.json vocabulary.
_HF_EOS = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "[SEP]", "<EOS>")
_HF_BOS = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "[CLS]", "<BOS>")
_HF_PAD = ("<pad>", "[PAD]", "<|pad|>", "<PAD>")


@runtime_checkable
class Tokenizer(Protocol):
    """What the data package needs from a tokenizer (ids are Python ints)."""

    name: str  # the spec string given to `get_tokenizer`; recorded in the manifest
    vocab_size: int  # ids are in [0, vocab_size)
    pad_id: int  # -1 when the tokenizer has none
    bos_id: int  # -1 when the tokenizer has none
    eos_id: int  # ends every document in a store

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, without special tokens."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special ids are skipped, invalid UTF-8 becomes U+FFFD."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then PAD=256, BOS=257, EOS=258 (vocab_size 259)."""

    name = "byte"
    vocab_size = 259
    pad_id = 256
    bos_id = 257
    eos_id = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        """`encode` as a uint8 array [n] (the fast path used by `prepare`)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class SentencePieceTokenizer:
    """A SentencePiece `.model` file."""

    def __init__(self, path: str, name: str | None = None):
        try:
            import sentencepiece as spm
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise DataError(
                f"tokenizer {path!r} needs the 'sentencepiece' package: "
                "pip install sentencepiece (or mtp_jax[tokenizers])"
            ) from e
        _check_file(path)
        self.name = name or path
        self._sp = spm.SentencePieceProcessor(model_file=path)
        self.vocab_size = int(self._sp.get_piece_size())
        self.pad_id = int(self._sp.pad_id())
        self.bos_id = int(self._sp.bos_id())
        self.eos_id = int(self._sp.eos_id())
        if self.eos_id < 0:
            raise DataError(
                f"SentencePiece model {path!r} has no EOS piece (eos_id=-1); documents in a "
                "store end with EOS: retrain it with --eos_id set"
            )
        self._control = {i for i in range(self.vocab_size) if self._is_special(i)}

    def _is_special(self, i: int) -> bool:
        return bool(self._sp.is_control(i) or self._sp.is_unknown(i))

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        keep = [
            int(i) for i in ids if 0 <= int(i) < self.vocab_size and int(i) not in self._control
        ]
        return self._sp.decode(keep)

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.name!r})"


class HuggingFaceTokenizer:
    """A Hugging Face `tokenizers` tokenizer.json file."""

    def __init__(self, path: str, name: str | None = None):
        try:
            import tokenizers
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise DataError(
                f"tokenizer {path!r} needs the 'tokenizers' package: "
                "pip install tokenizers (or mtp_jax[tokenizers])"
            ) from e
        _check_file(path)
        self.name = name or path
        try:
            self._tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:
            raise DataError(f"cannot load tokenizer.json {path!r}: {e}") from e
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.eos_id = _first_id(vocab, _HF_EOS)
        self.bos_id = _first_id(vocab, _HF_BOS)
        self.pad_id = _first_id(vocab, _HF_PAD)
        if self.eos_id < 0:
            raise DataError(
                f"tokenizer.json {path!r} has none of the EOS tokens {list(_HF_EOS)}; documents "
                "in a store end with EOS: add one as a special token"
            )
        self._special = {self.eos_id, self.bos_id, self.pad_id} - {-1}

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        keep = [
            int(i) for i in ids if 0 <= int(i) < self.vocab_size and int(i) not in self._special
        ]
        return self._tok.decode(keep, skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HuggingFaceTokenizer({self.name!r})"


def _first_id(vocab: dict[str, int], candidates: Sequence[str]) -> int:
    for token in candidates:
        if token in vocab:
            return int(vocab[token])
    return -1


def _check_file(path: str) -> None:
    if not os.path.isfile(path):
        raise DataError(f"tokenizer file {path!r} does not exist")


def get_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer named by `spec`: 'byte', a SentencePiece `.model` or a `tokenizer.json`.

    Raises:
      DataError for an unknown spec, a missing file or a missing optional library.
    """
    if spec == "byte":
        return ByteTokenizer()
    if spec.endswith(".model"):
        return SentencePieceTokenizer(spec)
    if spec.endswith(".json"):
        return HuggingFaceTokenizer(spec)
    raise DataError(
        f"unknown tokenizer {spec!r}: use 'byte', a SentencePiece '.model' file or a Hugging "
        "Face 'tokenizer.json' file"
    )


def tokenizer_fingerprint(spec: str) -> str:
    """sha256 of a file-backed tokenizer's bytes ('' for 'byte'): identifies a moved file."""
    if spec == "byte" or not os.path.isfile(spec):
        return ""
    with open(spec, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def check_vocab_size(spec: str, vocab_size: int) -> None:
    """ConfigError when `model.vocab_size` is smaller than the tokenizer `spec`'s vocabulary
    (its ids would index past the embedding)."""
    from mtp_jax.checks import fail

    n = get_tokenizer(spec).vocab_size
    if n > vocab_size:
        fail(
            "model.vocab_size",
            vocab_size,
            f"at least the {n} ids of data.tokenizer={spec!r}",
        )
