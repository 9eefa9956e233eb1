"""Codec.encode with the compiled Avro writers (bus/avro_writer.py) against fastavro's writer alone, on the
same values in the same run.

For each record kind a pool of distinct values (every value has its own timestamps, so with the default
8192 of them the writer's caches of recent large longs and strings do not help, except for a Rollup's
bucket start and end, which all the series of a bucket share; ``--pool 16`` shows them helping) is
encoded in a loop, once by a plain ``Codec()`` and once by one whose writers have no
compiled writer, which is exactly the codec before it; the two take turns, and each one's best of
``--repeat`` rounds counts. Needs no services.

    .venv/bin/python bench/avro_writer.py [--records 100000] [--repeat 5] [--pool 8192] [--append] [--out F]
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.machine import machine  # noqa: E402
from bus import schemas  # noqa: E402
from bus.codec import Codec  # noqa: E402

T = 1_772_409_600_000  # 2026-03-02T00:00Z in epoch milliseconds
HOSTS = [f"gpu-node-{i:02d}" for i in range(16)]


def rollup(rng: random.Random, i: int, keys: int) -> dict[str, Any]:
    host, gpu = HOSTS[i % 16], str(i % 8)
    first = rng.randint(200, 260)
    return {
        "series": f'gpu_power_watts{{gpu="{gpu}",host="{host}"}}',
        "metric": "gpu_power_watts",
        "labels": {"gpu": gpu, "host": host},
        "tier": "hour",
        "bucket_start": T,
        "bucket_end": T + 3_600_000,
        "count": rng.randint(1, 3600),
        "min": rng.uniform(50, 100),
        "max": rng.uniform(500, 700),
        "sum": rng.uniform(1e5, 1e6),
        "avg": rng.uniform(100, 500),
        "p95": rng.uniform(400, 600),
        "sketch": {
            "relative_accuracy": 0.01,
            "zero_count": 0.0,
            "keys": list(range(first, first + keys)),
            "counts": [float(rng.randint(1, 100)) for _ in range(keys)],
        },
        "final": False,
        "watermark": T + 1_800_000 + i,
        "source": "stream",
    }


def anomaly(rng: random.Random, i: int) -> dict[str, Any]:
    host, gpu = HOSTS[i % 16], str(i % 8)
    return {
        "time": T + i * 1000,
        "series": f'gpu_temperature_celsius{{gpu="{gpu}",host="{host}"}}',
        "metric": "gpu_temperature_celsius",
        "labels": {"gpu": gpu, "host": host},
        "value": rng.uniform(80, 95),
        "expected": rng.uniform(60, 70),
        "score": rng.uniform(4, 9),
        "method": "ewma_zscore",
        "source": "stream",
    }


def alert(rng: random.Random, i: int) -> dict[str, Any]:
    host, gpu = HOSTS[i % 16], str(i % 8)
    resolved = i % 2 == 1
    return {
        "fingerprint": f"{rng.getrandbits(64):016x}",
        "rule": "gpu_temperature_high",
        "status": "resolved" if resolved else "firing",
        "severity": "critical",
        "starts_at": T + i * 1000,
        "ends_at": T + i * 1000 + 60_000 if resolved else None,
        "event_time": T + i * 1000 + 500,
        "value": rng.uniform(85, 95),
        "labels": {"gpu": gpu, "host": host, "team": "media"},
        "annotations": {"summary": f"GPU {gpu} on {host} is hot", "runbook": "https://runbooks/gpu-hot"},
        "channels": ["webhook", "slack"],
        "source": "stream",
    }


def gpu_sample(rng: random.Random, i: int) -> dict[str, Any]:
    """A fast-interval sample as the GPU collector sends it: every field, the slow ones null."""
    value = dict.fromkeys(field["name"] for field in schemas.load("GpuSample")["fields"])
    value.update(
        time=T + i * 1000,
        host=HOSTS[i % 16],
        gpu=i % 8,
        gpu_uuid=f"GPU-{rng.getrandbits(128):032x}",
        gpu_model="NVIDIA H100 80GB HBM3",
        source="nvml",
        interval_group="fast",
        utilization_percent=rng.uniform(0, 100),
        memory_used_bytes=rng.randint(1 << 30, 80 << 30),
        memory_total_bytes=85_520_809_984,
        memory_utilization_percent=rng.uniform(0, 100),
        memory_bandwidth_utilization_percent=rng.uniform(0, 100),
        temperature_celsius=rng.uniform(30, 80),
        power_watts=rng.uniform(60, 700),
        tensor_core_utilization_percent=rng.uniform(0, 100),
        pcie_tx_bytes_per_second=rng.uniform(0, 1e10),
        pcie_rx_bytes_per_second=rng.uniform(0, 1e10),
        energy_joules=rng.uniform(1e6, 1e9),
        sm_clock_hz=1_980_000_000,
        memory_clock_hz=2_619_000_000,
    )
    return value


CASES: list[tuple[str, str, Callable[[random.Random, int], dict[str, Any]]]] = [
    ("Rollup, 30 sketch keys", "Rollup", lambda rng, i: rollup(rng, i, 30)),
    ("Rollup, empty sketch", "Rollup", lambda rng, i: rollup(rng, i, 0)),
    ("Anomaly", "Anomaly", anomaly),
    ("AlertEvent", "AlertEvent", alert),
    ("GpuSample (fast interval)", "GpuSample", gpu_sample),
]


def fastavro_only() -> Codec:
    codec = Codec()
    for name in schemas.names():
        codec.local_writer(name).__dict__["body_writer"] = None  # as the codec was before
    return codec


def seconds(codec: Codec, name: str, pool: list[dict[str, Any]], rounds: int) -> float:
    encode = codec.encode
    gc.collect()
    start = time.perf_counter()
    for _ in range(rounds):
        for value in pool:
            encode(name, value)
    return time.perf_counter() - start


def per_record_us(
    codecs: tuple[Codec, Codec], name: str, pool: list[dict[str, Any]], records: int, repeat: int
) -> tuple[float, float]:
    """Best time per record of each codec; the two alternate, so a machine that slows down or speeds up
    during the run affects both alike."""
    rounds = max(1, records // len(pool))
    best = [float("inf"), float("inf")]
    for _ in range(repeat):
        for i, codec in enumerate(codecs):
            best[i] = min(best[i], seconds(codec, name, pool, rounds))
    return best[0] / (rounds * len(pool)) * 1e6, best[1] / (rounds * len(pool)) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000, help="values encoded per round and codec")
    parser.add_argument("--repeat", type=int, default=5, help="rounds; the fastest counts")
    parser.add_argument("--pool", type=int, default=8192, help="distinct values per record kind")
    parser.add_argument(
        "--out", type=Path, default=REPO / "bench" / "results" / f"avro_writer-{date.today()}.md"
    )
    parser.add_argument("--append", action="store_true", help="add the report to --out, not replace it")
    args = parser.parse_args(argv)

    fast, plain = Codec(), fastavro_only()
    lines = [
        f"## Codec.encode, compiled writers against fastavro, {date.today()}",
        "",
        f"Machine: {machine()}.",
        f"Command: `.venv/bin/python bench/avro_writer.py --records {args.records} --repeat {args.repeat} "
        f"--pool {args.pool}`: {args.records:,} records per round, best of {args.repeat}, "
        f"{args.pool:,} distinct values per kind.",
        "",
        "| record | fastavro µs | compiled µs | speed-up |",
        "|---|---:|---:|---:|",
    ]
    print("\n".join(lines))
    for label, name, make in CASES:
        rng = random.Random(1)
        pool = [make(rng, i) for i in range(args.pool)]
        write = fast.local_writer(name).body_writer
        assert write is not None
        for value in pool:
            write(value)  # raises for a value it leaves to fastavro: this would then time fastavro twice
            if fast.encode(name, value) != plain.encode(name, value):
                raise SystemExit(f"{label}: the compiled writer's bytes differ from fastavro's")
        baseline, compiled = per_record_us((plain, fast), name, pool, args.records, args.repeat)
        lines.append(f"| {label} | {baseline:.2f} | {compiled:.2f} | {baseline / compiled:.1f}x |")
        print(lines[-1])
    report = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.append and args.out.exists():
        report = args.out.read_text() + "\n" + report
    args.out.write_text(report)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
