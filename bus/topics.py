"""The topic catalogue: every topic's name, partitions, retention, key and the Avro record it carries."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from bus.settings import Settings


@dataclass(frozen=True)
class TopicSpec:
    key: str
    """Short name, the part after the configurable prefix."""
    schema: str
    """Full name of the Avro record every value on the topic carries (:data:`SCHEMA_LOG_VALUES` for the
    schemas topic, whose values are schemas)."""
    partitions: int
    retention: timedelta | None
    """None keeps records forever (compacted topics)."""
    message_key: str
    """What the Kafka message key is, so one source stays ordered on one partition."""
    compacted: bool = False
    internal: bool = False
    """Written and read only by the stream processors (a repartition), not part of the public contract."""

    def name(self, prefix: str) -> str:
        return f"{prefix}{self.key}"

    def config(self) -> dict[str, str]:
        config = {"cleanup.policy": "compact" if self.compacted else "delete"}
        config["retention.ms"] = (
            "-1" if self.retention is None else str(int(self.retention.total_seconds() * 1000))
        )
        return config


NS = "aima.metrics"
SCHEMA_LOG_VALUES = "Avro schema (JSON text)"
"""What the schemas topic carries instead of an Avro record: the writer schemas themselves."""
TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec("gpu.samples", f"{NS}.GpuSample", 8, timedelta(days=3), "host/gpu_uuid"),
    TopicSpec("system.samples", f"{NS}.SystemSample", 4, timedelta(days=3), "host"),
    TopicSpec("job.events", f"{NS}.JobEvent", 4, timedelta(days=7), "job_id"),
    TopicSpec("job.timings", f"{NS}.JobTimings", 4, timedelta(days=3), "job_id"),
    TopicSpec("queue.samples", f"{NS}.QueueSample", 2, timedelta(days=3), "queue"),
    TopicSpec("k8s.pods", f"{NS}.PodStatus", 2, timedelta(days=3), "namespace/pod"),
    TopicSpec("rollups", f"{NS}.Rollup", 8, timedelta(days=7), "series/tier/bucket_start"),
    TopicSpec("costs", f"{NS}.CostRecord", 4, timedelta(days=30), "kind|project|...|period"),
    TopicSpec("energy", f"{NS}.GpuEnergy", 4, timedelta(days=30), "gpu_uuid|hour"),
    TopicSpec("alerts", f"{NS}.AlertEvent", 4, timedelta(days=30), "fingerprint"),
    TopicSpec("anomalies", f"{NS}.Anomaly", 4, timedelta(days=7), "series"),
    TopicSpec("deadletter", f"{NS}.DeadLetter", 2, timedelta(days=30), "origin topic"),
    # Every writer schema in use, for readers that do not know it yet (bus/schema_log.py): one partition,
    # so one read to its end sees them all; compacted and kept forever, one record per fingerprint.
    TopicSpec("schemas", SCHEMA_LOG_VALUES, 1, None, "fingerprint (16 hex digits)", compacted=True),
    # Repartitions inside the stream app: state that spans sources must live on one partition.
    TopicSpec("streams.jobs-by-project", f"{NS}.JobEvent", 4, timedelta(days=7), "project", internal=True),
    TopicSpec("streams.device-hours", f"{NS}.CostRecord", 4, timedelta(days=7), "gpu_model", internal=True),
    TopicSpec("streams.job-outcomes", f"{NS}.JobEvent", 1, timedelta(days=7), "fleet", internal=True),
    # Partial rollups of series that span partitions (Metric.spans_partitions), merged per series; the
    # senders' progress records go to every partition (streams/rollups/merge.py).
    TopicSpec(
        "streams.rollup-partials", f"{NS}.RollupPartial", 4, timedelta(days=7), "series", internal=True
    ),
)
BY_KEY = {spec.key: spec for spec in TOPICS}


DEFAULT_PREFIX = "aima."


def consumer_group(settings: Settings, role: str) -> str:
    """The consumer group of a ``role`` (``sink``, ``notify``) for this deployment's topics: ``aima-<role>``
    under the default prefix (the name groups have always had, so their committed offsets stay where
    they are), ``<prefix><role>`` under any other, so two stacks sharing a broker under different
    prefixes never join one group and rebalance each other."""
    prefix = settings.topic_prefix
    return f"aima-{role}" if prefix == DEFAULT_PREFIX else f"{prefix}{role}"


def topic_name(settings: Settings, key: str) -> str:
    """The full topic name for a catalogue key, e.g. ``gpu.samples`` -> ``aima.gpu.samples``."""
    try:
        return BY_KEY[key].name(settings.topic_prefix)
    except KeyError:
        raise KeyError(f"unknown topic {key!r}; known: {', '.join(BY_KEY)}") from None
