"""bench/peers.py's judge of the peers: the aggregate the peers share (bench/peer_rollup.py) against an exact
computation and DDSketch itself, and ``check`` catching each kind of wrong rollup."""

from __future__ import annotations

import random

from ddsketch import DDSketch

from bench.peer_rollup import Rollup
from bench.peers import Exact, check, gauge_fields

ACCURACY = 0.01


def _values(seed: int) -> list[float]:
    rng = random.Random(seed)
    # Zeros (an idle GPU's utilisation) and large ints (bytes) as well as fractions.
    fractions = [rng.uniform(0, 100) for _ in range(300)]
    return [0.0] * 7 + fractions + [rng.randrange(1, 80 * 2**30) for _ in range(50)]


def _rows(values: list[float]) -> tuple[list[dict], dict]:
    rollup = Rollup(ACCURACY)
    state = rollup.start()
    exact = Exact()
    for x in values:
        rollup.add(state, x)
        exact.count += 1
        exact.total += x
        exact.low = min(exact.low, x)
        exact.high = max(exact.high, x)
        exact.values.append(x)
    key = ("host-1/GPU-a", "utilization_percent", 3_600_000)
    row = {"key": key[0], "field": key[1], "hour": key[2], **rollup.result(state)}
    return [row], {key: exact}


def test_the_shared_aggregate_is_exact_and_its_p95_is_ddsketchs() -> None:
    for seed in range(5):
        values = _values(seed)
        rows, expected = _rows(values)
        assert check("peer", rows, expected, ACCURACY) == []
        sketch = DDSketch(ACCURACY)
        for x in values:
            sketch.add(x)
        assert rows[0]["p95"] == sketch.get_quantile_value(0.95)
        assert rows[0]["count"] == len(values) and rows[0]["max"] == max(values)


def test_check_names_each_kind_of_wrong_rollup() -> None:
    rows, expected = _rows(_values(1))
    row = rows[0]
    exact_p95 = next(iter(expected.values())).p95()
    cases = {
        "count": {**row, "count": row["count"] + 1},
        "min": {**row, "min": row["min"] + 0.5},
        "mean": {**row, "mean": row["mean"] * (1 + 1e-6)},
        "p95": {**row, "p95": exact_p95 * 1.02},
    }
    for stat, wrong in cases.items():
        problems = check("peer", [wrong], expected, ACCURACY)
        assert len(problems) == 1 and f": {stat} " in problems[0], (stat, problems)
    assert "missing" in check("peer", [], expected, ACCURACY)[0]
    extra = {**row, "hour": row["hour"] + 3_600_000}
    assert "not in the records" in check("peer", [row, extra], expected, ACCURACY)[0]
    assert "twice" in check("peer", [row, row], expected, ACCURACY)[0]


def test_the_series_are_the_catalogues_gpu_gauges() -> None:
    fields = gauge_fields()
    assert "utilization_percent" in fields and "power_watts" in fields
    # A counter and the per-process metric are not gauges of the GPU.
    assert "energy_joules" not in fields and "processes[].used_memory_bytes" not in fields
