"""Session-wide real services for the tests.

Kafka and PostgreSQL come from, in this order: the environment (AIMA_TEST_KAFKA_BOOTSTRAP and
AIMA_TEST_DATABASE_URL: services a developer already runs), testcontainers when a Docker engine answers,
or the project's own scripts in infra/ (started here and stopped again at the end if this session started
them).
Each test gets its own topic prefix and database schema, so tests never collide, also when pytest-xdist
runs them side by side (`-n 2`, as `./dev test` does): then the controlling process starts the services
once, before the workers, and hands them the addresses through those two variables."""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka.admin import AdminClient, NewTopic
from psycopg import sql

from bus.kafka import ensure_topics, wait_for_broker
from bus.settings import REPO_ROOT, Settings
from consumers.migrate import MigrationError, detect_mode, migrate, timescaledb_preloaded
from tests.private_stack import PrivateStack

INFRA = REPO_ROOT / "infra"


def _docker_engine_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


class _Services:
    def __init__(self) -> None:
        self.kafka_bootstrap: str
        self.database_url: str
        self._cleanup: list[Callable[[], None]] = []

    def start(self) -> None:
        kafka = os.environ.get("AIMA_TEST_KAFKA_BOOTSTRAP")
        database = os.environ.get("AIMA_TEST_DATABASE_URL")
        if kafka and database:
            self.kafka_bootstrap, self.database_url = kafka, database
        elif _docker_engine_answers():
            self._start_containers()
        else:
            self._start_local()
        wait_for_broker(Settings(kafka_bootstrap=self.kafka_bootstrap), timeout_s=60)

    def _start_containers(self) -> None:
        from testcontainers.kafka import KafkaContainer
        from testcontainers.postgres import PostgresContainer

        kafka = KafkaContainer("apache/kafka:4.1.1").with_kraft()
        postgres = PostgresContainer("timescale/timescaledb:latest-pg16", driver=None)
        kafka.start()
        self._cleanup.append(kafka.stop)
        postgres.start()
        self._cleanup.append(postgres.stop)
        self.kafka_bootstrap = kafka.get_bootstrap_server()
        self.database_url = postgres.get_connection_url()

    def _start_local(self) -> None:
        settings = Settings()
        env = dict(os.environ, AIMA_STATE_DIR=str(settings.state_dir))
        for script in ("kafka/kafka.sh", "postgres/postgres.sh"):
            was_up = subprocess.run([INFRA / script, "status"], env=env, capture_output=True).returncode == 0
            subprocess.run([INFRA / script, "start"], env=env, check=True)
            if not was_up:
                self._cleanup.append(
                    lambda s=script: subprocess.run([INFRA / s, "stop"], env=env, check=False)
                )
        self.kafka_bootstrap = settings.kafka_bootstrap
        self.database_url = Path(settings.state_dir, "postgres", "dsn").read_text().strip()

    def stop(self) -> None:
        for step in reversed(self._cleanup):
            step()


_TEST_SERVICES = ("AIMA_TEST_KAFKA_BOOTSTRAP", "AIMA_TEST_DATABASE_URL")


def pytest_configure(config: pytest.Config) -> None:
    """Under xdist, start the services here in the controller: each worker starting (and at its end
    stopping) them itself would race the others."""
    distributed = getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput")
    if not distributed or all(os.environ.get(name) for name in _TEST_SERVICES):
        return
    running = _Services()
    running.start()
    config.add_cleanup(running.stop)
    # The workers start after this and inherit the environment.
    os.environ["AIMA_TEST_KAFKA_BOOTSTRAP"] = running.kafka_bootstrap
    os.environ["AIMA_TEST_DATABASE_URL"] = running.database_url


@pytest.fixture(scope="session")
def services() -> Iterator[_Services]:
    running = _Services()
    running.start()
    yield running
    running.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(services: _Services) -> str:
    return services.kafka_bootstrap


@pytest.fixture(scope="session")
def database_url(services: _Services) -> str:
    return services.database_url


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
def settings(services: _Services, unique: str, tmp_path: Path) -> Settings:
    """Settings for one test: the session's services, a topic prefix and state folder of its own."""
    return Settings(
        kafka_bootstrap=services.kafka_bootstrap,
        database_url=services.database_url,
        topic_prefix=f"t{unique}.",
        state_dir=tmp_path / "state",
    )


def _delete_topics(bootstrap: str, marker: str) -> None:
    """Drop every topic whose name holds the test's unique marker (its prefix, and the internal topics of
    Faust apps named after it), so a developer's long-lived broker does not pile up partitions."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 3})
    names = [name for name in admin.list_topics(timeout=10).topics if marker in name]
    if names:
        for future in admin.delete_topics(names, operation_timeout=30).values():
            with contextlib.suppress(Exception):  # already gone, or deleted by the test itself
                future.result(30)


@pytest.fixture
def topics(settings: Settings, unique: str) -> Iterator[Settings]:
    """Creates the whole topic catalogue under the test's own prefix; afterwards deletes every topic the
    test made."""
    ensure_topics(settings)
    yield settings
    _delete_topics(settings.kafka_bootstrap, unique)


@pytest.fixture
def new_topic(kafka_bootstrap: str, unique: str) -> Iterator[Callable[..., str]]:
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    counter = iter(range(1000))

    def create(partitions: int = 1, name: str | None = None) -> str:
        topic = name or f"t{unique}.topic{next(counter)}"
        admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])[topic].result(
            30
        )
        return topic

    yield create
    _delete_topics(kafka_bootstrap, unique)


@pytest.fixture
def db_schema(database_url: str, unique: str) -> Iterator[str]:
    """A fresh, migrated schema of the test's own; dropped afterwards."""
    schema = f"t_{unique}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        migrate(conn, schema=schema)
    yield schema
    with psycopg.connect(database_url, autocommit=True) as conn:
        # With it, the per-project reader views of migration 0012, kept in a schema of their own.
        for name in (schema, f"{schema}_by_project"):
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
def db(database_url: str, db_schema: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("SET search_path TO {}, public").format(sql.Identifier(db_schema)))
        yield conn


def _why_not_timescaledb(database_url: str) -> str | None:
    """Why the session's database cannot run the migrations in TimescaleDB mode; None when it can."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'").fetchone():
            return "the server has no timescaledb extension"
        if not timescaledb_preloaded(conn):
            return "the server has timescaledb but not in shared_preload_libraries"
        try:
            if detect_mode(conn) != "timescaledb":
                return "the extension cannot be created in the database (that needs a superuser)"
        except MigrationError as exc:
            return str(exc)
    return None


@pytest.fixture(scope="session")
def timescaledb(database_url: str) -> None:
    """Skips a TimescaleDB-mode test unless the session's database (whichever way it came: the
    environment, a container or the local stack) migrates in that mode; CI's plain PostgreSQL skips."""
    reason = _why_not_timescaledb(database_url)
    if reason is not None:
        pytest.skip(f"TimescaleDB mode not available on the session's database: {reason}")


@pytest.fixture
def ts_db(timescaledb: None, db: psycopg.Connection) -> psycopg.Connection:
    """:func:`db` in a schema migrated in TimescaleDB mode."""
    return db


@pytest.fixture
def private_stack(tmp_path: Path) -> Iterator[PrivateStack]:
    """A broker and PostgreSQL of the test's own (tests/private_stack.py), for outages and restarts."""
    stack = PrivateStack(tmp_path / "private")
    try:
        yield stack.start()
    finally:
        stack.close()


@dataclass(frozen=True)
class S3Service:
    """The session's S3 store (SeaweedFS): its endpoint and the credentials it accepts."""

    endpoint: str
    access_key: str
    secret_key: str

    def client(self, secret_key: str | None = None) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required"),
        )


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Service]:
    """AIMA_TEST_S3_ENDPOINT (with AIMA_TEST_S3_ACCESS_KEY and AIMA_TEST_S3_SECRET_KEY) when a store is
    already running; else the project's SeaweedFS (infra/seaweedfs/seaweedfs.sh, built on first use),
    stopped again at the end if this session started it. Only the archive's tests ask for it, all in one
    file, so under xdist one worker starts it."""
    endpoint = os.environ.get("AIMA_TEST_S3_ENDPOINT")
    if endpoint:
        yield S3Service(
            endpoint, os.environ["AIMA_TEST_S3_ACCESS_KEY"], os.environ["AIMA_TEST_S3_SECRET_KEY"]
        )
        return
    script = INFRA / "seaweedfs" / "seaweedfs.sh"
    env = dict(os.environ, AIMA_STATE_DIR=str(Settings().state_dir))
    was_up = subprocess.run([script, "status"], env=env, capture_output=True).returncode == 0
    subprocess.run([script, "start"], env=env, check=True)
    lines = subprocess.run([script, "env"], env=env, check=True, capture_output=True, text=True).stdout
    values = dict(line.split("=", 1) for line in lines.splitlines() if "=" in line)
    try:
        yield S3Service(
            values["AIMA_ARCHIVE_ENDPOINT_URL"],
            values["AIMA_ARCHIVE_ACCESS_KEY_ID"],
            values["AIMA_ARCHIVE_SECRET_ACCESS_KEY"],
        )
    finally:
        if not was_up:
            subprocess.run([script, "stop"], env=env, check=False)


@dataclass(frozen=True)
class JaegerService:
    """The session's OTLP trace backend (Jaeger): where spans go, and its query API."""

    otlp_endpoint: str
    query_url: str


def _free_port_pair() -> int:
    """A free port whose next one is free too (Jaeger's query API takes the pair: HTTP, gRPC)."""
    import socket

    for _ in range(50):
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no pair of free ports")


@pytest.fixture(scope="session")
def jaeger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JaegerService]:
    """AIMA_TEST_OTLP_ENDPOINT with AIMA_TEST_JAEGER_QUERY_URL when a backend is already running; else the
    project's Jaeger (infra/jaeger/jaeger.sh, built on first use into the state folder) on free ports with a
    run folder of the session's own, stopped at the end. Only the tracing tests ask for it."""
    endpoint = os.environ.get("AIMA_TEST_OTLP_ENDPOINT")
    if endpoint:
        yield JaegerService(endpoint, os.environ["AIMA_TEST_JAEGER_QUERY_URL"])
        return
    script = INFRA / "jaeger" / "jaeger.sh"
    state = {"AIMA_STATE_DIR": str(Settings().state_dir)}
    # Built (or, while CI builds it in the background, waited for) before the ports are picked.
    subprocess.run([script, "install"], env=dict(os.environ, **state), check=True)
    query_port = _free_port_pair()
    otlp_port = _free_port_pair()
    while otlp_port in (query_port, query_port + 1):
        otlp_port = _free_port_pair()
    env = dict(
        os.environ,
        **state,
        AIMA_JAEGER_RUN_DIR=str(tmp_path_factory.mktemp("jaeger")),
        AIMA_JAEGER_OTLP_PORT=str(otlp_port),
        AIMA_JAEGER_QUERY_PORT=str(query_port),
    )
    subprocess.run([script, "start"], env=env, check=True)
    try:
        yield JaegerService(f"http://127.0.0.1:{otlp_port}", f"http://127.0.0.1:{query_port}")
    finally:
        subprocess.run([script, "stop"], env=env, check=False)
