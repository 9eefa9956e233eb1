"""A broker and a PostgreSQL server of a test's own, for tests that stop, restart or break them (outages,
restarts, the ledger): the session's shared services stay untouched, so other tests (and other people's
test sessions on the same machine) never see the outage.

Both are the real servers, started through the project's own scripts (infra/kafka/kafka.sh,
infra/postgres/postgres.sh) with a state folder and ports of their own; the Kafka jars come from the shared
cache that ``./dev setup`` fills. Stopping and starting keeps the data, as a real outage does.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
from pathlib import Path

from bus.settings import REPO_ROOT, Settings

__all__ = ["PrivateStack", "free_port", "free_port_block"]

INFRA = REPO_ROOT / "infra"


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port_block(size: int = 10) -> int:
    """A base port whose ``size`` ports from it are all free now, below the kernel's ephemeral range: a
    port among the ephemeral ones (the kernel's ``bind(0)`` pick, plus n) can be taken by any test's
    outgoing connection or ``bind(0)`` before the process meant for it listens (tests run side by side
    under xdist)."""
    top = _ephemeral_start() - size
    for _ in range(200):
        base = random.randrange(20_000, top)
        if all(_bindable(base + i) for i in range(size)):
            return base
    raise RuntimeError(f"no free block of {size} ports below {top + size}")


def free_port() -> int:
    """A TCP port nothing listens on right now, for a server a test starts (see :func:`free_port_block`
    for why not the kernel's pick)."""
    return free_port_block(1)


class PrivateStack:
    """``start()`` brings up a broker and PostgreSQL in ``state_dir``; ``stop_kafka``/``start_kafka`` and
    ``stop_postgres``/``start_postgres`` make outages; ``close()`` stops both and removes their data."""

    def __init__(self, state_dir: Path, *, kafka: bool = True, postgres: bool = True) -> None:
        self.state_dir = state_dir
        self.kafka_port = free_port()
        self.pg_port = free_port()
        self.want_kafka, self.want_postgres = kafka, postgres
        self.env = dict(
            os.environ,
            AIMA_STATE_DIR=str(state_dir),
            AIMA_CACHE_DIR=str(REPO_ROOT / ".aima" / "cache"),
            AIMA_KAFKA_PORT=str(self.kafka_port),
            AIMA_KAFKA_CONTROLLER_PORT=str(free_port()),
            AIMA_KAFKA_HEAP="384m",
            AIMA_KAFKA_START_TIMEOUT_S="180",
            AIMA_PG_PORT=str(self.pg_port),
        )
        self.env.pop("AIMA_KAFKA_BOOTSTRAP", None)
        self.env.pop("AIMA_DATABASE_URL", None)

    @property
    def kafka_bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def database_url(self) -> str:
        return (self.state_dir / "postgres" / "dsn").read_text().strip()

    def settings(self, **overrides: object) -> Settings:
        """Settings pointing at this stack (and its state folder)."""
        values: dict[str, object] = {"kafka_bootstrap": self.kafka_bootstrap, "state_dir": self.state_dir}
        if self.want_postgres:
            values["database_url"] = self.database_url
        values.update(overrides)
        return Settings(**values)

    def process_env(self, **extra: str) -> dict[str, str]:
        """Environment for a pipeline subprocess that talks to this stack."""
        env = dict(self.env, AIMA_KAFKA_BOOTSTRAP=self.kafka_bootstrap, **extra)
        if self.want_postgres:
            env["AIMA_DATABASE_URL"] = self.database_url
        return env

    def start(self) -> PrivateStack:
        if self.want_kafka:
            self.start_kafka()
        if self.want_postgres:
            self.start_postgres()
        return self

    def _script(self, script: str, verb: str) -> None:
        subprocess.run([INFRA / script, verb], env=self.env, check=True, capture_output=True, timeout=240)

    def start_kafka(self) -> None:
        self._script("kafka/kafka.sh", "start")

    def stop_kafka(self) -> None:
        self._script("kafka/kafka.sh", "stop")

    def start_postgres(self) -> None:
        self._script("postgres/postgres.sh", "start")

    def stop_postgres(self) -> None:
        self._script("postgres/postgres.sh", "stop")

    def close(self) -> None:
        """Stop both (whatever state they are in) and remove the data, also a cluster that postgres.sh
        placed outside the state folder (where the 'postgres' user could not reach it)."""
        for script in ("kafka/kafka.sh", "postgres/postgres.sh"):
            subprocess.run([INFRA / script, "stop"], env=self.env, check=False, capture_output=True)
        datadir = self.state_dir / "postgres" / "datadir"
        if datadir.exists():
            outside = Path(datadir.read_text().strip())
            if outside.is_dir() and not outside.is_relative_to(self.state_dir):
                shutil.rmtree(outside, ignore_errors=True)
        with contextlib.suppress(OSError):
            shutil.rmtree(self.state_dir / "kafka" / "data")
