"""The private faust-streaming, mode-streaming and aiokafka names the stream app relies on, checked against
the installed libraries, so that an upgrade fails here, loudly, instead of misbehaving at run time.

Every such name is used in streams/runtime/transport.py only (checked below). The libraries are pinned exactly
in constraints.txt, which ./dev installs with. Upgrading: change a pin, run this test; for each failure
re-read the library's new code next to its use in streams/runtime/transport.py, adapt, and update the
expectation here. The functions transport.py mirrors (``Consumer._drain_messages`` and ``getmany``, ``ack``)
are pinned by a digest of their source: when one changes, merge the change into ``BatchConsumer`` and take the
new digest.
"""

from __future__ import annotations

import ast
import contextvars
import hashlib
import inspect
import textwrap
from importlib import metadata
from pathlib import Path
from typing import Any

import aiokafka.client
import aiokafka.errors
import faust
import faust.events
import faust.streams
import faust.types.tuples
import mode.utils.futures
import mode.utils.times
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.producer.message_accumulator import BatchBuilder
from faust.assignor.leader_assignor import LeaderAssignor
from faust.stores.memory import Store as MemoryStore
from faust.transport import consumer as faust_consumer
from faust.transport.drivers import aiokafka as faust_aiokafka

from bus.settings import REPO_ROOT
from streams.runtime.transport import BatchConsumer, StreamsApp

PINNED = ("faust-streaming", "mode-streaming", "aiokafka")
PINNED_MODULES = {"faust", "mode", "aiokafka"}

# (class, name): the parameter names the code passes or overrides with, in order (self included).
SIGNATURES: dict[tuple[type, str], list[str]] = {
    (faust_consumer.Consumer, "_drain_messages"): ["self", "fetcher"],
    (faust_consumer.Consumer, "_wait_next_records"): ["self", "timeout"],
    (faust_consumer.Consumer, "_add_gap"): ["self", "tp", "offset_from", "offset_to"],
    (faust_consumer.Consumer, "perform_seek"): ["self"],
    (faust_consumer.Consumer, "commit"): ["self", "topics", "start_new_transaction"],
    (faust_consumer.Consumer, "wait_empty"): ["self"],
    (faust_consumer.Consumer, "stop_flow"): ["self"],
    (faust_aiokafka.Consumer, "_to_message"): ["self", "tp", "record"],
    (faust_aiokafka.Consumer, "_new_consumer_thread"): ["self"],
    (faust_aiokafka.Consumer, "highwater"): ["self", "tp"],
    (faust_consumer.Consumer, "on_partitions_revoked"): ["self", "revoked"],
    (faust_consumer.Consumer, "on_partitions_assigned"): ["self", "assigned", "generation_id"],
    (faust_aiokafka.AIOKafkaConsumerThread, "_ensure_consumer"): ["self"],
    (faust_aiokafka.AIOKafkaConsumerThread, "on_thread_stop"): ["self"],
    (faust_aiokafka.AIOKafkaConsumerThread, "_shutdown_thread"): ["self"],
    (faust_aiokafka.AIOKafkaConsumerThread, "call_thread"): ["self", "fun", "args", "kwargs"],
    (faust_aiokafka.Producer, "_ensure_producer"): ["self"],
    (faust_aiokafka.Producer, "on_stop"): ["self"],
    (faust.App, "_new_transport"): ["self"],
    (faust.App, "_producer_flush"): ["self", "logger"],
    (faust.Worker, "on_setup_root_logger"): ["self", "logger", "level"],
    (faust.Worker, "install_signal_handlers"): ["self"],
    (faust.Worker, "_schedule_shutdown"): ["self", "signal"],
    (faust.events.Event, "__init__"): ["self", "app", "key", "value", "headers", "message"],
    (AIOKafkaProducer, "create_batch"): ["self"],
    (AIOKafkaProducer, "send_batch"): ["self", "batch", "topic", "partition"],
    (AIOKafkaProducer, "partitions_for"): ["self", "topic"],
    (BatchBuilder, "append"): ["self", "timestamp", "key", "value", "headers"],
}

# Attributes of a consumer instance (set in Faust's __init__) that BatchConsumer reads or writes.
CONSUMER_ATTRIBUTES = {
    "_committed_offset": dict,
    "_acked": dict,
    "_acked_index": dict,
    "_n_acked": int,
    "_read_offset": dict,
    "_commit_every": (int, type(None)),
    "_unacked_messages": object,
    "_waiting_for_ack": object,
    "_buffered_partitions": set,
    "_stopped": object,
    "_thread": faust_aiokafka.AIOKafkaConsumerThread,
    "flow_active": bool,
    "suspend_flow": object,
    "callback": object,
    "consumer_stopped_errors": tuple,
}

# Digests of the library functions BatchConsumer mirrors (see the module doc).
MIRRORED = {
    (faust_consumer.Consumer, "_drain_messages"): "8f35dd7a11144daa",
    (faust_consumer.Consumer, "getmany"): "e486c434b7928ee8",
    (faust_consumer.Consumer, "ack"): "5548cf0f75843f73",
}


def _digest(function: Any) -> str:
    return hashlib.sha256(textwrap.dedent(inspect.getsource(function)).encode()).hexdigest()[:16]


def _offline_app() -> StreamsApp:
    """A StreamsApp whose objects exist without a broker (nothing here starts or connects)."""
    app = StreamsApp("coupling", broker="kafka://127.0.0.1:1", autodiscover=False, store="memory://")
    app.Table("probe", partitions=2)
    return app


def test_constraints_pin_the_installed_versions() -> None:
    pins = {}
    for line in (REPO_ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip()] = version.strip()
    assert set(PINNED) <= set(pins), pins
    for name in PINNED:
        assert metadata.version(name) == pins[name], (
            f"{name} {metadata.version(name)} installed, {pins[name]} pinned"
        )
    assert "-c constraints.txt" in (REPO_ROOT / "dev").read_text()
    assert "-c constraints.txt" in (REPO_ROOT / "Dockerfile").read_text()


@pytest.mark.parametrize(("owner", "name"), list(SIGNATURES), ids=lambda v: getattr(v, "__qualname__", v))
def test_private_methods_have_the_signatures_used(owner: type, name: str) -> None:
    function = getattr(owner, name, None)
    assert function is not None, f"{owner.__qualname__}.{name} is gone"
    function = getattr(function, "__wrapped__", function)
    assert [p for p in inspect.signature(function).parameters] == SIGNATURES[(owner, name)]


def test_library_functions_and_objects_used() -> None:
    assert isinstance(faust.streams._current_event, contextvars.ContextVar)
    assert hasattr(faust.types.tuples.ack_lock, "__enter__")
    assert callable(mode.utils.futures.notify) and callable(mode.utils.times.want_seconds)
    assert list(inspect.signature(aiokafka.client.create_conn).parameters)[:2] == ["host", "port"]
    for error in ("MessageSizeTooLargeError", "RecordListTooLargeError", "CorruptRecordException"):
        kind = getattr(aiokafka.errors, error)
        assert issubclass(kind, aiokafka.errors.BrokerResponseError) and not kind.retriable
    assert aiokafka.errors.for_code(10) is aiokafka.errors.MessageSizeTooLargeError
    assert hasattr(faust_consumer.Fetcher, "_fetcher")
    assert hasattr(faust_aiokafka.AIOKafkaConsumerThread, "shutdown_timeout")
    assert "_leader_topic" in dir(LeaderAssignor)
    for attribute in ("Consumer", "Producer", "Fetcher"):
        assert hasattr(faust_aiokafka.Transport, attribute)


@pytest.mark.parametrize(("owner", "name"), list(MIRRORED), ids=lambda v: getattr(v, "__qualname__", v))
def test_mirrored_functions_are_unchanged(owner: type, name: str) -> None:
    assert _digest(getattr(owner, name)) == MIRRORED[(owner, name)], (
        f"{owner.__qualname__}.{name} changed: merge the change into streams/runtime/transport.py, "
        "then update its digest"
    )


def test_instances_have_the_attributes_used() -> None:
    app = _offline_app()
    consumer = app.consumer
    assert isinstance(consumer, BatchConsumer)
    for name, kind in CONSUMER_ATTRIBUTES.items():
        assert hasattr(consumer, name), f"Faust's consumer has no {name}"
        assert isinstance(getattr(consumer, name), kind), (name, type(getattr(consumer, name)))
    assert hasattr(consumer._thread, "set_shutdown")
    assert app.producer._producer is None  # not started: _ensure_producer would raise NotReady
    assert isinstance(app.consumer_generation_id, int)
    assert isinstance(app.flow_control.is_active(), bool)
    assert callable(app.monitor.track_tp_end_offset) and callable(app.topics.acks_enabled_for)
    assert app.conf.broker_consumer
    leader = app._leader_assignor._leader_topic
    assert leader.get_topic_name() == "coupling-__assignor-__leader"
    table = app.tables["probe"]
    topic = table.changelog_topic
    for name in ("compacting", "deleting", "retention", "config", "partitions", "topics"):
        assert hasattr(topic, name), f"a changelog topic has no {name}"
    assert topic.compacting and topic.partitions == 2
    assert isinstance(table.data, MemoryStore) and isinstance(table.data.data, dict)  # PartitionView


def test_no_private_library_name_outside_transport() -> None:
    """Outside streams/runtime/transport.py, the app imports only public faust names and touches none of the
    private ones that transport.py wraps."""
    wrapped = {"_current_event", "_to_message", "_ensure_producer", "_leader_assignor", "_drain_messages"}
    for path in sorted(Path(REPO_ROOT).glob("*/**/*.py")):
        parts = path.relative_to(REPO_ROOT).parts
        if (
            parts[0] in {"tests", "bench"}
            # .venv, and the state folder .aima, whose Go module cache holds other projects' Python files
            or parts[0].startswith(".")
            or path == REPO_ROOT / "streams" / "runtime" / "transport.py"
        ):
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PINNED_MODULES:
                private = [alias.name for alias in node.names if alias.name.startswith("_")]
                assert not private, f"{path}: imports {private} from {node.module}"
            if isinstance(node, ast.Attribute) and node.attr in wrapped:
                raise AssertionError(
                    f"{path}:{node.lineno}: uses {node.attr}; go through streams/runtime/transport.py"
                )
