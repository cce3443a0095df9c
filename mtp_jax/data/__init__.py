"""Training data: tokenizers, corpus -> token store, and the Grain pipeline of windows.

```
path = ensure_store(config.data, vocab_size=config.model.vocab_size)   # prepares if missing
ds = make_dataset(config.data, seq_len=S, mtp_depth=D, seed=config.seed)
it = iter(ds)                     # checkpoint it with grain.checkpoint.CheckpointSave(it)
batch = to_global_batch(next(it), sharding)   # tokens, segment_ids: int32 [B, S + D + 1]
```
The pipeline names are imported lazily (PEP 562): `mtp-prepare` and tokenizer-only users do
not import Grain.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mtp_jax.data.errors import DataError
from mtp_jax.data.prepare import default_store_path, ensure_store, prepare
from mtp_jax.data.tokenizer import ByteTokenizer, get_tokenizer

if TYPE_CHECKING:
    from mtp_jax.data.pipeline import make_dataset, to_global_batch


def __getattr__(name: str) -> Any:
    if name in ("make_dataset", "to_global_batch"):
        from mtp_jax.data import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'mtp_jax.data' has no attribute {name!r}")


__all__ = [
    "ByteTokenizer",
    "DataError",
    "default_store_path",
    "ensure_store",
    "get_tokenizer",
    "make_dataset",
    "prepare",
    "to_global_batch",
]
