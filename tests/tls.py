"""A certificate authority of the test session's own, for the TLS tests (P2): made fresh in a folder by
:meth:`TestCA.create` (never checked in, never reused), it signs server certificates whose subject
alternative names are the loopback addresses the test servers listen on, so clients can verify both the
chain and the host name (``sslmode=verify-full``, librdkafka's and Python's default host check)."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["ServerCert", "TestCA"]

VALID = timedelta(days=2)
"""Long enough for any test session, short enough that a leaked one is worthless."""


@dataclass(frozen=True)
class ServerCert:
    cert: Path
    """PEM: the server's certificate, then the CA's (the chain a server presents)."""
    key: Path
    """PEM: the unencrypted PKCS#8 private key (mode 0600)."""


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "aima-metrics tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


CA_USAGE = x509.KeyUsage(
    digital_signature=True,
    key_cert_sign=True,
    crl_sign=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    encipher_only=False,
    decipher_only=False,
)


class TestCA:
    """``TestCA.create(folder)`` writes ``ca.pem`` (what clients trust) and keeps the CA key in memory only;
    :meth:`issue` writes a server certificate and key signed by it."""

    __test__ = False  # not a pytest test class

    def __init__(self, folder: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self.folder = folder
        self._key = key
        self._cert = cert
        self.ca_pem = folder / "ca.pem"
        self.ca_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    @classmethod
    def create(cls, folder: Path, name: str = "aima-metrics test CA") -> TestCA:
        folder.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + VALID)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(CA_USAGE, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(folder, key, cert)

    def issue(
        self, name: str, *, ips: tuple[str, ...] = ("127.0.0.1",), dns: tuple[str, ...] = ("localhost",)
    ) -> ServerCert:
        """A server certificate for ``ips`` and ``dns`` names, written as ``<name>.crt``/``<name>.key``."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        alt_names: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        alt_names += [x509.DNSName(host) for host in dns]
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + VALID)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            # The broker also connects to itself (inter-broker listener) and checks this certificate as a
            # client would; serverAuth alone is what every hop needs.
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        chain = cert.public_bytes(serialization.Encoding.PEM) + self.ca_pem.read_bytes()
        server = ServerCert(self.folder / f"{name}.crt", self.folder / f"{name}.key")
        server.cert.write_bytes(chain)
        _write_private(server.key, _pem_key(key))
        return server
