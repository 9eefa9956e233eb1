"""The librdkafka settings every confluent-kafka client is built with (bus/kafka.py)."""

from __future__ import annotations

import logging

from bus.kafka import client_config, quiet_config
from bus.settings import Settings


def test_a_quiet_client_logs_notices_and_worse_through_python_logging() -> None:
    config = client_config(Settings(kafka_bootstrap="b:1"), **quiet_config("unit-quiet"))
    assert config["bootstrap.servers"] == "b:1"
    assert config["log_level"] == 5
    assert "debug" not in config
    assert config["logger"].name == "librdkafka.unit-quiet"


def test_kafka_debug_turns_on_librdkafkas_debug_contexts_and_lets_their_lines_through() -> None:
    config = client_config(Settings(kafka_debug="cgrp,fetch"), **quiet_config("unit-debug"))
    assert config["debug"] == "cgrp,fetch"
    assert config["log_level"] == 7
    assert logging.getLogger("librdkafka.unit-debug").isEnabledFor(logging.DEBUG)


def test_the_consumer_groups_of_two_prefixes_differ_and_the_default_keeps_its_old_name() -> None:
    from bus.topics import consumer_group

    assert consumer_group(Settings(topic_prefix="aima."), "sink") == "aima-sink"
    assert consumer_group(Settings(topic_prefix="aima."), "notify") == "aima-notify"
    staging = consumer_group(Settings(topic_prefix="staging."), "sink")
    assert staging == "staging.sink"
    assert staging != consumer_group(Settings(topic_prefix="dev."), "sink")
