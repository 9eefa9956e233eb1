"""What the API reads from the environment beyond :class:`bus.settings.Settings`, read once when a process
builds it (never at import time):

- ``AIMA_API_HOST`` (default 127.0.0.1) and ``AIMA_API_PORT`` (default 8000): where the API listens.
- ``AIMA_API_TLS_CERT`` and ``AIMA_API_TLS_KEY``: PEM files; when both are set the API speaks HTTPS (P2).
- ``AIMA_API_TOKEN_PEPPER``: a server-side secret mixed into every token hash (HMAC-SHA256 keyed with it).
  Tokens are stored as that hash only; a token created under one pepper does not authenticate under
  another, so changing or removing it revokes every token (create them anew).
- ``AIMA_API_MAX_STREAMS`` (default 100): how many ``/alerts/stream`` clients may listen at once.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ApiConfig"]


@dataclass(frozen=True)
class ApiConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    tls_cert: Path | None = None
    tls_key: Path | None = None
    token_pepper: str | None = None
    max_streams: int = 100

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ApiConfig:
        env = os.environ if environ is None else environ
        cert, key = env.get("AIMA_API_TLS_CERT") or None, env.get("AIMA_API_TLS_KEY") or None
        if (cert is None) != (key is None):
            raise ValueError("TLS needs both AIMA_API_TLS_CERT and AIMA_API_TLS_KEY (or neither)")
        port = env.get("AIMA_API_PORT", "8000")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"AIMA_API_PORT={port!r} is not a TCP port")
        streams = env.get("AIMA_API_MAX_STREAMS", "100")
        if not streams.isdigit():
            raise ValueError(f"AIMA_API_MAX_STREAMS={streams!r} is not a number")
        return cls(
            host=env.get("AIMA_API_HOST", "127.0.0.1"),
            port=int(port),
            tls_cert=Path(cert) if cert else None,
            tls_key=Path(key) if key else None,
            token_pepper=env.get("AIMA_API_TOKEN_PEPPER") or None,
            max_streams=int(streams),
        )

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None
