"""Avro codec for every Kafka value (T1-T3).

Encoding writes one of two framings, both naming the writer schema on the wire (T2):
- Avro single-object encoding (default, no registry): ``C3 01`` + 8-byte CRC-64-AVRO fingerprint
  (little-endian) + body.
- Confluent wire format when a Schema Registry is configured: ``00`` + 4-byte big-endian schema id + body;
  the writer schema is registered under subject ``<topic>-value`` (TopicNameStrategy).

Decoding accepts both framings whatever the configuration, and resolves the writer schema to the reader
schema (by default our own schema of the same name), so a reader keeps working when a writer adds an
optional field with a default, and a new reader fills the default when reading old records (T3).

A single-object reader knows the writer schemas of ``avro/`` and ``avro/history/``; with a schema log
(bus/schema_log.py, the compacted schemas topic; :meth:`Codec.from_settings` always gives one) it learns
any other fingerprint from there, once, and every writer publishes a schema there before its first record
written with it. Known fingerprints stay one dict lookup, and so does finding the writer to encode with.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from io import BytesIO
from typing import TYPE_CHECKING, Any, Protocol

import fastavro
from fastavro.read import SchemaResolutionError
from fastavro.schema import SchemaParseException
from fastavro.validation import ValidationError, validate

from bus import schemas as contract
from bus.avro_writer import compile_writer
from bus.errors import (
    EncodeError,
    IncompatibleSchema,
    NotAvro,
    SchemaRegistryUnavailable,
    TruncatedRecord,
    UnknownFingerprint,
    UnknownSchema,
    UnknownSchemaId,
)

if TYPE_CHECKING:
    from bus.schema_log import SchemaSource
    from bus.settings import Settings

__all__ = [
    "CONFLUENT_HEADER_LEN",
    "CONFLUENT_MAGIC",
    "SINGLE_OBJECT_HEADER_LEN",
    "SINGLE_OBJECT_MAGIC",
    "Codec",
    "RegistryClient",
]

SINGLE_OBJECT_MAGIC = b"\xc3\x01"
CONFLUENT_MAGIC = b"\x00"
SINGLE_OBJECT_HEADER_LEN = len(SINGLE_OBJECT_MAGIC) + 8
"""Magic and the 8-byte fingerprint: the body starts here."""
CONFLUENT_HEADER_LEN = len(CONFLUENT_MAGIC) + 4
"""Magic and the 4-byte schema id: the body starts here."""

# What fastavro raises for a value that does not fit (wrong type, missing or extra field, bad enum symbol).
_WRITE_ERRORS = (TypeError, ValueError, KeyError, AttributeError, OverflowError)
# What fastavro raises for bytes that do not fit the writer schema (ran out, bad union index, bad UTF-8).
_READ_ERRORS = (EOFError, IndexError, ValueError, TypeError, KeyError, OverflowError, MemoryError)


class RegistryClient(Protocol):
    """The two calls of ``confluent_kafka.schema_registry.SchemaRegistryClient`` the codec uses; tests pass a
    fake with the same shape."""

    def register_schema(self, subject_name: str, schema: Any) -> int: ...

    def get_schema(self, schema_id: int) -> Any:
        """Returns an object with ``schema_str`` (and ``schema_type``, ``AVRO`` when absent)."""
        ...


@dataclass(frozen=True)
class WriterSchema:
    name: str
    parsed: dict[str, Any]
    fingerprint: bytes
    json: str

    @property
    def header(self) -> bytes:
        return SINGLE_OBJECT_MAGIC + self.fingerprint

    @cached_property
    def body_writer(self) -> Callable[[Mapping[str, Any]], bytes] | None:
        """fastavro's body, several times faster (bus/avro_writer.py); None where the schema is beyond
        it. Compiled on first use: most schemas a codec knows are only ever read."""
        return compile_writer(self.parsed)


class Codec:
    """Encodes and decodes the records of ``avro/``. Thread-safe: its caches only ever grow, with values
    that are the same whichever thread computes them."""

    def __init__(
        self,
        registry: RegistryClient | None = None,
        *,
        confluent: bool | None = None,
        validate: bool = False,
        schemas: Iterable[Mapping[str, Any]] | None = None,
        schema_log: SchemaSource | None = None,
    ) -> None:
        """``registry``: a Schema Registry client; with one, encode writes the Confluent wire format unless
        ``confluent=False``. Without one, Confluent-framed input cannot be decoded.
        ``validate``: check every value with fastavro's validator before writing (about 4x slower). Without
        it, the writer still rejects wrong types, missing and unknown fields; only out-of-range ints slip
        through.
        ``schemas``: the record schemas to write and read as, instead of ``avro/`` and ``avro/history/``
        (for tests and tools that work with another version of the contract).
        ``schema_log``: where writers publish their schemas and readers learn unknown fingerprints
        (bus/schema_log.py); without one, a fingerprint outside ``avro/`` is UnknownFingerprint."""
        if confluent and registry is None:
            raise ValueError("the Confluent wire format needs a schema registry client")
        self._registry = registry
        self._confluent = registry is not None if confluent is None else confluent
        self._validate = validate
        if schemas is None:
            own = [
                WriterSchema(
                    name, contract.load(name), contract.fingerprint(name), contract.schema_json(name)
                )
                for name in contract.names()
            ]
            earlier = [_writer_from_json(json.dumps(schema)) for schema in contract.history()]
        else:
            own, earlier = [_writer_from_json(json.dumps(schema)) for schema in schemas], []
        self._local: dict[str, WriterSchema] = {}
        for writer in own:
            self._local[writer.name] = writer
            self._local[writer.name.rsplit(".", 1)[-1]] = writer  # short names too, for a fast encode lookup
        self._by_fingerprint: dict[bytes, WriterSchema] = {w.fingerprint: w for w in earlier}
        self._by_fingerprint.update((w.fingerprint, w) for w in own)
        self._by_id: dict[int, WriterSchema] = {}
        self._confluent_headers: dict[tuple[str, str], bytes] = {}
        self._schema_log = schema_log
        # What encode looks its writer up in: every local writer when nothing needs publishing first (the
        # Confluent format registers instead), else those whose schema the log has acknowledged.
        publishes = schema_log is not None and not self._confluent
        self._ready: dict[str, WriterSchema] = {} if publishes else self._local

    @classmethod
    def from_settings(cls, settings: Settings) -> Codec:
        """Confluent wire format with a registry when ``schema_registry_url`` is set, else single-object;
        either way with the settings' schemas topic as its schema log (its clients connect on first
        need)."""
        from bus.schema_log import SchemaLog

        schema_log = SchemaLog.from_settings(settings)
        if not settings.schema_registry_url:
            return cls(schema_log=schema_log)
        # Imported here: the registry client needs the confluent-kafka[schemaregistry] extra.
        from confluent_kafka.schema_registry import SchemaRegistryClient

        return cls(SchemaRegistryClient({"url": settings.schema_registry_url}), schema_log=schema_log)

    def flush_schemas(self, timeout_s: float) -> int:
        """Wait (bounded) until the schemas this codec published are on the schemas topic; a writer calls
        it with its own flush, so that readers can learn every schema its records were written with.
        Returns how many are still pending."""
        return 0 if self._schema_log is None else self._schema_log.flush(timeout_s)

    @property
    def wire_format(self) -> str:
        return "confluent" if self._confluent else "single-object"

    def register_writer(self, schema: dict[str, Any] | str) -> bytes:
        """Make another writer schema decodable (e.g. a newer version of one of ours); returns its
        fingerprint. Single-object records carry only the fingerprint, so a reader must know the schema."""
        text = schema if isinstance(schema, str) else json.dumps(schema, separators=(",", ":"))
        writer = _writer_from_json(text)
        self._by_fingerprint[writer.fingerprint] = writer
        return writer.fingerprint

    def local_writer(self, record_name: str) -> WriterSchema:
        """Our own schema of that name (short or full); UnknownSchema otherwise."""
        writer = self._local.get(record_name)
        if writer is None:
            raise UnknownSchema(f"unknown Avro record {record_name!r}; known: {self._known_names()}")
        return writer

    def schema_ids_of(self, record_name: str) -> frozenset[int]:
        """Schema Registry ids known to name our own schema of that name (Confluent framing)."""
        writer = self._local.get(record_name)
        return frozenset(
            i for i, w in self._by_id.items() if writer is not None and w.fingerprint == writer.fingerprint
        )

    # -- encode ------------------------------------------------------------------------------------------

    def encode(self, record_name: str, value: dict[str, Any], topic: str | None = None) -> bytes:
        """Frame and write ``value`` as ``record_name`` (short or full name). ``topic`` picks the registry
        subject in the Confluent format and is ignored otherwise. Timestamps may be tz-aware datetimes or
        epoch milliseconds."""
        writer = self._ready.get(record_name)
        if writer is None:
            writer = self._publish(record_name)
        if self._validate and (problems := _problems(writer, value)):
            raise EncodeError(f"{writer.name}: {problems}")
        header = self._confluent_header(writer, topic) if self._confluent else writer.header
        fast = writer.body_writer
        if fast is not None:
            try:
                return header + fast(value)
            except Exception:
                pass  # a value it is not sure of: fastavro writes it, or raises its own error, as always
        out = BytesIO()
        out.write(header)
        try:
            # strict_allow_default: a misspelt or missing field is an error, not a silent null.
            fastavro.schemaless_writer(out, writer.parsed, value, strict_allow_default=True)
        except _WRITE_ERRORS as exc:
            # The writer names the first bad field; the validator, run only now because it is slow, all.
            problems = _problems(writer, value)
            raise EncodeError(f"{writer.name}: {exc}" + (f" ({problems})" if problems else "")) from exc
        return out.getvalue()

    def _publish(self, record_name: str) -> WriterSchema:
        """The writer to encode ``record_name`` with, its schema published to the schema log first (until
        the log acknowledges it, every encode asks again, which costs no wait after the first)."""
        writer = self.local_writer(record_name)
        if self._schema_log is not None and self._schema_log.publish(writer.fingerprint, writer.json):
            self._ready[record_name] = writer
        return writer

    def _confluent_header(self, writer: WriterSchema, topic: str | None) -> bytes:
        if topic is None:
            raise EncodeError(f"{writer.name}: the Confluent wire format needs the topic (for <topic>-value)")
        header = self._confluent_headers.get((topic, writer.name))
        if header is None:
            schema_id = self._register(f"{topic}-value", writer)
            header = CONFLUENT_MAGIC + schema_id.to_bytes(4, "big")
            self._confluent_headers[(topic, writer.name)] = header
            self._by_id[schema_id] = writer  # our own records decode without asking the registry
        return header

    def _register(self, subject: str, writer: WriterSchema) -> int:
        from confluent_kafka.schema_registry import Schema

        if self._registry is None:  # unreachable through __init__, which ties confluent to a registry
            raise SchemaRegistryUnavailable("no schema registry is configured", transient=False)
        try:
            return int(self._registry.register_schema(subject, Schema(writer.json, "AVRO")))
        except Exception as exc:  # the client raises its own errors, httpx's and OSError alike
            status = getattr(exc, "http_status_code", None)
            if status is not None and 400 <= status < 500:
                # Rejected (e.g. 409 incompatible): retrying will not help.
                raise EncodeError(f"schema registry rejected {writer.name} for {subject}: {exc}") from exc
            raise SchemaRegistryUnavailable(f"cannot register {writer.name} under {subject}: {exc}") from exc

    # -- decode ------------------------------------------------------------------------------------------

    def decode(self, data: bytes, reader: str | None = None) -> tuple[str, dict[str, Any]]:
        """Returns (full record name, value). ``reader`` names the schema to read as (default: our schema
        of the writer's name, else the writer's own). Timestamps come back as UTC-aware datetimes."""
        if not data:  # an empty value or a compaction tombstone (None) is no record either
            raise NotAvro("empty value")
        if data[:2] == SINGLE_OBJECT_MAGIC:
            if len(data) < SINGLE_OBJECT_HEADER_LEN:
                raise TruncatedRecord(
                    f"single-object header is {SINGLE_OBJECT_HEADER_LEN} bytes, got {len(data)}"
                )
            fingerprint = bytes(data[2:SINGLE_OBJECT_HEADER_LEN])
            writer = self._by_fingerprint.get(fingerprint)
            if writer is None:
                writer = self._learn(fingerprint)
            start = SINGLE_OBJECT_HEADER_LEN
        elif data[:1] == CONFLUENT_MAGIC:
            if len(data) < CONFLUENT_HEADER_LEN:
                raise TruncatedRecord(f"Confluent header is {CONFLUENT_HEADER_LEN} bytes, got {len(data)}")
            writer = self._writer_for_id(int.from_bytes(data[1:CONFLUENT_HEADER_LEN], "big"))
            start = CONFLUENT_HEADER_LEN
        else:
            raise NotAvro(
                f"neither Avro single-object nor Confluent framing (starts {bytes(data[:4]).hex()!r})"
            )

        target = self._reader_for(writer, reader)
        body = BytesIO(data)
        body.seek(start)
        try:
            # Same fingerprint: no resolution needed, and skipping it is faster.
            resolve = None if target.fingerprint == writer.fingerprint else target.parsed
            value = fastavro.schemaless_reader(body, writer.parsed, resolve)
        except SchemaResolutionError as exc:
            raise IncompatibleSchema(f"{writer.name} cannot be read as {target.name}: {exc}") from exc
        except _READ_ERRORS as exc:
            # Running out of bytes mid-record means truncation; failing before the end means garbage.
            if body.tell() >= len(data) and isinstance(exc, EOFError | IndexError):
                raise TruncatedRecord(f"{writer.name} body ends early ({len(data)} bytes)") from exc
            raise NotAvro(f"bytes do not fit {writer.name}: {type(exc).__name__}: {exc}") from exc
        if body.tell() != len(data):
            raise NotAvro(f"{len(data) - body.tell()} bytes left after a {writer.name} record")
        return target.name, value

    def _learn(self, fingerprint: bytes) -> WriterSchema:
        """The writer schema of a fingerprint outside ``avro/``, from the schema log (cached from then
        on); UnknownFingerprint when the log has none, SchemaLogUnavailable (transient) when it cannot be
        read."""
        text = None if self._schema_log is None else self._schema_log.lookup(fingerprint)
        if text is None:
            where = "" if self._schema_log is None else " or on the schemas topic"
            raise UnknownFingerprint(
                f"no known writer schema has fingerprint {fingerprint.hex()} (not in avro/{where})",
                fingerprint,
            )
        try:
            writer = _writer_from_json(text)
        except (ValueError, TypeError, KeyError, SchemaParseException) as exc:
            raise UnknownFingerprint(
                f"the schemas topic's schema for fingerprint {fingerprint.hex()} does not parse: {exc}",
                fingerprint,
            ) from exc
        if writer.fingerprint != fingerprint:  # a log that checks its records never gives one
            raise UnknownFingerprint(f"the schema found for {fingerprint.hex()} has another", fingerprint)
        self._by_fingerprint[fingerprint] = writer
        return writer

    def _reader_for(self, writer: WriterSchema, reader: str | None) -> WriterSchema:
        if reader is None:
            return self._local.get(writer.name, writer)
        target = self._local.get(reader)
        if target is None:
            raise UnknownSchema(f"unknown reader schema {reader!r}; known: {self._known_names()}")
        return target

    def _known_names(self) -> str:
        return ", ".join(sorted({writer.name for writer in self._local.values()}))

    def _writer_for_id(self, schema_id: int) -> WriterSchema:
        writer = self._by_id.get(schema_id)
        if writer is not None:
            return writer
        if self._registry is None:
            raise SchemaRegistryUnavailable(
                f"Confluent-framed record (schema id {schema_id}) but no schema registry is configured",
                transient=False,
            )
        try:
            found = self._registry.get_schema(schema_id)
        except Exception as exc:  # the client raises its own errors, httpx's and OSError alike
            if getattr(exc, "http_status_code", None) == 404:
                raise UnknownSchemaId(f"schema registry has no schema id {schema_id}", schema_id) from exc
            raise SchemaRegistryUnavailable(f"cannot fetch schema id {schema_id}: {exc}") from exc
        if (getattr(found, "schema_type", None) or "AVRO") != "AVRO":
            raise NotAvro(f"schema id {schema_id} is a {found.schema_type} schema, not Avro")
        try:
            writer = _writer_from_json(found.schema_str)
        except (ValueError, TypeError, KeyError, SchemaParseException) as exc:
            raise NotAvro(f"schema id {schema_id} does not parse as Avro: {exc}") from exc
        self._by_id[schema_id] = writer
        return writer


def _writer_from_json(text: str) -> WriterSchema:
    """A writer schema from its JSON text; the fingerprint is taken over the text, not fastavro's parsed
    form, which carries private keys."""
    raw = json.loads(text)
    parsed = fastavro.parse_schema(raw)
    return WriterSchema(parsed["name"], parsed, contract.fingerprint_of(raw), text)


def _problems(writer: WriterSchema, value: dict[str, Any]) -> str:
    """What fastavro's validator finds wrong, one entry per named field; empty when it names none (a
    missing or unknown field, which the writer's own message names better)."""
    try:
        validate(value, writer.parsed, raise_errors=True)
    except ValidationError as exc:
        expected: dict[str, list[str]] = {}
        datum: dict[str, Any] = {}
        for error in exc.errors:
            if error.field:
                expected.setdefault(error.field, []).append(str(error.schema))
                datum[error.field] = error.datum
        described = []
        for field, kinds in expected.items():
            short = field.removeprefix(writer.name + ".")
            described.append(f"{short} is {datum[field]!r:.80} but must be {' or '.join(kinds)}")
        return "; ".join(described)
    return ""
