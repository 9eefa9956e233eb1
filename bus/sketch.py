"""The mergeable quantile sketch carried in ``JobTimings.sketch`` and in rollups: a DDSketch
(github.com/DataDog/sketches-py) of non-negative values, and its mapping to and from the Avro ``Sketch``
record.

Error bound: with relative accuracy ``alpha`` (default 0.01), every quantile the sketch answers is within
``alpha`` of the true value, relatively: ``|quantile(s, q) - x_q| <= alpha * x_q``, where ``x_q`` is the
value of rank ``floor(q * (n - 1))`` among the ``n`` values added (0-based, ascending). The bound holds
after any number of merges and Avro round trips, because merging only adds counts of identical bins; that
is what lets p95 cascade from hourly to yearly rollups (S1).

Memory: one bin per factor ``(1 + alpha) / (1 - alpha)`` of range actually covered (at most about 750
bins from 1 ms to 1 h at 1 %), capped at ``BIN_LIMIT`` bins; beyond the cap the lowest bins collapse,
which loses accuracy on the lowest quantiles only (high ones such as p95 keep the bound), and the cap is
reached only by a dynamic range above 10^17.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from ddsketch.ddsketch import BaseDDSketch
from ddsketch.mapping import LogarithmicMapping
from ddsketch.store import CollapsingLowestDenseStore

__all__ = [
    "BIN_LIMIT",
    "DEFAULT_RELATIVE_ACCURACY",
    "Sketch",
    "add",
    "avro_of",
    "from_avro",
    "merge",
    "merge_avro",
    "new_sketch",
    "quantile",
    "to_avro",
]

DEFAULT_RELATIVE_ACCURACY = 0.01
BIN_LIMIT = 2048
Sketch = BaseDDSketch
"""Every sketch built here is a DDSketch with a logarithmic mapping (offset 0) and collapsing dense stores,
the same shape as ``ddsketch.LogCollapsingLowestDenseDDSketch``."""


def new_sketch(relative_accuracy: float = DEFAULT_RELATIVE_ACCURACY) -> Sketch:
    """An empty sketch; ``relative_accuracy`` in (0, 1) is the error bound of every quantile."""
    return _build(relative_accuracy, 0.0, (), ())


def add(sketch: Sketch, value: float, weight: float = 1.0) -> None:
    """Add one value (a duration: finite and >= 0). Zero, and values too small for the mapping, count in
    the zero bin and answer 0. Negative values raise ValueError rather than landing in a store the Avro
    record cannot carry."""
    if not (value >= 0.0 and math.isfinite(value)):
        raise ValueError(f"sketch values must be finite and >= 0, got {value!r}")
    sketch.add(value, weight)


def quantile(sketch: Sketch, q: float) -> float | None:
    """The value at quantile ``q`` (0..1), within the sketch's relative accuracy; None when empty."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be within 0 and 1, got {q!r}")
    value = sketch.get_quantile_value(q)
    return None if value is None else float(value)


def merge(*sketches: Sketch) -> Sketch:
    """A new sketch holding the values of all ``sketches`` (left unchanged). They must share one relative
    accuracy: bins of different widths do not line up, and re-binning would break the error bound."""
    if not sketches:
        raise ValueError("merge needs at least one sketch")
    accuracy = _accuracy(sketches[0])
    zero_count = 0.0
    totals: dict[int, float] = {}
    for sketch in sketches:
        if _accuracy(sketch) != accuracy:
            raise ValueError(f"cannot merge sketches of relative accuracy {accuracy} and {_accuracy(sketch)}")
        zero_count += float(sketch._zero_count)
        for key, count in _bins(sketch):
            totals[key] = totals.get(key, 0.0) + count
    keys = sorted(totals)
    return _build(accuracy, zero_count, keys, [totals[key] for key in keys])


def to_avro(sketch: Sketch) -> dict[str, Any]:
    """The Avro ``Sketch`` record: relative_accuracy, zero_count, and the non-empty bins as parallel
    ``keys``/``counts`` arrays in ascending key order."""
    keys: list[int] = []
    counts: list[float] = []
    for key, count in _bins(sketch):
        keys.append(key)
        counts.append(count)
    return {
        "relative_accuracy": _accuracy(sketch),
        "zero_count": float(sketch._zero_count),
        "keys": keys,
        "counts": counts,
    }


def from_avro(record: Mapping[str, Any]) -> Sketch:
    """The sketch an Avro ``Sketch`` record describes. It answers quantiles exactly as the sketch that was
    written; its ``sum``, ``min`` and ``max`` are not carried (records keep them in their own fields)."""
    keys, counts = record["keys"], record["counts"]
    if len(keys) != len(counts):
        raise ValueError(f"sketch has {len(keys)} keys but {len(counts)} counts")
    if record["zero_count"] < 0 or any(not count >= 0 for count in counts):
        raise ValueError("sketch counts must be >= 0")
    return _build(float(record["relative_accuracy"]), float(record["zero_count"]), keys, counts)


def avro_of(
    values: Iterable[float], weight: float = 1.0, relative_accuracy: float = DEFAULT_RELATIVE_ACCURACY
) -> dict[str, Any]:
    """The Avro ``Sketch`` record of ``values``, each of weight ``weight``: the same record as adding them
    to :func:`new_sketch` and calling :func:`to_avro`, several times faster because it skips the store
    (for generators such as the simulator)."""
    if not weight > 0:
        raise ValueError(f"weight must be > 0, got {weight!r}")
    mapping = LogarithmicMapping(relative_accuracy)
    zero_count = 0.0
    totals: dict[int, float] = {}
    for value in values:
        if not (value >= 0.0 and math.isfinite(value)):
            raise ValueError(f"sketch values must be finite and >= 0, got {value!r}")
        if value > mapping.min_possible:
            key = mapping.key(value)
            totals[key] = totals.get(key, 0.0) + weight
        else:
            zero_count += weight
    keys = sorted(totals)
    return {
        "relative_accuracy": float(relative_accuracy),
        "zero_count": zero_count,
        "keys": keys,
        "counts": [totals[key] for key in keys],
    }


def merge_avro(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Merge Avro ``Sketch`` records into one (what a rollup does per bucket)."""
    return to_avro(merge(*(from_avro(record) for record in records)))


def _build(
    relative_accuracy: float, zero_count: float, keys: Iterable[int], counts: Iterable[float]
) -> Sketch:
    store = CollapsingLowestDenseStore(BIN_LIMIT)
    for key, count in zip(keys, counts, strict=True):
        if count:
            store.add(int(key), float(count))
    # The base class counts zero_count and the stores' weights into the sketch's count.
    return BaseDDSketch(
        mapping=LogarithmicMapping(relative_accuracy),
        store=store,
        negative_store=CollapsingLowestDenseStore(BIN_LIMIT),
        zero_count=zero_count,
    )


def _bins(sketch: BaseDDSketch) -> Iterator[tuple[int, float]]:
    """The non-empty bins of the positive store, ascending. Works for any DDSketch of the same mapping
    shape (plain ``DDSketch`` too), not only those built here."""
    # ddsketch has no public accessor for its bins; its own protobuf codec reads the same attributes.
    mapping = sketch._mapping
    if not isinstance(mapping, LogarithmicMapping) or mapping._offset != 0:
        raise ValueError("only sketches with a LogarithmicMapping of offset 0 fit the Avro Sketch record")
    if sketch._negative_store.count:
        raise ValueError("the sketch holds negative values, which the Avro Sketch record cannot carry")
    store = sketch._store
    for index, count in enumerate(store.bins):
        if count:
            yield store.offset + index, float(count)


def _accuracy(sketch: BaseDDSketch) -> float:
    return float(sketch._mapping.relative_accuracy)
