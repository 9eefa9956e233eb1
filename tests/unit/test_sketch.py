"""The mergeable sketch (bus/sketch.py): error bound after merges and Avro round trips, zeros, negatives."""

from __future__ import annotations

import math
import random

import pytest
from ddsketch import DDSketch

from bus import sketch
from bus.codec import Codec


def exact_quantile(values: list[float], q: float) -> float:
    """The value DDSketch's bound refers to: rank floor(q * (n - 1)) of the sorted values."""
    return sorted(values)[math.floor(q * (len(values) - 1))]


def durations(seed: int, n: int) -> list[float]:
    rng = random.Random(seed)
    # Frame times around 40 ms with a heavy tail, as real jobs show.
    return [rng.lognormvariate(math.log(0.04), 0.6) for _ in range(n)]


def test_merged_halves_answer_p95_within_one_percent() -> None:
    values = durations(1, 20_000)
    first, second = sketch.new_sketch(0.01), sketch.new_sketch(0.01)
    for value in values[:10_000]:
        sketch.add(first, value)
    for value in values[10_000:]:
        sketch.add(second, value)
    merged = sketch.merge(first, second)
    assert merged.count == len(values)
    for q in (0.5, 0.95, 0.99):
        exact = exact_quantile(values, q)
        answer = sketch.quantile(merged, q)
        assert answer is not None
        assert abs(answer - exact) <= 0.01 * exact, (q, answer, exact)
    # merge makes a new sketch and leaves its inputs alone.
    assert first.count == 10_000 and second.count == 10_000


def test_avro_round_trip_preserves_every_answer() -> None:
    values = durations(2, 5_000) + [0.0] * 50
    original = sketch.new_sketch()
    for value in values:
        sketch.add(original, value)
    record = sketch.to_avro(original)
    assert record["relative_accuracy"] == 0.01
    assert record["zero_count"] == 50.0
    assert record["keys"] == sorted(record["keys"])
    assert sum(record["counts"]) + record["zero_count"] == len(values)

    codec = Codec()
    timings = {
        "time": 0, "interval_start": 0, "job_id": "j", "project": "p", "kind": "frame", "count": len(values),
        "sum_seconds": sum(values), "min_seconds": 0.0, "max_seconds": max(values), "sketch": record,
        "source": "test",
    }  # fmt: skip
    _, decoded = codec.decode(codec.encode("JobTimings", timings))
    restored = sketch.from_avro(decoded["sketch"])
    for q in (0.0, 0.01, 0.25, 0.5, 0.9, 0.95, 0.999, 1.0):
        assert sketch.quantile(restored, q) == sketch.quantile(original, q)
    assert restored.count == original.count
    assert sketch.to_avro(restored) == record


def test_merge_avro_equals_merging_sketches() -> None:
    parts = [durations(seed, 1_000) for seed in (3, 4, 5)]
    built = []
    for values in parts:
        one = sketch.new_sketch()
        for value in values:
            sketch.add(one, value)
        built.append(one)
    merged_record = sketch.merge_avro(sketch.to_avro(one) for one in built)
    assert merged_record == sketch.to_avro(sketch.merge(*built))
    every = [value for values in parts for value in values]
    p95 = sketch.quantile(sketch.from_avro(merged_record), 0.95)
    assert p95 is not None and abs(p95 - exact_quantile(every, 0.95)) <= 0.01 * exact_quantile(every, 0.95)


def test_zeros_and_tiny_values_count_as_zero() -> None:
    one = sketch.new_sketch()
    for _ in range(90):
        sketch.add(one, 0.0)
    for _ in range(10):
        sketch.add(one, 2.0)
    assert sketch.quantile(one, 0.5) == 0.0
    assert sketch.quantile(one, 1.0) == pytest.approx(2.0, rel=0.01)
    assert sketch.to_avro(one)["zero_count"] == 90.0


@pytest.mark.parametrize("bad", [-1e-9, -3.0, math.nan, math.inf])
def test_negative_and_non_finite_values_raise(bad: float) -> None:
    one = sketch.new_sketch()
    with pytest.raises(ValueError):
        sketch.add(one, bad)
    assert one.count == 0


def test_empty_sketch_and_bad_quantiles() -> None:
    empty = sketch.new_sketch()
    assert sketch.quantile(empty, 0.95) is None
    assert sketch.to_avro(empty) == {"relative_accuracy": 0.01, "zero_count": 0.0, "keys": [], "counts": []}
    with pytest.raises(ValueError):
        sketch.quantile(empty, 1.5)


def test_merging_different_accuracies_is_refused() -> None:
    with pytest.raises(ValueError, match="relative accuracy"):
        sketch.merge(sketch.new_sketch(0.01), sketch.new_sketch(0.02))
    with pytest.raises(ValueError):
        sketch.merge()


def test_a_plain_ddsketch_maps_too_but_not_with_negatives() -> None:
    plain = DDSketch(0.01)
    for value in durations(6, 500):
        plain.add(value)
    ours = sketch.from_avro(sketch.to_avro(plain))
    assert sketch.quantile(ours, 0.95) == pytest.approx(plain.get_quantile_value(0.95))
    plain.add(-1.0)
    with pytest.raises(ValueError, match="negative"):
        sketch.to_avro(plain)


def test_malformed_records_are_refused() -> None:
    with pytest.raises(ValueError):
        sketch.from_avro({"relative_accuracy": 0.01, "zero_count": 0.0, "keys": [1, 2], "counts": [1.0]})
    with pytest.raises(ValueError):
        sketch.from_avro({"relative_accuracy": 0.01, "zero_count": 0.0, "keys": [1], "counts": [-1.0]})


def test_avro_of_equals_adding_to_a_sketch() -> None:
    values = [*durations(7, 300), 0.0, 5e-324]
    one = sketch.new_sketch()
    for value in values:
        sketch.add(one, value, 2.5)
    assert sketch.avro_of(values, 2.5) == sketch.to_avro(one)
    with pytest.raises(ValueError):
        sketch.avro_of([-1.0])
