"""bus.frames: the native columnar read gives exactly what Codec.decode gives, record for record, and leaves
every record it cannot vouch for to Codec.decode."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta

import pytest

from bus import schemas
from bus.codec import SINGLE_OBJECT_HEADER_LEN, Codec
from bus.frames import FrameDecoder, FrameDecoders, UnsupportedSchema, _long
from producers.simulator import Fleet, generate
from tests.unit.test_codec import GPU, QUEUE, FakeRegistry

START = datetime(2026, 11, 29, tzinfo=UTC)

READ_NATIVELY = (
    "GpuSample",
    "SystemSample",
    "QueueSample",
    "PodStatus",
    "DeadLetter",
    "JobTimings",
    "JobEvent",
    "CostRecord",
    "GpuEnergy",
)
"""Every record kind polars reads (maps are left to fastavro; a record's own enums are read as ints)."""


@pytest.fixture(scope="module")
def simulated() -> dict[str, list[bytes]]:
    """Ten simulated minutes of a 16-GPU fleet, encoded, by record name."""
    codec = Codec()
    by_name: dict[str, list[bytes]] = defaultdict(list)
    fleet = Fleet(seed=7, hosts=2, gpus_per_host=8, start=START)
    for _topic, _key, name, value in generate(fleet, START, START + timedelta(minutes=10), 5):
        by_name[name].append(codec.encode(name, value))
    return by_name


@pytest.mark.parametrize("name", READ_NATIVELY)
def test_columns_equal_codec_decode(name: str, simulated: dict[str, list[bytes]]) -> None:
    codec = Codec()
    made = {"DeadLetter": _dead_letter, "CostRecord": cost_record, "GpuEnergy": _gpu_energy}  # nor these
    values = simulated.get(name) or [codec.encode(name, made[name](i)) for i in range(50)]
    assert len(values) >= 8
    frame = FrameDecoder(codec, name).decode(values)
    assert frame.columns is not None and frame.rest == []
    assert frame.rows == list(range(len(values)))
    assert frame.columns.to_dicts() == [codec.decode(value)[1] for value in values]
    records = frame.records()
    assert records == [codec.decode(value)[1] for value in values]
    assert all(record["time"].tzinfo is UTC for record in records)


def _gpu_energy(i: int) -> dict[str, object]:
    """Energy known and unknown (null), priced and not."""
    fields = [f["name"] for f in schemas.load("GpuEnergy")["fields"]]
    value: dict[str, object] = dict.fromkeys(fields)
    value.update(
        time=START + timedelta(hours=i),
        period_end=START + timedelta(hours=i + 1),
        gpu_uuid=f"GPU-{i % 8}",
        gpu_model="NVIDIA H100 80GB HBM3",
        device_hours=(i % 4) / 4,
        energy_kwh=i / 10 if i % 3 else None,
        energy_cost_eur=i / 30 if i % 6 == 1 else None,
        currency="EUR",
        source="stream",
    )
    return {k: v for k, v in value.items() if k in fields}


def cost_record(i: int) -> dict[str, object]:
    """Every kind, and the nullable pricing enum null and set."""
    kinds = next(f["type"]["symbols"] for f in schemas.load("CostRecord")["fields"] if f["name"] == "kind")
    fields = [f["name"] for f in schemas.load("CostRecord")["fields"]]
    value: dict[str, object] = dict.fromkeys(fields)
    value.update(
        time=START + timedelta(hours=i),
        period_end=START + timedelta(hours=i + 1),
        kind=kinds[i % len(kinds)],
        pricing=[None, "on_demand", "spot"][i % 3],
        project=f"p{i % 4}" if i % 5 else None,
        gpu_hours=i / 7 if i % 2 else None,
        currency="EUR",
        source="test",
    )
    return value


def _dead_letter(i: int) -> dict[str, object]:
    return {
        "time": START + timedelta(seconds=i),
        "stage": "stream",
        "origin_topic": "aima.gpu.samples",
        "origin_partition": i % 4,
        "origin_offset": i * 1000,
        "key": None if i % 3 else f"k{i}".encode(),
        "value": bytes(range(i % 256)) if i % 2 else None,
        "reason": "é" * i,
        "error_type": "LateSample",
        "source": "test",
    }


def test_schemas_polars_cannot_read_are_unsupported() -> None:
    codec = Codec()
    supported = set()
    for name in schemas.names():
        try:
            FrameDecoder(codec, name)
        except UnsupportedSchema:
            continue
        supported.add(name.rsplit(".", 1)[-1])
    # Maps (AlertEvent, Anomaly, Rollup) are left to fastavro; the record's own enums are read as ints.
    assert supported == set(READ_NATIVELY)


def test_an_enum_index_out_of_range_sends_the_batch_to_codec_decode() -> None:
    codec = Codec()
    values = [codec.encode("CostRecord", cost_record(i)) for i in range(20)]
    body = bytearray(values[3])
    assert FrameDecoder(codec, "CostRecord").decode(values).columns is not None
    good = codec.decode(values[3])[1]
    # Rewrite the kind's index (the varint after time and period_end) to one past the last symbol.
    prefix = _long(int(good["time"].timestamp() * 1000)) + _long(int(good["period_end"].timestamp() * 1000))
    kind_at = SINGLE_OBJECT_HEADER_LEN + len(prefix)
    assert bytes(body[SINGLE_OBJECT_HEADER_LEN:kind_at]) == prefix
    kinds = next(f["type"]["symbols"] for f in schemas.load("CostRecord")["fields"] if f["name"] == "kind")
    body[kind_at : kind_at + 1] = _long(len(kinds))
    values[3] = bytes(body)
    frame = FrameDecoder(codec, "CostRecord").decode(values)
    assert frame.columns is None and frame.rest == list(range(20))


def _gpu(i: int) -> bytes:
    value = dict(GPU, time=GPU["time"] + timedelta(seconds=i), gpu=i, utilization_percent=float(i))
    return Codec().encode("GpuSample", value)


@pytest.mark.parametrize(
    "spoil",
    [
        pytest.param(lambda data: data + b"\x00", id="a byte left over"),
        pytest.param(lambda data: data[:-1], id="a byte missing"),
        pytest.param(lambda data: data[:10] + b"\xff" * (len(data) - 10), id="garbage body"),
        pytest.param(lambda data: data[:-9] + b"\x02" + data[-8:], id="a null made a value"),
    ],
)
def test_one_bad_record_sends_the_batch_to_codec_decode(spoil) -> None:  # type: ignore[no-untyped-def]
    values = [_gpu(i) for i in range(40)]
    values[17] = spoil(values[17])
    frame = FrameDecoder(Codec(), "GpuSample").decode(values)
    # Never wrong values: either nothing was read here, or (when the spoilt bytes still are a valid
    # record of the same length) every row equals what Codec.decode reads.
    if frame.columns is None:
        assert frame.rest == list(range(40))
    else:
        assert frame.columns.to_dicts() == [Codec().decode(value)[1] for value in values]


def test_other_framings_and_writers_are_left_to_codec_decode() -> None:
    codec = Codec()
    values = [_gpu(i) for i in range(20)]
    values[3] = b""
    values[5] = codec.encode("QueueSample", QUEUE)  # another writer schema
    values[8] = b"\x00\x00\x00\x00\x63" + values[8][10:]  # Confluent frame of an id nobody registered
    values[9] = None  # type: ignore[call-overload]
    frame = FrameDecoder(codec, "GpuSample").decode(values)
    assert frame.rest == [3, 5, 8, 9]
    assert frame.rows == [i for i in range(20) if i not in (3, 5, 8, 9)]
    assert frame.columns is not None
    assert frame.columns["gpu"].to_list() == frame.rows


def test_confluent_frames_of_our_own_schema_are_read() -> None:
    registry = FakeRegistry()
    codec = Codec(registry)
    values = [codec.encode("GpuSample", dict(GPU, gpu=i), topic="aima.gpu.samples") for i in range(12)]
    frame = FrameDecoder(codec, "GpuSample").decode(values)
    assert frame.rest == [] and frame.columns is not None
    assert frame.columns["gpu"].to_list() == list(range(12))


def test_small_batches_are_left_to_codec_decode() -> None:
    frame = FrameDecoder(Codec(), "GpuSample").decode([_gpu(i) for i in range(3)])
    assert frame.columns is None and frame.rest == [0, 1, 2]


@pytest.mark.parametrize("where", [0, 17, 39])
def test_a_record_with_a_byte_left_over_is_caught_anywhere(where: int) -> None:
    """polars' reader ignores what is left at the end of a block; the marker after each record does not."""
    values = [_gpu(i) for i in range(40)]
    values[where] += b"\x00"
    frame = FrameDecoder(Codec(), "GpuSample").decode(values)
    assert frame.columns is None and frame.rest == list(range(40))


def test_frame_decoders_make_each_once_and_none_where_unsupported() -> None:
    decoders = FrameDecoders(Codec())
    gpu = decoders.get("aima.metrics.GpuSample")
    assert isinstance(gpu, FrameDecoder) and decoders.get("aima.metrics.GpuSample") is gpu
    assert decoders.get("aima.metrics.Rollup") is None  # a map: decoded one by one
