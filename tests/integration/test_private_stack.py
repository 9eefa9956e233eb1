"""The private stack (tests/private_stack.py) that outage tests rely on: its broker and database come back
after a stop with their data, and it never touches the session's shared services."""

from __future__ import annotations

import psycopg
import pytest

from bus.kafka import admin, ensure_topics, wait_for_broker
from bus.topics import topic_name
from tests.private_stack import PrivateStack

pytestmark = pytest.mark.integration


def test_an_outage_keeps_topics_and_rows(private_stack: PrivateStack) -> None:
    settings = private_stack.settings()
    wait_for_broker(settings, timeout_s=120)
    ensure_topics(settings)
    with psycopg.connect(private_stack.database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (n int)")
        conn.execute("INSERT INTO kept VALUES (7)")
    private_stack.stop_kafka()
    private_stack.stop_postgres()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(private_stack.database_url, connect_timeout=3)
    private_stack.start_kafka()
    private_stack.start_postgres()
    wait_for_broker(settings, timeout_s=120)
    assert topic_name(settings, "gpu.samples") in admin(settings).list_topics(timeout=30).topics
    with psycopg.connect(private_stack.database_url) as conn:
        assert conn.execute("SELECT n FROM kept").fetchall() == [(7,)]
