"""Weighted mixtures of token stores, mixed per example with Grain's `MapDataset.mix`.

`data.mixture = (('STORE_A', 0.8), ('STORE_B', 0.2))` (an optional third element names a
source; by default its name is the store's last path component). Weights are normalised.
`data.mixture_schedule = ((0.0, (0.8, 0.2)), (0.5, (0.5, 0.5)))` changes them in phases: from
training fraction f on (step round(f * train.steps)), the weights are w. A weight of 0 leaves a
source out of a phase.

Each source's windows are a seeded permutation of its own windows, repeated forever. Example
position g of the global stream (batch t holds g in [t*B, (t+1)*B)) maps to (source, window):
inside a phase, Grain's mixing interleaves the sources deterministically, so every run of n
consecutive examples holds each source within two examples of its weight x n. A phase starts
each source where the previous phases left it, so no window repeats before a source's epoch
ends. The mapping is a pure function of the position: the Grain iterator's position (what the
checkpoint saves) restores every source exactly.
"""

from __future__ import annotations

import bisect
import hashlib
import sys
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from mtp_jax.config import MixtureSource, mixture_phases, mixture_sources
from mtp_jax.data.errors import DataError

__all__ = ["MixtureOrder", "MixtureSource", "check_compatible", "mixture_phases", "mixture_sources"]


def check_compatible(manifests: Sequence[tuple[str, dict[str, Any]]]) -> None:
    """DataError unless every store was made with the same tokenizer and vocabulary."""
    first_path, first = manifests[0]
    for path, m in manifests[1:]:
        for field in ("tokenizer", "tokenizer_sha256", "vocab_size"):
            if m.get(field) != first.get(field):
                raise DataError(
                    f"data.mixture: store {path!r} has {field} {m.get(field)!r} but store "
                    f"{first_path!r} has {first.get(field)!r}: every store of a mixture must "
                    "be prepared with the same tokenizer"
                )


class _Tag:
    """position in a source's order -> (source index, position); picklable for Grain workers."""

    def __init__(self, source: int):
        self.source = source

    def __call__(self, position: Any) -> tuple[int, int]:
        return self.source, int(position)


def _shuffle_seed(seed: int, split: str, name: str) -> int:
    text = f"{seed}:{split}:{name}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")


class MixtureOrder(grain.MapDataset):
    """Example position g -> (source index, window index), forever.

    Phase p covers positions [first_step_p * B, first_step_{p+1} * B) and is
    `grain.MapDataset.mix` of the sources it weights, over positions in each source's own
    order that continue where earlier phases left it. `counts_before(n)` gives how many of the
    first n positions each source served.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        names: Sequence[str],
        schedule: Sequence[tuple[int, tuple[float, ...]]],
        global_batch: int,
        *,
        seed: int,
        split: str,
        shuffle: bool = True,
    ):
        orders = []
        for n, name in zip(lengths, names, strict=True):
            order = grain.MapDataset.range(n)
            if shuffle:
                order = order.shuffle(seed=_shuffle_seed(seed, split, name))
            orders.append(order.repeat())
        super().__init__(orders)
        self._orders = orders
        self._n_sources = len(lengths)
        self._starts: list[int] = []  # first example position of each phase
        self._offsets: list[np.ndarray] = []  # per-source positions served before each phase
        self._members: list[list[int]] = []  # the sources each phase draws from
        self._mixes: list[grain.MapDataset] = []
        served = np.zeros(self._n_sources, np.int64)
        for p, (step, weights) in enumerate(schedule):
            start = step * global_batch
            if p:
                served = served + self._counts_in_phase(p - 1, start - self._starts[-1])
            members = [k for k, w in enumerate(weights) if w > 0]
            self._starts.append(start)
            self._offsets.append(served.copy())
            self._members.append(members)
            self._mixes.append(
                grain.MapDataset.mix(
                    [
                        grain.MapDataset.range(int(served[k]), sys.maxsize).map(_Tag(k))
                        for k in members
                    ],
                    [weights[k] for k in members],
                )
            )

    def __len__(self) -> int:
        return sys.maxsize

    def _phase(self, position: int) -> int:
        return bisect.bisect_right(self._starts, position) - 1

    def _counts_in_phase(self, p: int, n: int) -> np.ndarray:
        """Per-source examples among the first n positions of phase p: a scan back from
        position n - 1 (a source of weight w recurs within about 1 / w positions)."""
        counts = np.zeros(self._n_sources, np.int64)
        missing = set(self._members[p])
        g = n - 1
        while missing and g >= 0:
            k, position = self._mixes[p][g]
            if k in missing:
                counts[k] = position - self._offsets[p][k] + 1
                missing.discard(k)
            g -= 1
        return counts

    def counts_before(self, position: int) -> np.ndarray:
        """int64 [n_sources]: examples each source served at positions [0, position)."""
        if position <= 0:
            return np.zeros(self._n_sources, np.int64)
        p = self._phase(position - 1)
        return self._offsets[p] + self._counts_in_phase(p, position - self._starts[p])

    def source_of(self, index: int) -> int:
        """The source index of example position `index` (reads no window)."""
        p = self._phase(index)
        return self._mixes[p][index - self._starts[p]][0]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        p = self._phase(index)
        k, position = self._mixes[p][index - self._starts[p]]
        return k, int(self._orders[k][position])

    def __str__(self) -> str:
        return f"MixtureOrder(sources={self._n_sources}, phases={len(self._starts)})"
