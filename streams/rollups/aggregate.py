"""The aggregate of one rollup series (streams/rollups/processor.py) and of one sender's partial in the merge
(streams/rollups/merge.py): count, sum, min, max and a DDSketch state (``zeros``, values the mapping cannot
index, and ``bins``, counts by bin key of the ``LogarithmicMapping`` of bus/sketch.py).

One update path each: :meth:`Aggregate.add` (one value), :meth:`Aggregate.add_column` (the values of a
column chunk, with their bin keys computed over the whole column by numpy), :meth:`Aggregate.merge` (another
aggregate: a child bucket, a JobTimings summary, a partial). The columnar and per-record folds give the same
aggregate bit for bit: sums are added in value order, min and max kept by the same comparisons.

Stored form (state entries, the changelog's JSON): the positional list ``[count, sum, min, max, zeros,
{bin key: count}]`` that rollup entries have always held, so state written before this type existed loads
as it is (:meth:`Aggregate.to_state`, :meth:`Aggregate.from_state`).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import reduce
from math import ceil, log
from typing import Any

from ddsketch.mapping import LogarithmicMapping

__all__ = ["Aggregate", "bins_of", "quantile_of_bins"]


@dataclass(slots=True)
class Aggregate:
    count: int
    sum: float
    min: float
    max: float
    zeros: float
    """Values counted in the zero bin: zero, negative, or too small for the mapping to index."""
    bins: dict[int, float]
    """Bin key -> count; the dict is the aggregate's own (``from_state`` shares the stored one)."""

    @classmethod
    def starting_at(cls, x: float) -> Aggregate:
        """An empty aggregate whose min and max start at ``x``, the first value it will take."""
        return cls(0, 0.0, x, x, 0, {})

    @classmethod
    def from_state(cls, stored: Sequence[Any]) -> Aggregate:
        """The aggregate of a stored ``[count, sum, min, max, zeros, bins]``; bin keys restored from JSON
        are strings again."""
        count, total, low, high, zeros, bins = stored
        if bins and type(next(iter(bins))) is str:
            bins = {int(key): weight for key, weight in bins.items()}
        return cls(count, total, low, high, zeros, bins)

    def to_state(self) -> list[Any]:
        """The stored form (module doc)."""
        return [self.count, self.sum, self.min, self.max, self.zeros, self.bins]

    def copy(self) -> Aggregate:
        return Aggregate(self.count, self.sum, self.min, self.max, self.zeros, dict(self.bins))

    def add(self, x: float, multiplier: float, min_indexable: float) -> None:
        """One value. ``multiplier`` and ``min_indexable`` are the mapping's: the key is ddsketch's
        ``LogarithmicMapping.key``, inlined (the same float operations)."""
        self.count += 1
        self.sum += x
        if x < self.min:
            self.min = x
        elif x > self.max:
            self.max = x
        if x > min_indexable:
            bins = self.bins
            key = ceil(log(x, 2) * multiplier)
            bins[key] = bins.get(key, 0) + 1
        else:
            self.zeros += 1

    def add_column(self, xs: list[float], keys: list[int]) -> None:
        """The values ``xs`` in order (not empty), as :meth:`add` of each would take them; ``keys`` are the
        bin keys of those above the mapping's ``min_indexable``, in order, the rest count as zeros."""
        self.count += len(xs)
        self.sum = reduce(operator.add, xs, self.sum)
        least = min(xs)
        if least < self.min:
            self.min = least
        most = max(xs)
        if most > self.max:
            self.max = most
        self.zeros += len(xs) - len(keys)
        bins = self.bins
        get = bins.get
        for key in keys:
            bins[key] = get(key, 0) + 1

    def merge(self, other: Aggregate, rebin: Callable[[int], int] | None = None) -> None:
        """Add ``other`` in; ``rebin`` maps its bin keys to ours when its sketch has another accuracy."""
        self.count += other.count
        self.sum += other.sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.zeros += other.zeros
        bins = self.bins
        get = bins.get
        if rebin is None:
            for key, weight in other.bins.items():
                bins[key] = get(key, 0) + weight
        else:
            for key, weight in other.bins.items():
                mine = rebin(key)
                bins[mine] = get(mine, 0) + weight

    def sketch_and_p95(self, mapping: LogarithmicMapping) -> tuple[list[int], list[float], float]:
        """The sketch's ascending keys and their counts, and the p95 clamped to [min, max] (the true p95
        lies within them; clamping only brings the estimate closer)."""
        bins = self.bins
        keys = sorted(bins)
        counts = [float(bins[key]) for key in keys]
        p95 = quantile_of_bins(mapping, self.zeros, keys, counts, 0.95)
        return keys, counts, self.max if p95 is None else min(max(p95, self.min), self.max)


def bins_of(keys: Sequence[int], counts: Sequence[float]) -> dict[int, float]:
    """A sketch's parallel key and count arrays as bins (a key listed twice adds up)."""
    bins: dict[int, float] = {}
    get = bins.get
    for key, weight in zip(keys, counts, strict=True):
        bins[key] = get(key, 0) + weight
    return bins


def quantile_of_bins(
    mapping: LogarithmicMapping, zeros: float, keys: list[int], counts: list[float], q: float
) -> float | None:
    """The ``q`` quantile of a sketch given as ascending bin keys and their counts, exactly as
    ``ddsketch.DDSketch.get_quantile_value`` (and so ``bus.sketch.quantile``) answers for the same bins:
    the first bin whose running count exceeds the rank ``q * (n - 1)``. Walked from the top, where a high
    quantile is found sooner."""
    stored = sum(counts)
    total = zeros + stored
    if total <= 0:
        return None
    rank = q * (total - 1)
    if rank < zeros or not keys:
        return 0.0
    # running(i) > rank - zeros  <=>  (counts above i) < stored - (rank - zeros)
    limit = stored - (rank - zeros)
    above = 0.0
    found = len(keys) - 1
    for index in range(len(keys) - 1, -1, -1):
        if above >= limit:
            break
        found = index
        above += counts[index]
    return float(mapping.value(keys[found]))
