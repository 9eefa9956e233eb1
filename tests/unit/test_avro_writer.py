"""bus.avro_writer: the compiled writers write fastavro's bytes exactly, and every value they refuse still
encodes (or fails) through Codec.encode exactly as it did with fastavro alone."""

from __future__ import annotations

import io
import math
import random
from collections import OrderedDict
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from enum import StrEnum
from itertools import islice
from typing import Any

import fastavro
import pytest

from bus import avro_writer, schemas
from bus.avro_writer import compile_writer
from bus.codec import Codec
from bus.errors import EncodeError
from producers.simulator import Fleet, generate
from tests.unit.test_codec import FakeRegistry

START = datetime(2026, 3, 2, tzinfo=UTC)
T = 1772409600000  # START in epoch milliseconds
NAMES = [name.rsplit(".", 1)[-1] for name in schemas.names()]


def fastavro_body(parsed: dict[str, Any], value: Any) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, parsed, value, strict_allow_default=True)
    return out.getvalue()


def compiled(name: str) -> Callable[[Any], bytes]:
    writer = Codec().local_writer(name).body_writer
    assert writer is not None
    return writer


@pytest.fixture(scope="module")
def plain() -> Codec:
    """A codec that writes with fastavro alone, as before the compiled writers."""
    codec = Codec()
    for name in NAMES:
        codec.local_writer(name).__dict__["body_writer"] = None
    return codec


def outcome(codec: Codec, name: str, value: Any) -> bytes | str:
    try:
        return codec.encode(name, value)
    except EncodeError as exc:
        return f"EncodeError: {exc}"


# -- random values of any schema -------------------------------------------------------------------------

ZONES = [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))]
TEXTS = [
    "",
    "a",
    "gpu-node-07",
    "é",
    "naïve \u2013 ünïcode ✓ 漢字 🙂",
    "x" * 127,
    "y" * 128,
    "z" * 9000,
    "\x00",
]


def random_long(rng: random.Random, bits: int) -> int:
    top = 1 << (bits - 1)
    return rng.choice(
        [
            rng.randint(-64, 63),
            rng.randint(-9000, 20000),
            rng.randint(-top, top - 1),
            rng.randint(-(1 << 20), 1 << 20),
            -top,
            top - 1,
            0,
            -1,
        ]
    )


def random_double(rng: random.Random) -> float | int:
    choices: list[float | int] = [
        rng.uniform(-1e6, 1e6),
        rng.random(),
        math.nan,
        math.inf,
        -math.inf,
        -0.0,
        5e-324,
        1.7976931348623157e308,
        rng.randint(-1000, 1000),  # an int for a double: fastavro writes float(value)
        2**53 + 1,
    ]
    return rng.choice(choices)


def random_timestamp(rng: random.Random) -> int | datetime:
    millis = rng.choice([T + rng.randint(-(10**9), 10**9), 0, -1, rng.randint(-(10**12), 10**13)])
    if rng.random() < 0.5:
        return millis
    at = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=millis, microseconds=rng.randint(0, 999))
    return at.astimezone(rng.choice(ZONES))


def random_value(schema: Any, rng: random.Random, named: dict[str, Any], in_union: bool = False) -> Any:
    """Any value fastavro writes for ``schema`` without filling a default: exact types inside unions,
    where fastavro's validator picks the branch; lists or tuples for arrays elsewhere."""
    if isinstance(schema, list):
        if rng.random() < 0.3:
            return None
        (other,) = [branch for branch in schema if branch != "null"]
        return random_value(other, rng, named, in_union=True)
    if isinstance(schema, str) and schema in named:
        return random_value(named[schema], rng, named, in_union)
    kind = schema if isinstance(schema, str) else schema["type"]
    logical = None if isinstance(schema, str) else schema.get("logicalType")
    if logical == "timestamp-millis":
        return random_timestamp(rng)
    if kind == "null":
        return None
    if kind == "boolean":
        return rng.random() < 0.5
    if kind in ("int", "long"):
        return random_long(rng, 32 if kind == "int" else 64)
    if kind in ("double", "float"):
        return random_double(rng)
    if kind == "string":
        return rng.choice(TEXTS) + str(rng.randint(0, 10**6))
    if kind == "bytes":
        return rng.randbytes(rng.choice([0, 1, 200, 20000]))
    if kind == "enum":
        return rng.choice(schema["symbols"])
    if kind == "array":
        items = [
            random_value(schema["items"], rng, named, in_union) for _ in range(rng.choice([0, 1, 3, 70, 300]))
        ]
        return tuple(items) if not in_union and rng.random() < 0.2 else items
    if kind == "map":
        size = rng.choice([0, 1, 3, 70])
        return {
            rng.choice(TEXTS) + str(i): random_value(schema["values"], rng, named, in_union)
            for i in range(size)
        }
    if kind == "record":
        return {
            field["name"]: random_value(field["type"], rng, named, in_union) for field in schema["fields"]
        }
    raise AssertionError(f"no random values for {schema!r}")


def random_values(name: str, seed: int, count: int) -> Iterator[dict[str, Any]]:
    parsed = schemas.load(name)
    rng = random.Random(seed)
    for _ in range(count):
        yield random_value(parsed, rng, parsed["__named_schemas"])


# -- byte equality ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_every_schema_compiles(name: str) -> None:
    assert Codec().local_writer(name).body_writer is not None


@pytest.mark.parametrize("name", NAMES)
def test_random_values_write_fastavros_bytes(name: str) -> None:
    parsed, write = schemas.load(name), compiled(name)
    for value in random_values(name, seed=len(name), count=300):
        assert write(value) == fastavro_body(parsed, value), value


def rollup(keys: list[int], **changes: Any) -> dict[str, Any]:
    value = {
        "series": 'gpu_power_watts{gpu="0",host="gpu-node-07"}',
        "metric": "gpu_power_watts",
        "labels": {"gpu": "0", "host": "gpu-node-07"},
        "tier": "hour",
        "bucket_start": T,
        "bucket_end": T + 3_600_000,
        "count": 3600,
        "min": 101.5,
        "max": 612.25,
        "sum": 1_234_567.5,
        "avg": 342.9,
        "p95": 598.1,
        "sketch": {
            "relative_accuracy": 0.01,
            "zero_count": 0.0,
            "keys": keys,
            "counts": [float(i % 7 + 1) for i in range(len(keys))],
        },
        "final": False,
        "watermark": T + 1_800_000,
        "source": "stream",
    }
    return {**value, **changes}


@pytest.mark.parametrize(
    "value",
    [
        rollup([]),
        rollup(list(range(230, 260))),
        rollup(list(range(-700, 9000, 7))),  # negative keys, keys past the precomputed ones, a 2-byte count
        rollup([-(2**31), 2**31 - 1], count=2**63 - 1, min=-0.0, max=math.inf, p95=math.nan),
        rollup([1], count=0, avg=0, sum=12, final=True, tier="year", labels={}),
        rollup([1], bucket_start=START, bucket_end=START + timedelta(hours=1), watermark=T - 1),
        rollup([], labels={"név": "Zoë 🙂", "": ""}, series="", source="ü" * 5000),
    ],
)
def test_rollups_write_fastavros_bytes(value: dict[str, Any]) -> None:
    assert compiled("Rollup")(value) == fastavro_body(schemas.load("Rollup"), value)


def test_simulated_records_encode_as_with_fastavro(plain: Codec) -> None:
    codec = Codec()
    fleet = Fleet(seed=3, hosts=2, gpus_per_host=4, start=START)
    seen: set[str] = set()
    records = generate(fleet, START, START + timedelta(hours=2), 5.0)
    for _topic, _key, name, value in islice(records, 6000):
        seen.add(name)
        parsed = schemas.load(name)
        assert codec.encode(name, value) == plain.encode(name, value)
        # Collectors leave out fields that default to null (fastavro fills them); the compiled writer
        # wants every field, as the real GPU collector sends them.
        full = {field["name"]: value.get(field["name"], field.get("default")) for field in parsed["fields"]}
        assert compiled(name)(full) == fastavro_body(parsed, value)
    assert {"GpuSample", "SystemSample", "JobEvent", "JobTimings", "QueueSample", "PodStatus"} <= seen


def test_many_large_longs_and_strings_outlive_the_caches() -> None:
    parsed, write = schemas.load("QueueSample"), compiled("QueueSample")
    rng = random.Random(5)
    for i in range(3 * avro_writer._CACHE_MAX):
        value = {
            "time": T + i * 1000,
            "queue": f"q{i % (avro_writer._CACHE_MAX + 7)}",
            "length_jobs": rng.randint(-(2**31), 2**31 - 1),
            "source": "s",
        }
        assert write(value) == fastavro_body(parsed, value)


BOUNDARIES = sorted(
    {sign * (1 << bits) + delta for bits in range(64) for sign in (1, -1) for delta in (-1, 0, 1)}
    | {-(1 << 63), (1 << 63) - 1}
)


def test_longs_at_every_varint_boundary() -> None:
    longs = [x for x in BOUNDARIES if -(1 << 63) <= x < 1 << 63]
    ints = [x for x in longs if -(1 << 31) <= x < 1 << 31]
    rollups, letters = schemas.load("Rollup"), schemas.load("DeadLetter")
    for x in longs:
        value = rollup(ints, count=x, bucket_start=x, watermark=-x if x > -(1 << 63) else x)
        assert compiled("Rollup")(value) == fastavro_body(rollups, value)
        letter = dead_letter(origin_offset=x, time=x)
        assert compiled("DeadLetter")(letter) == fastavro_body(letters, letter)


@pytest.mark.parametrize("n", [63, 64, 8191, 8192, 8193, 16384])
def test_lengths_and_counts_at_the_precomputed_limit(n: int) -> None:
    letter = dead_letter(key=bytes(n), reason="é" * (n // 2) + "x" * (n % 2), source="s" * n)
    assert compiled("DeadLetter")(letter) == fastavro_body(schemas.load("DeadLetter"), letter)
    value = alert(channels=["c"] * n, labels={str(i): "" for i in range(n)}, value=None)
    assert compiled("AlertEvent")(value) == fastavro_body(schemas.load("AlertEvent"), value)
    sketch = rollup(list(range(n)))
    assert compiled("Rollup")(sketch) == fastavro_body(schemas.load("Rollup"), sketch)


def test_datetimes_in_any_zone_and_before_the_epoch() -> None:
    parsed, write = schemas.load("QueueSample"), compiled("QueueSample")
    instants = [
        datetime(1969, 12, 31, 23, 59, 59, 999500, tzinfo=UTC),
        datetime(1900, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
        datetime(2026, 3, 2, 9, 26, 53, 589999, tzinfo=UTC),
        datetime(9999, 12, 30, 23, 59, 59, 999999, tzinfo=UTC),
    ]
    for at in instants:
        for zone in ZONES:
            value = {"time": at.astimezone(zone), "queue": "q", "length_jobs": 1, "source": "s"}
            assert write(value) == fastavro_body(parsed, value)


# -- what the fast path refuses ---------------------------------------------------------------------------


def alert(**changes: Any) -> dict[str, Any]:
    value = {
        "fingerprint": "f1",
        "rule": "gpu_hot",
        "status": "firing",
        "severity": "critical",
        "starts_at": T,
        "ends_at": None,
        "event_time": T,
        "value": 91.5,
        "labels": {"host": "a"},
        "annotations": {},
        "channels": ["webhook"],
        "source": "stream",
    }
    return {**value, **changes}


def without(value: dict[str, Any], field: str) -> dict[str, Any]:
    return {k: v for k, v in value.items() if k != field}


def dead_letter(**changes: Any) -> dict[str, Any]:
    value = {
        "time": T,
        "stage": "stream",
        "origin_topic": "aima.gpu.samples",
        "origin_partition": 3,
        "origin_offset": 10,
        "key": b"k",
        "value": b"v",
        "reason": "r",
        "error_type": "E",
        "source": "test",
    }
    return {**value, **changes}


def pod(**changes: Any) -> dict[str, Any]:
    value = {"time": T, "namespace": "n", "pod": "p", "host": None, "phase": "Running", "ready": True}
    return {**value, "restarts": 0, "source": "s", **changes}


def cost(**changes: Any) -> dict[str, Any]:
    value = {field["name"]: field.get("default") for field in schemas.load("CostRecord")["fields"]}
    return {**value, "time": T, "period_end": T + 3_600_000, "kind": "gpu_hours", "source": "s", **changes}


def gpu(**changes: Any) -> dict[str, Any]:
    value = dict.fromkeys(field["name"] for field in schemas.load("GpuSample")["fields"])
    value.update(time=T, host="h", gpu=0, gpu_uuid="u", gpu_model="m", source="s", interval_group="fast")
    return {**value, **changes}


REFUSED = [
    ("missing field", "Rollup", without(rollup([]), "count")),
    ("missing field with a default", "AlertEvent", without(alert(), "ends_at")),
    ("missing currency", "CostRecord", {"time": T, "period_end": T, "kind": "budget", "source": "s"}),
    ("unknown field", "Rollup", {**rollup([]), "cuont": 3}),
    ("unknown and missing", "Rollup", {**without(rollup([]), "count"), "cuont": 3}),
    ("str for a double", "Rollup", rollup([], min="1.5")),
    ("None for a double", "Rollup", rollup([], min=None)),
    ("None for a string", "Rollup", rollup([], source=None)),
    ("bytes for a string", "Rollup", rollup([], source=b"s")),
    ("float for a long", "Rollup", rollup([], count=3.7)),
    ("whole float for a long", "Rollup", rollup([], count=3.0)),
    ("whole float in an int array", "Rollup", rollup([1.0, 2])),
    ("bool for a long", "Rollup", rollup([], count=True)),
    ("bool in an int array", "Rollup", rollup([True])),
    ("complex for a long", "Rollup", rollup([], count=1 + 0j)),
    ("complex in an int array", "Rollup", rollup([1 + 0j])),
    ("whole float timestamp", "Rollup", rollup([], bucket_start=float(T))),
    ("complex timestamp", "Rollup", rollup([], bucket_start=complex(T))),
    ("str for a long", "Rollup", rollup([], count="3")),
    ("str for a boolean", "Rollup", rollup([], final="no")),
    ("unknown enum symbol", "Rollup", rollup([], tier="week")),
    ("long too large", "Rollup", rollup([], count=2**63)),
    ("long too small", "Rollup", rollup([], count=-(2**63) - 1)),
    ("array key too large", "Rollup", rollup([2**63])),
    ("int field out of range", "PodStatus", pod(restarts=2**40)),
    ("int union out of range", "DeadLetter", dead_letter(origin_partition=2**31)),
    ("bool in a double union", "AlertEvent", alert(value=True)),
    ("str in a double union", "AlertEvent", alert(value="1")),
    ("float in a long union", "DeadLetter", dead_letter(origin_offset=1.0)),
    ("str in a bytes union", "DeadLetter", dead_letter(key="k")),
    ("tuple in a string union", "CostRecord", cost(project=("string", "news"))),
    ("tuple naming no branch", "CostRecord", cost(project=("long", 3))),
    ("memoryview in a bytes union", "DeadLetter", dead_letter(key=memoryview(b"k"))),
    ("naive datetime", "AlertEvent", alert(starts_at=datetime(2026, 3, 2, 1, 2, 3, 4000))),
    ("naive datetime in a union", "AlertEvent", alert(ends_at=datetime(2026, 3, 2, 1, 2, 3))),
    ("float timestamp", "AlertEvent", alert(starts_at=1.5)),
    ("date timestamp", "AlertEvent", alert(starts_at=START.date())),
    ("non-str map key", "AlertEvent", alert(labels={1: "a"})),
    ("non-str map value", "AlertEvent", alert(labels={"a": 1})),
    ("None for a map", "AlertEvent", alert(labels=None)),
    ("list for a map", "AlertEvent", alert(labels=[])),
    ("OrderedDict map", "AlertEvent", alert(labels=OrderedDict(a="1", b="2"))),
    ("set for an array", "AlertEvent", alert(channels={"webhook"})),
    ("str for an array", "AlertEvent", alert(channels="webhook")),
    ("None for an array", "AlertEvent", alert(channels=None)),
    ("tuple in an array union", "GpuSample", gpu(xid_errors=(1, 2))),
    ("OrderedDict record", "AlertEvent", OrderedDict(alert())),
    ("list for the record", "AlertEvent", list(alert())),
]


@pytest.mark.parametrize(("why", "name", "value"), REFUSED, ids=[case[0] for case in REFUSED])
def test_refused_values_encode_or_fail_as_before(why: str, name: str, value: Any, plain: Codec) -> None:
    with pytest.raises(Exception):  # noqa: B017 - any exception sends the value to fastavro
        compiled(name)(value)
    assert outcome(Codec(), name, value) == outcome(plain, name, value)


# Outside unions fastavro's writer converts these itself; the compiled writer writes the same bytes.
CONVERTED = [
    ("bool for a double", rollup([], min=True)),
    ("int for a boolean", rollup([], final=1)),
    ("float for a boolean", rollup([], final=0.0)),
    ("ints for doubles", rollup([1, 2], min=0, max=2**60)),
    (
        "tuples for arrays",
        rollup([], sketch={"relative_accuracy": 0.01, "zero_count": 1, "keys": (1, 2), "counts": (1, 2.5)}),
    ),
    ("str subclass", rollup([], source=type("Name", (str,), {})("stream"))),
    ("StrEnum symbol", rollup([], tier=StrEnum("Tier", ["hour", "day"]).day)),
]


@pytest.mark.parametrize(("why", "value"), CONVERTED, ids=[case[0] for case in CONVERTED])
def test_values_fastavro_converts_write_its_bytes(why: str, value: Any, plain: Codec) -> None:
    assert compiled("Rollup")(value) == fastavro_body(schemas.load("Rollup"), value)
    assert outcome(Codec(), "Rollup", value) == outcome(plain, "Rollup", value)


def test_refusals_keep_the_codecs_messages() -> None:
    value = rollup([], min="x", count=3.5, source=None)
    for validate in (False, True):
        fast, slow = Codec(validate=validate), Codec(validate=validate)
        slow.local_writer("Rollup").__dict__["body_writer"] = None
        with pytest.raises(EncodeError) as caught:
            fast.encode("Rollup", value)
        assert outcome(slow, "Rollup", value) == f"EncodeError: {caught.value}"
        assert "count is 3.5 but must be long" in str(caught.value)


def test_confluent_framing_is_unchanged() -> None:
    fast, slow = Codec(FakeRegistry()), Codec(FakeRegistry())
    slow.local_writer("Rollup").__dict__["body_writer"] = None
    value = rollup([1, 2, 3])
    assert fast.encode("Rollup", value, topic="t") == slow.encode("Rollup", value, topic="t")


# -- schemas beyond avro/ -------------------------------------------------------------------------------


def parse(fields: list[dict[str, Any]], name: str = "test.R") -> dict[str, Any]:
    return fastavro.parse_schema({"type": "record", "name": name, "fields": fields})


@pytest.mark.parametrize(
    "field_type",
    [
        ["null", "string", "long"],
        ["string", "long"],
        ["null"],
        {"type": "int", "logicalType": "date"},
        {"type": "string", "logicalType": "uuid"},
        {"type": "bytes", "logicalType": "decimal", "precision": 5, "scale": 2},
        {"type": "array", "items": ["null", "int", "double"]},
    ],
)
def test_unhandled_schemas_compile_to_none(field_type: Any) -> None:
    assert compile_writer(parse([{"name": "f", "type": field_type}])) is None


def test_other_types_write_fastavros_bytes() -> None:
    """float, fixed, timestamp-micros, arrays of records, maps of arrays, unions with null second, and a
    recursive record: none is in avro/ today."""
    parsed = parse(
        [
            {"name": "f", "type": "float"},
            {"name": "fs", "type": {"type": "array", "items": "float"}},
            {"name": "fx", "type": {"type": "fixed", "name": "test.Four", "size": 4}},
            {"name": "fx2", "type": ["test.Four", "null"]},
            {"name": "us", "type": {"type": "long", "logicalType": "timestamp-micros"}},
            {"name": "b", "type": ["boolean", "null"]},
            {"name": "ls", "type": {"type": "array", "items": "long"}},
            {"name": "m", "type": {"type": "map", "values": {"type": "array", "items": "double"}}},
            {"name": "mu", "type": ["null", {"type": "map", "values": "boolean"}]},
            {"name": "r", "type": {"type": "array", "items": {
                "type": "record", "name": "test.Item", "fields": [
                    {"name": "s", "type": "string"}, {"name": "d", "type": ["null", "double"]}]}}},
            {"name": "next", "type": ["null", "test.R"]},
        ]
    )  # fmt: skip
    write = compile_writer(parsed)
    assert write is not None
    rng = random.Random(11)

    def value(depth: int) -> dict[str, Any]:
        return {
            "f": rng.choice([1.5, -2, 3.4028234663852886e38, math.nan, 0.1]),
            "fs": [rng.random() for _ in range(rng.choice([0, 2, 100]))],
            "fx": rng.randbytes(4),
            "fx2": rng.choice([None, b"abcd"]),
            "us": rng.choice([T * 1000 + 7, datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), START]),
            "b": rng.choice([True, False, None]),
            "ls": [random_long(rng, 64) for _ in range(rng.choice([0, 5, 80]))],
            "m": {f"k{i}": [rng.random(), i] for i in range(rng.choice([0, 2]))},
            "mu": rng.choice([None, {}, {"a": True, "ü": False}]),
            "r": [{"s": "é" * i, "d": rng.choice([None, 1.25, 7])} for i in range(rng.choice([0, 3]))],
            "next": value(depth + 1) if depth < 3 and rng.random() < 0.7 else None,
        }

    for _ in range(300):
        v = value(0)
        assert write(v) == fastavro_body(parsed, v), v
    refused = [
        {**value(3), "fx": b"abc"},  # fastavro: a ValueError of its own
        {**value(3), "mu": {"a": 1}},  # a union: fastavro's validator wants a bool
        {**value(3), "next": {**value(3), "extra": 1}},
    ]
    for v in refused:
        with pytest.raises(Exception):  # noqa: B017
            write(v)
