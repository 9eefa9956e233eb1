"""A writer or a reader of queue samples, run as its own process by test_schema_evolution.py with its own
schema folder (AIMA_SCHEMA_DIR): the contract it was deployed with.

    python -m tests.integration.schema_peer write N   # N QueueSamples through the real Publisher
    python -m tests.integration.schema_peer read N    # until N are read; one JSON line per record

The reader decodes as the sink and the stream app do: a batch through bus.frames, what that path does not
read through Codec.decode, with the codec from the settings (so with the schemas topic). A record it
cannot decode is reported as a dead letter would be, with its error type and reason."""

from __future__ import annotations

import json
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta

from confluent_kafka import Consumer

from bus import schemas
from bus.codec import Codec
from bus.errors import CodecError
from bus.frames import FrameDecoders
from bus.kafka import client_config
from bus.settings import Settings
from bus.topics import topic_name
from producers.publisher import Publisher

T0 = datetime(2025, 3, 14, 9, tzinfo=UTC)


def sample(i: int) -> dict[str, object]:
    return {"time": T0 + timedelta(seconds=i), "queue": f"q{i % 3}", "length_jobs": i, "source": "peer"}


def write(count: int) -> None:
    settings = Settings()
    fields = {field["name"] for field in schemas.raw("QueueSample")["fields"]}
    publisher = Publisher(settings, source="peer")
    for i in range(count):
        value = sample(i)
        if "priority" in fields and i % 2 == 0:
            value["priority"] = "high"  # the others leave it out: it takes its default
        publisher.publish("queue.samples", f"q{i % 3}", "QueueSample", value)
    left = publisher.flush(120)
    print(json.dumps({"delivered": publisher.delivered, "invalid": publisher.invalid, "left": left}))


def read(count: int) -> None:
    settings = Settings()
    codec = Codec.from_settings(settings)
    decoders = FrameDecoders(codec)
    consumer = Consumer(
        client_config(
            settings,
            **{
                "group.id": f"peer-{uuid.uuid4().hex}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            },
        )
    )
    consumer.subscribe([topic_name(settings, "queue.samples")])
    seen = 0
    deadline = time.monotonic() + 240
    while seen < count and time.monotonic() < deadline:
        messages = [m for m in consumer.consume(num_messages=500, timeout=1.0) if m.error() is None]
        if not messages:
            continue
        values = [m.value() for m in messages]
        decoder = decoders.get("QueueSample")
        frame = decoder.decode(values) if decoder is not None else None
        native = {} if frame is None else dict(zip(frame.rows, frame.records(), strict=True))
        for position, data in enumerate(values):
            try:
                value = native[position] if position in native else codec.decode(data)[1]
                line = {"value": value, "native": position in native}
            except CodecError as exc:
                line = {"dead_letter": type(exc).__name__, "reason": exc.reason, "transient": exc.transient}
            print(json.dumps(line, default=str), flush=True)
            seen += 1
    consumer.close()


if __name__ == "__main__":
    {"write": write, "read": read}[sys.argv[1]](int(sys.argv[2]))
