"""The Grain pipeline: windows of S + D + 1 tokens, global shuffle, per-process batches.

Window j of a split is `tokens[j*S : j*S + S + D + 1]` of its flat token stream (S = seq_len,
D = mtp_depth): consecutive windows overlap by D + 1 tokens, so every token is a next-token
target exactly once; there are `(N - (S + D + 1)) // S + 1` windows.

The global order of windows is a seeded permutation, a new one each epoch (train repeats
forever). The GLOBAL batch of step t is `order[t*B : (t+1)*B]` (B = data.batch_size) whatever
the number of processes; process p reads only rows `[p*b, (p+1)*b)` of it (b = B //
process_count), so a 2-process run sees the same global batches as a 1-process run.

Each element is a dict (W = S + D + 1):
  tokens       int32 [b, W]
  segment_ids  int32 [b, W]   documents numbered from 1 inside each window; a document's EOS
                              belongs to it
Iterators checkpoint with `get_state()/set_state()` or through Orbax with
`grain.checkpoint.CheckpointSave(it)` / `grain.checkpoint.CheckpointRestore(it)`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np

from mtp_jax.data import mixture as mixture_lib
from mtp_jax.data import store as store_lib
from mtp_jax.data.errors import DataError
from mtp_jax.data.mixture import MixtureOrder
from mtp_jax.data.prepare import check_manifest, store_path
from mtp_jax.window import WindowSpec

SYNTHETIC_WINDOWS = 1 << 20  # windows in one epoch of the synthetic source


def num_windows(num_tokens: int, seq_len: int, mtp_depth: int) -> int:
    """Windows of S + D + 1 tokens at stride S in a stream of `num_tokens` (0 if too short)."""
    return WindowSpec(seq_len, mtp_depth).num_windows(num_tokens)


def _segment_ids(doc_index: np.ndarray) -> np.ndarray:
    """segment_ids [..., W] from the document index [..., W] of each position: 1, 1, 2, ..."""
    return (doc_index - doc_index[..., :1] + 1).astype(np.int32)


class StoreWindowSource:
    """Random access to the windows of one split of a token store (a Grain data source).

    `source[j]` -> {'tokens': int32 [W], 'segment_ids': int32 [W]}; `read_batch(js)` reads
    several windows concurrently -> int32 [len(js), W] each. Pickles without its open arrays
    (worker processes reopen them).
    """

    def __init__(
        self,
        path: str,
        split: str,
        seq_len: int,
        mtp_depth: int,
        vocab_size: int | None = None,
        verify_tokens: int = 0,
    ):
        self.path, self.split = path, split
        self.seq_len, self.mtp_depth = seq_len, mtp_depth
        self.vocab_size = vocab_size
        self.window = WindowSpec(seq_len, mtp_depth).length
        self._store: store_lib.StoreSplit | None = None
        n_tokens = self._split().num_tokens
        if verify_tokens:
            store_lib.scan_tokens(self._split(), vocab_size, verify_tokens)
        self._len = num_windows(n_tokens, seq_len, mtp_depth)
        if self._len == 0:
            raise DataError(
                f"token store {path!r} split {split!r} holds {n_tokens} tokens, fewer than one "
                f"window of S + D + 1 = {seq_len} + {mtp_depth} + 1 = {self.window}: lower "
                "data.seq_len or prepare a larger corpus"
            )

    def _split(self) -> store_lib.StoreSplit:
        if self._store is None:
            self._store = store_lib.open_split(self.path, self.split)
        return self._store

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        batch = self.read_batch([index])
        return {k: v[0] for k, v in batch.items()}

    def read_batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """tokens, segment_ids: int32 [len(indices), W] of windows `indices`."""
        store = self._split()
        starts = np.asarray(indices, dtype=np.int64) * self.seq_len
        reads = [store.tokens[s : s + self.window].read() for s in starts.tolist()]
        rows = []
        for s, r in zip(starts.tolist(), reads, strict=True):
            try:
                rows.append(r.result())
            except ValueError:  # name the unreadable chunk
                rows.append(store_lib.read_tokens(store, s, s + self.window))
            if self.vocab_size is not None:  # never a silent wrong batch
                store_lib.check_ids(store, rows[-1], s, self.vocab_size)
        tokens = np.stack(rows).astype(np.int32)
        positions = starts[:, None] + np.arange(self.window)
        doc_index = np.searchsorted(store.offsets, positions, side="right")
        return {"tokens": tokens, "segment_ids": _segment_ids(doc_index)}

    def __repr__(self) -> str:
        return (
            f"StoreWindowSource(path={self.path!r}, split={self.split!r}, "
            f"seq_len={self.seq_len}, mtp_depth={self.mtp_depth})"
        )

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_store": None}


class SyntheticWindowSource:
    """Uniform random tokens in [0, vocab_size) with random document boundaries, by seed.

    A virtual token stream, generated in blocks of S tokens (block k from a generator seeded
    with (seed, k)), so overlapping windows agree on their shared tokens. Each position ends a
    document with probability 1 / mean_doc_len (mean_doc_len = max(4, S // 2)).
    """

    def __init__(self, vocab_size: int, seq_len: int, mtp_depth: int, seed: int = 0):
        self.vocab_size, self.seed = vocab_size, seed
        self.seq_len, self.mtp_depth = seq_len, mtp_depth
        self.window = WindowSpec(seq_len, mtp_depth).length
        self.mean_doc_len = max(4, seq_len // 2)

    def __len__(self) -> int:
        return SYNTHETIC_WINDOWS

    def _block(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, k])
        tokens = rng.integers(0, self.vocab_size, self.seq_len, dtype=np.int32)
        ends = rng.random(self.seq_len) < 1.0 / self.mean_doc_len
        return tokens, ends

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        first, last = index, (index * self.seq_len + self.window - 1) // self.seq_len
        blocks = [self._block(k) for k in range(first, last + 1)]
        tokens = np.concatenate([b[0] for b in blocks])[: self.window]
        ends = np.concatenate([b[1] for b in blocks])[: self.window]
        doc_index = np.concatenate([[0], np.cumsum(ends[:-1])])  # an end belongs to its doc
        return {"tokens": tokens, "segment_ids": _segment_ids(doc_index)}

    def read_batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        items = [self[i] for i in indices]
        return {k: np.stack([it[k] for it in items]) for k in ("tokens", "segment_ids")}

    def __repr__(self) -> str:
        return (
            f"SyntheticWindowSource(vocab_size={self.vocab_size}, seq_len={self.seq_len}, "
            f"mtp_depth={self.mtp_depth}, seed={self.seed})"
        )


class LocalBatches(grain.MapDataset):
    """Element t: this process's rows of global batch t, read by window index.

    `order` maps a global example position g to a window index (a shuffled, repeated range),
    or, for a mixture, to (source index, window index) (`MixtureOrder`); global batch t holds
    positions [t*B, (t+1)*B) and this process reads positions t*B + p*b + [0, b). A mixture's
    batches also carry `mixture_counts`: int64 [n_sources], the examples each source served
    in batches 0..t of the whole (global) run, the same on every process.
    """

    def __init__(
        self,
        order: grain.MapDataset,
        source: StoreWindowSource | SyntheticWindowSource | Sequence[StoreWindowSource],
        global_batch: int,
        process_index: int,
        process_count: int,
    ):
        super().__init__(order)
        self._sources = source if isinstance(source, list | tuple) else None
        self._source = source
        self._global = global_batch
        self._local = global_batch // process_count
        self._offset = process_index * self._local
        self._len = len(order) // global_batch

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        start = index * self._global + self._offset
        if self._sources is None:
            windows = [int(self._parent[g]) for g in range(start, start + self._local)]
            return self._source.read_batch(windows)
        return self._read_mixed(index, start)

    def _read_mixed(self, index: int, start: int) -> dict[str, np.ndarray]:
        picks = [self._parent[g] for g in range(start, start + self._local)]
        rows: dict[str, np.ndarray] = {}
        for k, source in enumerate(self._sources):
            at = [i for i, (s, _) in enumerate(picks) if s == k]
            if not at:
                continue
            part = source.read_batch([picks[i][1] for i in at])
            for name, value in part.items():
                if name not in rows:
                    rows[name] = np.empty((self._local, *value.shape[1:]), value.dtype)
                rows[name][at] = value
        rows["mixture_counts"] = self._parent.counts_before((index + 1) * self._global)
        return rows

    def __str__(self) -> str:
        return f"LocalBatches(B={self._global}, b={self._local}, offset={self._offset})"


def _absl_flags_parsed() -> None:
    """Grain's worker processes read absl flags: outside an absl program, mark them parsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _shuffle_seed(seed: int, split: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{split}".encode()).digest()[:4], "big")


def make_source(
    data_cfg: ml_collections.ConfigDict,
    *,
    seq_len: int,
    mtp_depth: int,
    split: str = "train",
    seed: int = 0,
    vocab_size: int | None = None,
) -> StoreWindowSource | SyntheticWindowSource:
    """The window source of `data_cfg` (store or synthetic); DataError when it cannot serve."""
    if data_cfg.source == "synthetic":
        if vocab_size is None:
            raise DataError("data.source='synthetic' needs vocab_size (model.vocab_size)")
        split_seed = seed if split == "train" else seed + 1_000_003
        return SyntheticWindowSource(vocab_size, seq_len, mtp_depth, seed=split_seed)
    path = store_path(data_cfg)
    check_manifest(path, store_lib.load_manifest(path), data_cfg.tokenizer, vocab_size)
    return StoreWindowSource(
        path, split, seq_len, mtp_depth, vocab_size, data_cfg.get("verify_tokens", 0)
    )


def make_dataset(
    data_cfg: ml_collections.ConfigDict,
    *,
    seq_len: int,
    mtp_depth: int,
    split: str = "train",
    seed: int = 0,
    vocab_size: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    shuffle: bool | None = None,
    repeat: bool = True,
    total_steps: int | None = None,
) -> grain.IterDataset:
    """This process's batches: {'tokens', 'segment_ids'}: int32 [b, S + D + 1], b = B // P.

    Args:
      data_cfg: `config.data` (source, path, corpus, tokenizer, batch_size, shuffle,
        worker_count, prefetch, ...). The store must exist (see `ensure_store`).
      seq_len, mtp_depth: S and D; windows hold S + D + 1 tokens.
      split: 'train' or 'val'.
      seed: shuffle seed (each epoch is reshuffled from it).
      vocab_size: the model's vocabulary; the store's must not exceed it (required for
        synthetic data).
      process_index, process_count: default to `jax.process_index()/process_count()`.
      shuffle: default `data_cfg.shuffle`.
      repeat: repeat forever (train); False gives one pass of len(windows) // B batches.
        A mixture (`data.mixture`, see `mixture.py`) always repeats.
      total_steps: `train.steps`, which places the phases of `data.mixture_schedule`.
    Raises:
      DataError for a missing, incomplete or mismatched store, a split shorter than one
      window, or a batch size not divisible by the process count.
    """
    p = jax.process_index() if process_index is None else process_index
    n_proc = jax.process_count() if process_count is None else process_count
    B = data_cfg.batch_size
    if B % n_proc:
        raise DataError(
            f"data.batch_size={B} (the global batch) is not divisible by the {n_proc} "
            "processes: make it a multiple of the process count"
        )
    if not 0 <= p < n_proc:
        raise DataError(f"process_index={p} is not in [0, process_count={n_proc})")
    where = dict(seq_len=seq_len, mtp_depth=mtp_depth, split=split, seed=seed)
    if data_cfg.get("mixture"):
        shuffle = data_cfg.shuffle if shuffle is None else shuffle
        order, sources = _mixture_order(
            data_cfg, **where, vocab_size=vocab_size, total_steps=total_steps, shuffle=shuffle
        )
        return _batches(data_cfg, order, sources, p, n_proc)
    source = make_source(data_cfg, **where, vocab_size=vocab_size)
    if len(source) < B and not repeat:
        raise DataError(
            f"{source!r} has {len(source)} windows, fewer than one global batch of {B}: lower "
            "data.batch_size or data.seq_len"
        )
    order = grain.MapDataset.range(len(source))
    if data_cfg.shuffle if shuffle is None else shuffle:
        order = order.shuffle(seed=_shuffle_seed(seed, split))
    if repeat:
        order = order.repeat()
    return _batches(data_cfg, order, source, p, n_proc)


def _mixture_order(
    data_cfg, *, seq_len, mtp_depth, split, seed, vocab_size, total_steps, shuffle
) -> tuple[MixtureOrder, list[StoreWindowSource]]:
    """The mixture's example order and its sources (every store checked against the others)."""
    mixed = mixture_lib.mixture_sources(data_cfg.mixture)
    if data_cfg.get("mixture_schedule") and total_steps is None:
        raise DataError("data.mixture_schedule needs the run's length (train.steps)")
    schedule = mixture_lib.mixture_phases(
        data_cfg.mixture, data_cfg.get("mixture_schedule", ()), total_steps or 1
    )
    manifests = []
    for src in mixed:
        if store_lib.read_manifest(src.path) is None:
            raise DataError(
                f"data.mixture: token store {src.path!r} (source {src.name!r}) is missing or "
                f"incomplete: prepare it with `mtp-prepare --corpus ... --out {src.path}`"
            )
        manifest = store_lib.load_manifest(src.path)
        manifests.append((src.path, manifest))
    mixture_lib.check_compatible(manifests)
    for path, manifest in manifests:
        check_manifest(path, manifest, data_cfg.tokenizer, vocab_size)
    verify = data_cfg.get("verify_tokens", 0)
    sources = [
        StoreWindowSource(s.path, split, seq_len, mtp_depth, vocab_size, verify) for s in mixed
    ]
    order = MixtureOrder(
        [len(s) for s in sources],
        [s.name for s in mixed],
        schedule,
        data_cfg.batch_size,
        seed=seed,
        split=split,
        shuffle=shuffle,
    )
    return order, sources


def mixture_names(data_cfg: ml_collections.ConfigDict) -> list[str]:
    """The names of `data.mixture`'s sources (logged as data/tokens/<name>); [] without one."""
    return (
        [s.name for s in mixture_lib.mixture_sources(data_cfg.mixture)]
        if data_cfg.get("mixture")
        else []
    )


def source_config(data_cfg: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """`data_cfg` reading only the mixture source `name` (e.g. for its own eval)."""
    (src,) = [s for s in mixture_lib.mixture_sources(data_cfg.mixture) if s.name == name]
    out = ml_collections.ConfigDict(data_cfg.to_dict())
    out.mixture, out.mixture_schedule, out.path = (), (), src.path
    return out


def _batches(data_cfg, order, source, p: int, n_proc: int) -> grain.IterDataset:
    B = data_cfg.batch_size
    ds = LocalBatches(order, source, B, p, n_proc)
    prefetch = data_cfg.prefetch
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=min(prefetch, 4), prefetch_buffer_size=prefetch)
    )
    if data_cfg.worker_count > 0:
        _absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=data_cfg.worker_count, per_worker_buffer_size=max(1, prefetch)
            )
        )
    return it_ds


def to_global_batch(
    batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding
) -> dict[str, jax.Array]:
    """This process's rows [b, ...] -> global jax.Arrays [B, ...] laid out by `sharding`."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


__all__ = [
    "LocalBatches",
    "StoreWindowSource",
    "SyntheticWindowSource",
    "make_dataset",
    "make_source",
    "mixture_names",
    "source_config",
    "num_windows",
    "to_global_batch",
]
