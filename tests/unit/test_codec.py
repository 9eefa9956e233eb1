"""The Avro codec: framings, schema resolution, errors."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest

from bus import schemas
from bus.codec import Codec
from bus.errors import (
    DecodeError,
    EncodeError,
    IncompatibleSchema,
    NotAvro,
    SchemaLogUnavailable,
    SchemaRegistryUnavailable,
    TruncatedRecord,
    UnknownFingerprint,
    UnknownSchema,
    UnknownSchemaId,
)
from bus.settings import Settings

T0 = datetime(2025, 3, 14, 9, 26, 53, 589000, tzinfo=UTC)
QUEUE = {"time": T0, "queue": "gpu-large", "length_jobs": 17, "source": "simulator"}
GPU = {
    "time": T0, "host": "gpu-node-07", "gpu": 0, "gpu_uuid": "GPU-1", "gpu_model": "NVIDIA H100 80GB HBM3",
    "source": "nvml", "interval_group": "fast", "utilization_percent": 50.0,
}  # fmt: skip

# -- CRC-64-AVRO, written from the Avro specification ("Schema Fingerprints"), independent of fastavro ----
_EMPTY = 0xC15D213AA4D7A795


def _fp_table() -> list[int]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (_EMPTY & -(fp & 1))
        table.append(fp)
    return table


_TABLE = _fp_table()


def crc64_avro(data: bytes) -> int:
    fp = _EMPTY
    for byte in data:
        fp = (fp >> 8) ^ _TABLE[(fp ^ byte) & 0xFF]
    return fp


def test_crc64_matches_the_spec_test_vector() -> None:
    # share/test/data/schema-tests.txt of Apache Avro: the fingerprint of "null".
    assert crc64_avro(b'"null"') == 7195948357588979594


@pytest.mark.parametrize(("name", "value"), [("QueueSample", QUEUE), ("GpuSample", GPU)])
def test_single_object_header(name: str, value: dict[str, Any]) -> None:
    data = Codec().encode(name, value)
    expected = crc64_avro(schemas.canonical_form(schemas.raw(name)).encode()).to_bytes(8, "little")
    assert data[:2] == b"\xc3\x01"
    assert data[2:10] == expected == schemas.fingerprint(name)


def test_timestamps_accept_epoch_millis_and_come_back_as_utc_datetimes() -> None:
    codec = Codec()
    millis = int(T0.timestamp() * 1000)
    _, value = codec.decode(codec.encode("QueueSample", {**QUEUE, "time": millis}))
    assert value["time"] == T0 and value["time"].tzinfo is not None


# -- schema evolution (T3) ------------------------------------------------------------------------------


def _queue_v2() -> dict[str, Any]:
    """QueueSample plus an optional field with a default, as a later version might add."""
    schema = copy.deepcopy(schemas.raw("QueueSample"))
    schema["fields"].append(
        {"name": "priority", "type": ["null", "string"], "default": None, "doc": "Queue priority; unit: none"}
    )
    return schema


def test_old_reader_reads_a_newer_writer() -> None:
    new = Codec(schemas=[_queue_v2()])
    data = new.encode("QueueSample", {**QUEUE, "priority": "high"})
    old = Codec()
    with pytest.raises(UnknownFingerprint) as raised:
        old.decode(data)  # single-object records only name a fingerprint: the reader must know the schema
    assert raised.value.fingerprint == data[2:10]
    old.register_writer(_queue_v2())
    name, value = old.decode(data)
    assert name == "aima.metrics.QueueSample"
    assert value == QUEUE  # the new field is skipped


def test_new_reader_fills_the_default_for_an_older_writer() -> None:
    data = Codec().encode("QueueSample", QUEUE)
    new = Codec(schemas=[_queue_v2()])
    new.register_writer(schemas.raw("QueueSample"))
    _, value = new.decode(data)
    assert value == {**QUEUE, "priority": None}


class FakeSchemaLog:
    """The schema log's two calls, answered from memory (the real one: tests/integration)."""

    def __init__(self, *, acknowledge: bool = True) -> None:
        self.schemas: dict[bytes, str] = {}
        self.published: list[bytes] = []
        self.lookups: list[bytes] = []
        self.acknowledge = acknowledge
        self.down = False

    def publish(self, fingerprint: bytes, schema_json: str) -> bool:
        self.published.append(fingerprint)
        self.schemas[fingerprint] = schema_json
        return self.acknowledge

    def lookup(self, fingerprint: bytes) -> str | None:
        self.lookups.append(fingerprint)
        if self.down:
            raise SchemaLogUnavailable("schemas topic is away")
        return self.schemas.get(fingerprint)

    def flush(self, timeout_s: float) -> int:
        return 0 if self.acknowledge else len(self.published)


def test_old_reader_learns_a_newer_writer_from_the_schema_log() -> None:
    log = FakeSchemaLog()
    new = Codec(schemas=[_queue_v2()], schema_log=log)
    data = new.encode("QueueSample", {**QUEUE, "priority": "high"})
    new.encode("QueueSample", {**QUEUE, "priority": "low"})
    assert log.published == [data[2:10]]  # published once, before the first record
    old = Codec(schema_log=log)
    assert old.decode(data) == ("aima.metrics.QueueSample", QUEUE)
    assert old.decode(data)[1] == QUEUE
    assert log.lookups == [data[2:10]]  # then cached
    old.decode(Codec().encode("QueueSample", QUEUE))
    assert log.lookups == [data[2:10]]  # our own schemas never ask the log


def test_new_reader_learns_an_older_writer_from_the_schema_log() -> None:
    log = FakeSchemaLog()
    data = Codec(schema_log=log).encode("QueueSample", QUEUE)
    new = Codec(schemas=[_queue_v2()], schema_log=log)
    assert new.decode(data)[1] == {**QUEUE, "priority": None}  # the new field's default


def test_unacknowledged_schemas_are_published_again_until_they_are() -> None:
    log = FakeSchemaLog(acknowledge=False)
    codec = Codec(schema_log=log)
    codec.encode("QueueSample", QUEUE)
    codec.encode("QueueSample", QUEUE)
    assert len(log.published) == 2
    log.acknowledge = True
    codec.encode("QueueSample", QUEUE)
    codec.encode("aima.metrics.QueueSample", QUEUE)  # another spelling asks the log (it knows it) once
    codec.encode("QueueSample", QUEUE)
    assert len(log.published) == 4


def test_a_fingerprint_the_log_lacks_is_unknown_and_an_outage_is_transient() -> None:
    log = FakeSchemaLog()
    data = b"\xc3\x01" + bytes(8) + Codec().encode("QueueSample", QUEUE)[10:]
    with pytest.raises(UnknownFingerprint, match="schemas topic") as raised:
        Codec(schema_log=log).decode(data)
    assert not raised.value.transient
    log.down = True
    with pytest.raises(SchemaLogUnavailable) as outage:
        Codec(schema_log=log).decode(data)
    assert outage.value.transient and isinstance(outage.value, DecodeError)


def test_a_log_schema_under_the_wrong_fingerprint_is_not_used() -> None:
    log = FakeSchemaLog()
    data = Codec(schemas=[_queue_v2()]).encode("QueueSample", QUEUE)
    log.schemas[data[2:10]] = schemas.schema_json("QueueSample")  # a schema that is not that one
    with pytest.raises(UnknownFingerprint):
        Codec(schema_log=log).decode(data)


def test_the_confluent_format_registers_instead_of_publishing() -> None:
    log = FakeSchemaLog()
    Codec(FakeRegistry(), schema_log=log).encode("QueueSample", QUEUE, topic="aima.queue.samples")
    assert log.published == []


def test_decode_as_a_named_reader() -> None:
    codec = Codec()
    with pytest.raises(UnknownSchema):
        codec.decode(codec.encode("QueueSample", QUEUE), reader="NoSuchRecord")
    assert codec.decode(codec.encode("QueueSample", QUEUE), reader="aima.metrics.QueueSample")[1] == QUEUE


# -- bad input ------------------------------------------------------------------------------------------


def test_unknown_fingerprint() -> None:
    data = b"\xc3\x01" + bytes(8) + Codec().encode("QueueSample", QUEUE)[10:]
    with pytest.raises(UnknownFingerprint, match="0000000000000000") as raised:
        Codec().decode(data)
    assert isinstance(raised.value, DecodeError) and not raised.value.transient
    assert raised.value.reason


@pytest.mark.parametrize("data", [b"", b"hello world", b'{"queue": "a"}', b"\xff" * 40, b"\xc3"])
def test_garbage_is_not_avro(data: bytes) -> None:
    with pytest.raises(NotAvro):
        Codec().decode(data)


def test_trailing_bytes_are_not_avro() -> None:
    codec = Codec()
    with pytest.raises(NotAvro, match="bytes left"):
        codec.decode(codec.encode("QueueSample", QUEUE) + b"\x00\x00")


def test_a_body_that_does_not_fit_is_not_avro() -> None:
    codec = Codec()
    header = codec.encode("QueueSample", QUEUE)[:10]
    with pytest.raises(DecodeError):
        codec.decode(header + b"\x02" + b"\xff\xfe\xfd" * 5)  # invalid UTF-8 in the queue name


@pytest.mark.parametrize("cut", [1, 5, 9])
def test_truncated_header(cut: int) -> None:
    data = Codec().encode("GpuSample", GPU)
    with pytest.raises((TruncatedRecord, NotAvro)):
        Codec().decode(data[:cut])


@pytest.mark.parametrize("cut", [10, 11, 20, -1])
def test_truncated_body(cut: int) -> None:
    data = Codec().encode("GpuSample", GPU)
    with pytest.raises(TruncatedRecord):
        Codec().decode(data[:cut])


def test_encode_errors_name_the_field() -> None:
    codec = Codec()
    with pytest.raises(EncodeError, match="length_jobs"):
        codec.encode("QueueSample", {**QUEUE, "length_jobs": "many"})
    with pytest.raises(EncodeError, match="queue"):
        codec.encode("QueueSample", {k: v for k, v in QUEUE.items() if k != "queue"})
    with pytest.raises(EncodeError, match="lenght_jobs"):
        codec.encode("QueueSample", {**QUEUE, "lenght_jobs": 3})  # a typo is not silently dropped
    with pytest.raises(EncodeError, match="utilization_percent"):
        codec.encode("GpuSample", {**GPU, "utilization_percent": "high"})
    with pytest.raises(ValueError):  # EncodeError is a ValueError for callers that only know those
        codec.encode("JobEvent", {"time": T0, "event": "exploded"})
    with pytest.raises(UnknownSchema):
        codec.encode("NoSuchRecord", {})


def test_optional_fields_may_be_left_out() -> None:
    codec = Codec()
    _, value = codec.decode(codec.encode("GpuSample", GPU))
    assert value["tensor_core_utilization_percent"] is None  # null: not measured, never 0


def test_validate_catches_out_of_range_ints() -> None:
    with pytest.raises(EncodeError, match="length_jobs"):
        Codec(validate=True).encode("QueueSample", {**QUEUE, "length_jobs": 2**40})


# -- Confluent wire format ------------------------------------------------------------------------------


@dataclass
class _Registered:
    schema_str: str
    schema_type: str = "AVRO"


class FakeRegistry:
    """The two calls of the Schema Registry HTTP client the codec makes, answered from memory."""

    def __init__(self) -> None:
        self.by_id: dict[int, _Registered] = {}
        self.subjects: dict[str, int] = {}
        self.calls: list[str] = []
        self.down = False

    def register_schema(self, subject_name: str, schema: Any) -> int:
        self.calls.append(f"register {subject_name}")
        if self.down:
            raise ConnectionError("registry is down")
        for schema_id, known in self.by_id.items():
            if known.schema_str == schema.schema_str:
                self.subjects[subject_name] = schema_id
                return schema_id
        schema_id = 100 + len(self.by_id)
        self.by_id[schema_id] = _Registered(schema.schema_str)
        self.subjects[subject_name] = schema_id
        return schema_id

    def get_schema(self, schema_id: int) -> _Registered:
        self.calls.append(f"get {schema_id}")
        if self.down:
            raise ConnectionError("registry is down")
        if schema_id not in self.by_id:
            error = LookupError(f"schema {schema_id} not found")
            error.http_status_code = 404  # type: ignore[attr-defined]
            raise error
        return self.by_id[schema_id]


def test_confluent_frame_round_trip_through_the_registry() -> None:
    registry = FakeRegistry()
    writer = Codec(registry)
    assert writer.wire_format == "confluent"
    data = writer.encode("QueueSample", QUEUE, topic="aima.queue.samples")
    writer.encode("QueueSample", QUEUE, topic="aima.queue.samples")
    assert registry.calls == ["register aima.queue.samples-value"]  # registered once, then cached
    schema_id = registry.subjects["aima.queue.samples-value"]
    assert data[:1] == b"\x00" and int.from_bytes(data[1:5], "big") == schema_id

    reader = Codec(registry, confluent=False)  # writes single-object, still reads Confluent frames
    assert reader.decode(data) == ("aima.metrics.QueueSample", QUEUE)
    assert reader.decode(data) == ("aima.metrics.QueueSample", QUEUE)
    assert registry.calls.count(f"get {schema_id}") == 1
    assert reader.encode("QueueSample", QUEUE)[:2] == b"\xc3\x01"
    assert writer.decode(reader.encode("QueueSample", QUEUE))[1] == QUEUE  # and vice versa


def test_confluent_frame_of_a_newer_writer_resolves_to_our_schema() -> None:
    registry = FakeRegistry()
    data = Codec(registry, schemas=[_queue_v2()]).encode(
        "QueueSample", {**QUEUE, "priority": "low"}, topic="aima.queue.samples"
    )
    assert Codec(registry).decode(data)[1] == QUEUE


def test_confluent_errors() -> None:
    registry = FakeRegistry()
    data = Codec(registry).encode("QueueSample", QUEUE, topic="t")
    with pytest.raises(SchemaRegistryUnavailable) as raised:
        Codec().decode(data)  # no registry configured: a configuration problem, not an outage
    assert not raised.value.transient
    with pytest.raises(UnknownSchemaId):
        Codec(registry).decode(b"\x00\x00\x00\x03\xe7" + data[5:])
    with pytest.raises(EncodeError, match="topic"):
        Codec(registry).encode("QueueSample", QUEUE)
    registry.down = True
    with pytest.raises(SchemaRegistryUnavailable) as raised:
        Codec(registry).decode(data)
    assert raised.value.transient
    with pytest.raises(SchemaRegistryUnavailable):
        Codec(registry).encode("QueueSample", QUEUE, topic="other")
    with pytest.raises(TruncatedRecord):
        Codec(registry).decode(data[:3])


def test_from_settings_picks_the_wire_format() -> None:
    assert Codec.from_settings(Settings()).wire_format == "single-object"
    with_registry = Settings(SCHEMA_REGISTRY_URL="http://127.0.0.1:1")  # the client connects lazily
    assert Codec.from_settings(with_registry).wire_format == "confluent"
    with pytest.raises(ValueError):
        Codec(confluent=True)


def test_a_reader_that_needs_a_field_the_writer_lacks_is_incompatible() -> None:
    strict = copy.deepcopy(schemas.raw("QueueSample"))
    strict["fields"].append({"name": "priority", "type": "string", "doc": "No default; unit: none"})
    reader = Codec(schemas=[strict])
    reader.register_writer(schemas.raw("QueueSample"))
    with pytest.raises(IncompatibleSchema, match="QueueSample"):
        reader.decode(Codec().encode("QueueSample", QUEUE))
