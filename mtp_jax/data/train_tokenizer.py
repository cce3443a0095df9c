"""Training a byte-level BPE tokenizer on the user's own corpus (`mtp-tokenizer train`).

```
mtp-tokenizer train --corpus 'data/**/*.jsonl' --text-field text --vocab-size 32000 \
    --out tokenizer.json
mtp-prepare --corpus ... --tokenizer tokenizer.json      # or data.tokenizer=tokenizer.json
```
The corpus is any spec `mtp-prepare` takes (see `corpus.py`), streamed one document at a
time into the Hugging Face `tokenizers` BPE trainer: nothing is held whole in memory. The
tokenizer is byte-level (every byte is in the base alphabet, so any text round-trips exactly,
no unknown token) with no normaliser, and three special tokens at fixed ids:

| id | token | use |
|---:|---|---|
| 0 | `<pad>` | padding |
| 1 | `<s>` | beginning of sequence |
| 2 | `</s>` | end of sequence: every document in a store ends with it |
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from tqdm.auto import tqdm

from mtp_jax.data import corpus as corpus_lib
from mtp_jax.data.errors import DataError

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # the byte alphabet and the special tokens


def corpus_texts(spec: str, text_field: str = "text", progress: bool = True) -> Iterator[str]:
    """The documents of a corpus spec, in order, one text at a time (with a progress bar in
    documents and bytes)."""
    corpus = corpus_lib.find_corpus(spec, text_field=text_field)
    bar = tqdm(desc="mtp-tokenizer", unit="doc", disable=not progress, dynamic_ncols=True)
    seen = 0
    for task in corpus_lib.iter_tasks(corpus):
        text = corpus_lib.text_of(task, text_field)
        seen += len(text.encode("utf-8"))
        bar.update(1)
        bar.set_postfix(MB=f"{seen / 1e6:.1f}", refresh=False)
        yield text
    bar.close()


def train_tokenizer(
    corpus: str,
    out_path: str,
    vocab_size: int,
    text_field: str = "text",
    min_frequency: int = 2,
    progress: bool = True,
) -> dict[str, Any]:
    """Trains a byte-level BPE of `vocab_size` ids on `corpus`; writes tokenizer.json.

    Returns {'path', 'vocab_size', 'pad_id', 'bos_id', 'eos_id'}. Raises DataError for a bad
    corpus or vocabulary size, or a missing `tokenizers` package.
    """
    if vocab_size < MIN_VOCAB:
        raise DataError(
            f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at least "
            f"{MIN_VOCAB} ids (256 bytes and {len(SPECIAL_TOKENS)} special tokens)"
        )
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise DataError(
            "training a tokenizer needs the 'tokenizers' package: pip install tokenizers "
            "(or mtp_jax[tokenizers])"
        ) from e
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus_texts(corpus, text_field, progress), trainer=trainer)
    ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids != [PAD_ID, BOS_ID, EOS_ID]:  # the trainer puts special tokens first
        raise DataError(f"the trained tokenizer put {SPECIAL_TOKENS} at ids {ids}")
    tokenizer.save(out_path)
    return {
        "path": out_path,
        "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
        "pad_id": PAD_ID,
        "bos_id": BOS_ID,
        "eos_id": EOS_ID,
    }
