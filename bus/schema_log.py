"""The schemas topic: every writer schema in use, keyed by fingerprint, so that a deployed reader can read
records written with a newer schema it was never given (T3, T6), with no Schema Registry.

Single-object records carry only the 8-byte fingerprint of their writer schema. So, before a process first
encodes with a schema, it publishes that schema here (key: the fingerprint as 16 hex digits, value: the
schema's JSON text) and waits, for a bounded time, for the broker's acknowledgement; acknowledged records
are in the log before any record written with that schema. The topic is compacted (one record per
fingerprint) and kept forever (``schemas`` in bus/topics.py).

A reader meeting a fingerprint it does not know (not in ``avro/`` or ``avro/history/``) reads the topic to
its end, caching every schema found, and resolves the writer schema to its own reader schema as Avro does.
A fingerprint still unknown then is re-read once after a short grace (a writer whose acknowledgement came
late, during an outage), then is :class:`~bus.errors.UnknownFingerprint`, a poison record. When the topic
cannot be read to its end in time, :class:`~bus.errors.SchemaLogUnavailable` is raised, a transient error:
the record waits and is retried.

The Kafka clients are built on first use by the factories the log is given, so building one connects to
nothing; :meth:`SchemaLog.from_settings` builds confluent-kafka clients from the settings.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import OffsetSpec

from bus import schemas as contract
from bus.errors import SchemaLogUnavailable

if TYPE_CHECKING:
    from bus.settings import Settings

__all__ = ["SchemaLog", "SchemaSource"]

log = logging.getLogger(__name__)

_MISSING_TOPIC = {KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC, KafkaError._UNKNOWN_PARTITION}
_MISSES_KEPT = 10_000
"""Fingerprints remembered as missed (each gets one grace re-read); beyond this the memory starts again."""


class SchemaSource(Protocol):
    """What the codec needs of a schema log; tests pass an in-memory one with the same shape."""

    def publish(self, fingerprint: bytes, schema_json: str) -> bool:
        """Make the schema findable by readers; True once it is (or cannot be: no topic), False while
        its acknowledgement is outstanding (the codec asks again at its next encode)."""
        ...

    def lookup(self, fingerprint: bytes) -> str | None:
        """The schema JSON published under ``fingerprint``; None when the log, read to its end, has none.
        Raises SchemaLogUnavailable when it cannot be read."""
        ...

    def flush(self, timeout_s: float) -> int:
        """Wait (bounded) for the schemas still unacknowledged; returns how many are still pending."""
        ...


class SchemaLog:
    """The schemas topic, for writers (:meth:`publish`) and readers (:meth:`lookup`). Thread-safe."""

    def __init__(
        self,
        topic: str,
        producer: Callable[[], Any],
        consumer: Callable[[], Any],
        admin: Callable[[], Any],
        *,
        publish_wait_s: float = 5.0,
        read_wait_s: float = 5.0,
        miss_grace_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """``producer``, ``consumer`` and ``admin`` make confluent-kafka clients (or fakes of the same
        shape), called at first need; the admin client asks for the topic's end (a consumer's own request
        would queue behind its waiting fetch). ``publish_wait_s``: how long a first publish waits for its
        acknowledgement before the writer goes on (the record stays queued). ``read_wait_s``: how long a
        lookup may take to read the topic to its end before it is an outage. ``miss_grace_s``: the pause
        before the one re-read of a fingerprint that was not found."""
        self.topic = topic
        self._make_producer = producer
        self._make_consumer = consumer
        self._make_admin = admin
        self._publish_wait_s = publish_wait_s
        self._read_wait_s = read_wait_s
        self._miss_grace_s = miss_grace_s
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._producer: Any = None
        self._consumer: Any = None
        self._admin: Any = None
        self._sent: dict[bytes, str] = {}
        """Fingerprint -> 'pending', 'delivered' or 'failed' (what this process published)."""
        self._topic_absent = False
        self._known: dict[bytes, str] = {}
        self._missed: set[bytes] = set()
        self._next_offset = 0

    @classmethod
    def from_settings(cls, settings: Settings, **options: Any) -> SchemaLog:
        """The catalogue's schemas topic on the settings' broker."""
        from bus.kafka import admin, client_config, quiet_config
        from bus.topics import topic_name

        def producer() -> Producer:
            return Producer(
                client_config(
                    settings,
                    **{
                        "acks": "all",
                        "enable.idempotence": True,
                        "linger.ms": 0,
                        "message.timeout.ms": 120_000,
                        "client.id": "aima-schema-log",
                        **quiet_config("schema-log"),
                    },
                )
            )

        def consumer() -> Consumer:
            return Consumer(
                client_config(
                    settings,
                    **{
                        # Assigned, never subscribed nor committed: the group id only satisfies the client.
                        "group.id": f"aima-schema-log-{uuid.uuid4().hex}",
                        "enable.auto.commit": False,
                        "enable.auto.offset.store": False,
                        "auto.offset.reset": "earliest",
                        "client.id": "aima-schema-log",
                        **quiet_config("schema-log"),
                    },
                )
            )

        return cls(topic_name(settings, "schemas"), producer, consumer, partial(admin, settings), **options)

    # -- writers -----------------------------------------------------------------------------------------

    def publish(self, fingerprint: bytes, schema_json: str) -> bool:
        with self._lock:
            state = self._sent.get(fingerprint)
            if state == "delivered" or self._topic_absent:
                return True
            producer = self._producer_client()
            if state is None and not self._topic_exists(producer):
                return True
            if state != "pending":
                self._sent[fingerprint] = "pending"
                producer.produce(
                    self.topic,
                    key=fingerprint.hex().encode(),
                    value=schema_json.encode(),
                    on_delivery=partial(self._on_delivery, fingerprint),
                )
            if state is None:
                producer.flush(self._publish_wait_s)
            else:
                producer.poll(0)
            delivered = self._sent[fingerprint] == "delivered"
            if delivered:
                self._known[fingerprint] = schema_json
            elif state is None:
                log.warning(
                    "schema not yet acknowledged on the schemas topic; writing with it anyway",
                    extra={"topic": self.topic, "fingerprint": fingerprint.hex()},
                )
            return delivered

    def _missing(self, client: Any, timeout_s: float) -> bool:
        """Whether the broker says the topic does not exist (False when it cannot be asked)."""
        try:
            metadata = client.list_topics(self.topic, timeout=max(timeout_s, 0.1))
        except KafkaException:
            return False
        found = metadata.topics.get(self.topic)
        return found is None or (found.error is not None and found.error.code() in _MISSING_TOPIC)

    def _topic_exists(self, producer: Any) -> bool:
        """False (and a warning) when the broker says the topic does not exist: the writer cannot tell
        readers about its schemas, and waiting for an acknowledgement would only slow it down. True when
        the broker is away: the schema is queued and sent when it is back."""
        if self._missing(producer, self._publish_wait_s):
            self._topic_absent = True
            log.warning(
                "no schemas topic: readers that do not know this process's schemas cannot read its records",
                extra={"topic": self.topic},
            )
            return False
        return True

    def _on_delivery(self, fingerprint: bytes, error: KafkaError | None, _message: Any) -> None:
        # Called from flush/poll, with the lock held by the caller.
        if error is None:
            self._sent[fingerprint] = "delivered"
            return
        self._sent[fingerprint] = "failed"  # produced again at the next publish
        log.error(
            "could not publish a schema",
            extra={"topic": self.topic, "fingerprint": fingerprint.hex(), "error": str(error)},
        )

    # -- readers -----------------------------------------------------------------------------------------

    def lookup(self, fingerprint: bytes) -> str | None:
        with self._lock:
            found = self._known.get(fingerprint)
            if found is not None:
                return found
            self._catch_up()
            if fingerprint not in self._known and fingerprint not in self._missed:
                if len(self._missed) >= _MISSES_KEPT:
                    self._missed.clear()
                self._missed.add(fingerprint)
                self._sleep(self._miss_grace_s)
                self._catch_up()
            return self._known.get(fingerprint)

    def _catch_up(self) -> None:
        """Read the topic from where the last read ended to its end; SchemaLogUnavailable when that does
        not finish within ``read_wait_s``."""
        deadline = self._clock() + self._read_wait_s
        consumer = self._consumer_client()
        partition = TopicPartition(self.topic, 0)
        if self._admin is None:
            self._admin = self._make_admin()
        try:
            answer = self._admin.list_offsets(
                {partition: OffsetSpec.latest()}, request_timeout=self._read_wait_s
            )
            end = answer[partition].result(timeout=self._read_wait_s).offset
        except KafkaException as exc:
            if self._missing(self._admin, deadline - self._clock()):
                return  # no topic: no writer published a schema there
            raise SchemaLogUnavailable(f"cannot read the schemas topic {self.topic}: {exc}") from exc
        except (TimeoutError, concurrent.futures.TimeoutError) as exc:
            raise SchemaLogUnavailable(f"the end of the schemas topic {self.topic} did not come") from exc
        while self._next_offset < end:
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise SchemaLogUnavailable(
                    f"read the schemas topic {self.topic} to offset {self._next_offset} of {end} within "
                    f"{self._read_wait_s} s"
                )
            # poll, not consume: consume waits for its whole batch or the timeout, and the log is short.
            message = consumer.poll(min(remaining, 1.0))
            if message is None or message.error() is not None:
                continue  # nothing yet, or a passing fetch error: the deadline bounds how long
            self._next_offset = max(self._next_offset, message.offset() + 1)
            self._add(message.key(), message.value())

    def _add(self, key: bytes | None, value: bytes | None) -> None:
        """Cache one record of the log, if it is what it claims: a schema whose fingerprint is its key."""
        try:
            fingerprint = bytes.fromhex((key or b"").decode("ascii"))
            text = (value or b"").decode("utf-8")
            if contract.fingerprint_of(json.loads(text)) != fingerprint:
                raise ValueError("the schema's fingerprint is not its key")
        except (ValueError, TypeError, KeyError, UnicodeDecodeError, AttributeError) as exc:
            log.warning(
                "ignored a record of the schemas topic", extra={"topic": self.topic, "error": str(exc)}
            )
            return
        self._known[fingerprint] = text

    # -- clients -----------------------------------------------------------------------------------------

    def _producer_client(self) -> Any:
        if self._producer is None:
            self._producer = self._make_producer()
        return self._producer

    def _consumer_client(self) -> Any:
        if self._consumer is None:
            consumer = self._make_consumer()
            # Fetched from now on in the background: a later lookup finds new schemas already here.
            consumer.assign([TopicPartition(self.topic, 0, OFFSET_BEGINNING)])
            self._consumer = consumer
        return self._consumer

    def flush(self, timeout_s: float) -> int:
        with self._lock:
            if self._producer is None:
                return 0
            self._producer.flush(timeout_s)
            return sum(1 for state in self._sent.values() if state != "delivered")

    def close(self, timeout_s: float = 5.0) -> None:
        """Send what is still queued (bounded) and close the reader."""
        with self._lock:
            if self._producer is not None:
                self._producer.flush(timeout_s)
            if self._consumer is not None:
                self._consumer.close()
                self._consumer = None
