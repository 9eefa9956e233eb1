"""A broker and a PostgreSQL server that speak only TLS, with authentication, for the TLS tests (P2):

- Kafka from the shared jar cache with infra/kafka/server-sasl-ssl.properties: its one client listener is
  SASL_SSL, SCRAM-SHA-512 users created when the storage is formatted;
- PostgreSQL started by infra/postgres/postgres.sh (through :class:`tests.private_stack.PrivateStack`),
  then switched to ``ssl = on`` with a pg_hba that accepts TCP only as ``hostssl`` (plain TCP: ``reject``);
- a :class:`tests.tls.TestCA` made for the stack, whose ``ca.pem`` the clients verify both servers with.

Passwords are generated here, per stack; ports are free ones below the ephemeral range. The session's
shared broker and database are never touched. :meth:`TlsStack.env` is what a pipeline process needs to talk
to this stack (the same AIMA_* variables a user sets, README "Encryption in transit")."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import psycopg

from bus.kafka import BrokerUnavailable, wait_for_broker
from bus.settings import REPO_ROOT, Settings
from tests.private_stack import PrivateStack, free_port
from tests.tls import ServerCert, TestCA

__all__ = ["TlsStack"]

INFRA = REPO_ROOT / "infra"
KAFKA_USER = "aima"
ADMIN_USER = "admin"
MECHANISM = "SCRAM-SHA-512"
START_TIMEOUT_S = 240.0


def _kafka_lib() -> Path:
    pom = (INFRA / "kafka" / "pom.xml").read_text()
    version = pom.split("<kafka.version>", 1)[1].split("</kafka.version>", 1)[0].strip()
    lib = REPO_ROOT / ".aima" / "cache" / f"kafka-{version}" / "lib"
    if not (lib / ".complete").exists():
        raise RuntimeError(f"no Kafka jars in {lib}: run ./dev setup (or infra/kafka/kafka.sh fetch)")
    return lib


class TlsStack:
    """``start()`` makes the CA and certificates, then brings up the broker and PostgreSQL in
    ``state_dir``; ``close()`` stops both and removes their data."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.ca = TestCA.create(state_dir / "tls")
        self.kafka_port = free_port()
        self.controller_port = free_port()
        self.kafka_password = secrets.token_hex(16)
        self._admin_password = secrets.token_hex(16)
        self._broker: subprocess.Popen[bytes] | None = None
        self._pg = PrivateStack(state_dir / "pg", kafka=False)
        self.server = self.ca.issue("server")
        self.api_cert = self.ca.issue("api")

    # -- what clients use ------------------------------------------------------------------------------

    @property
    def kafka_bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def database_url(self) -> str:
        """The libpq URL at ``sslmode=verify-full`` against the stack's CA."""
        return f"{self._pg.database_url}?sslmode=verify-full&sslrootcert={self.ca.ca_pem}"

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a pipeline process: TLS and SASL for Kafka, verify-full for PostgreSQL."""
        env = dict(
            self._pg.env,
            AIMA_STATE_DIR=str(self.state_dir / "state"),
            AIMA_KAFKA_BOOTSTRAP=self.kafka_bootstrap,
            AIMA_KAFKA_SECURITY_PROTOCOL="SASL_SSL",
            AIMA_KAFKA_SASL_MECHANISM=MECHANISM,
            AIMA_KAFKA_SASL_USERNAME=KAFKA_USER,
            AIMA_KAFKA_SASL_PASSWORD=self.kafka_password,
            AIMA_KAFKA_SSL_CA_LOCATION=str(self.ca.ca_pem),
            AIMA_DATABASE_URL=self.database_url,
        )
        env.update(extra)
        return env

    def settings(self, **overrides: object) -> Settings:
        """Settings pointing at this stack, built from :meth:`env` as a process would build them."""
        values = {k: v for k, v in self.env().items() if k.startswith("AIMA_")}
        return Settings.from_environ(values, **overrides)

    # -- life cycle ------------------------------------------------------------------------------------

    def start(self) -> TlsStack:
        try:
            self._start_postgres()
            self._start_kafka()
        except BaseException:
            self.close()
            raise
        return self

    def _java(self, *args: str) -> list[str]:
        lib = _kafka_lib()
        logs = self.state_dir / "kafka" / "logs"
        return [
            "java", "-cp", f"{lib}/*", f"-Dlog4j2.configurationFile={INFRA / 'kafka' / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={logs}", *args,
        ]  # fmt: skip

    def _start_kafka(self) -> None:
        folder = self.state_dir / "kafka"
        (folder / "logs").mkdir(parents=True, exist_ok=True)
        keystore = folder / "broker.pem"
        keystore.write_bytes(self.server.key.read_bytes() + self.server.cert.read_bytes())
        keystore.chmod(0o600)
        filled = {
            "@KAFKA_PORT@": str(self.kafka_port),
            "@CONTROLLER_PORT@": str(self.controller_port),
            "@DATA_DIR@": str(folder / "data"),
            "@KEYSTORE_PEM@": str(keystore),
            "@CA_PEM@": str(self.ca.ca_pem),
            "@ADMIN_USER@": ADMIN_USER,
            "@ADMIN_PASSWORD@": self._admin_password,
        }
        text = (INFRA / "kafka" / "server-sasl-ssl.properties").read_text()
        for placeholder, value in filled.items():
            text = text.replace(placeholder, value)
        properties = folder / "server.properties"
        properties.write_text(text)
        properties.chmod(0o600)  # it holds the admin's password
        cluster = subprocess.run(
            self._java("kafka.tools.StorageTool", "random-uuid"),
            check=True, capture_output=True, text=True, timeout=120,
        ).stdout.strip()  # fmt: skip
        scram = [
            arg
            for user, password in ((ADMIN_USER, self._admin_password), (KAFKA_USER, self.kafka_password))
            for arg in ("--add-scram", f"{MECHANISM}=[name={user},password={password}]")
        ]
        subprocess.run(
            self._java("kafka.tools.StorageTool", "format", "-t", cluster, "-c", str(properties), *scram),
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        with (folder / "logs" / "stdout.log").open("ab") as out:
            self._broker = subprocess.Popen(
                ["java", "-Xms384m", "-Xmx384m", *self._java("kafka.Kafka", str(properties))[1:]],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for_broker(self.settings(), timeout_s=START_TIMEOUT_S)
        except BrokerUnavailable:
            log = folder / "logs" / "server.log"
            tail = log.read_text()[-4000:] if log.exists() else "(no server.log)"
            raise BrokerUnavailable(f"the SASL_SSL broker did not answer; server.log ends:\n{tail}") from None

    def _start_postgres(self) -> None:
        """postgres.sh makes the cluster (role, database, password); then TLS goes on and plain TCP off,
        and a restart applies it (ssl = on needs one)."""
        self._pg.start_postgres()
        datadir = Path((self._pg.state_dir / "postgres" / "datadir").read_text().strip())
        owner = datadir.stat()
        placed = ServerCert(datadir / "server.crt", datadir / "server.key")
        for source, target in ((self.server.cert, placed.cert), (self.server.key, placed.key)):
            shutil.copyfile(source, target)
            target.chmod(0o600)  # PostgreSQL refuses a key others can read
            if os.geteuid() == 0:
                os.chown(target, owner.st_uid, owner.st_gid)
        with (datadir / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# TLS only (tests/tls_stack.py)\nssl = on\n"
                f"ssl_cert_file = '{placed.cert}'\nssl_key_file = '{placed.key}'\n"
                "ssl_min_protocol_version = 'TLSv1.2'\n"
            )
        # Local (Unix socket, peer) for the administration postgres.sh does; over TCP only TLS with a
        # password, and plain TCP refused outright (rather than left to fall through with no rule).
        (datadir / "pg_hba.conf").write_text(
            "local all all peer\n"
            "hostssl all all 127.0.0.1/32 scram-sha-256\n"
            "hostnossl all all 127.0.0.1/32 reject\n"
        )
        self._pg.stop_postgres()
        self._pg.start_postgres()
        deadline = time.monotonic() + 60
        while True:
            try:
                with psycopg.connect(self.database_url, connect_timeout=5):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)  # the server is still starting: ask again shortly

    def close(self) -> None:
        if self._broker is not None and self._broker.poll() is None:
            self._broker.terminate()
            try:
                self._broker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._broker.kill()
                self._broker.wait(timeout=30)
        self._pg.close()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.state_dir / "kafka" / "data")
