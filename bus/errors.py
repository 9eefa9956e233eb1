"""Typed errors of the Avro contract and codec, so callers can tell a poison record (dead-letter it) from a
transient outage (retry it) without reading message texts."""

from __future__ import annotations

__all__ = [
    "CodecError",
    "DecodeError",
    "EncodeError",
    "IncompatibleSchema",
    "NotAvro",
    "SchemaLogUnavailable",
    "SchemaRegistryUnavailable",
    "TruncatedRecord",
    "UnknownFingerprint",
    "UnknownSchema",
    "UnknownSchemaId",
]


class CodecError(Exception):
    """Base of every codec error; ``reason`` is a short text fit for a dead-letter record."""

    transient = False
    """True when retrying the same bytes later may succeed (dead-lettering them would be wrong)."""

    def __init__(self, reason: str, *, transient: bool | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        if transient is not None:
            self.transient = transient


class DecodeError(CodecError):
    """The bytes could not be turned into a record: dead-letter them unless ``transient``."""


class NotAvro(DecodeError):
    """Neither an Avro single-object header nor a Confluent frame, or the body does not fit its schema."""


class TruncatedRecord(DecodeError):
    """The bytes end before the header or the record body does."""


class UnknownFingerprint(DecodeError):
    """A single-object record whose writer schema fingerprint matches no schema in ``avro/``,
    ``avro/history/``, the schemas topic (when the codec reads one) or :meth:`Codec.register_writer`."""

    def __init__(self, reason: str, fingerprint: bytes) -> None:
        super().__init__(reason)
        self.fingerprint = fingerprint


class UnknownSchemaId(DecodeError):
    """A Confluent-framed record whose schema id the registry does not know."""

    def __init__(self, reason: str, schema_id: int) -> None:
        super().__init__(reason)
        self.schema_id = schema_id


class IncompatibleSchema(DecodeError):
    """The writer schema cannot be resolved to the requested reader schema (Avro resolution rules)."""


class EncodeError(CodecError, ValueError):
    """A value does not fit its schema (the message names the field where fastavro says which)."""


class SchemaRegistryUnavailable(DecodeError, EncodeError):
    """The Schema Registry could not be asked. Raised by both encode and decode. ``transient`` unless no
    registry is configured at all: an outage is retried, a missing configuration is not."""

    transient = True


class SchemaLogUnavailable(DecodeError, EncodeError):
    """The schemas topic (bus/schema_log.py) could not be read to its end in time: the broker is away or
    slow. Always ``transient``: the record is retried, not dead-lettered."""

    transient = True


class UnknownSchema(KeyError):
    """A record name that is not in ``avro/``."""

    def __str__(self) -> str:
        # KeyError repr()s its argument; a plain message reads better in tracebacks.
        return str(self.args[0]) if self.args else ""
