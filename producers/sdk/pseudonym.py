"""Pseudonymous user ids (P1): a keyed hash (HMAC-SHA256) of the raw id, so the same user maps to the same
pseudonym in every record and process that shares the key, and nobody without the key can map it back
by hashing guessed ids.

The key comes from the caller, else ``AIMA_PSEUDONYM_KEY``, else the file named by
``AIMA_PSEUDONYM_KEY_FILE``. There is deliberately no built-in default: a key in the code would be a key
everyone has, which turns the pseudonym into a plain hash."""

from __future__ import annotations

import hashlib
import hmac
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from producers.settings import PseudonymSettings

__all__ = ["KEY_ENV", "KEY_FILE_ENV", "MIN_KEY_BYTES", "PseudonymKeyMissing", "Pseudonymiser", "load_key"]

KEY_ENV = "AIMA_PSEUDONYM_KEY"
KEY_FILE_ENV = "AIMA_PSEUDONYM_KEY_FILE"
MIN_KEY_BYTES = 16
"""Shorter keys can be found by brute force, and with them every pseudonym reversed."""
PREFIX = "u_"
HEX_CHARS = 16


class PseudonymKeyMissing(RuntimeError):
    """No usable pseudonymisation key is configured; the producer must not start."""


def load_key(key: bytes | str | None = None, *, settings: PseudonymSettings | None = None) -> bytes:
    """The key: ``key`` when given, else ``AIMA_PSEUDONYM_KEY``, else the contents of the file named by
    ``AIMA_PSEUDONYM_KEY_FILE`` (trailing newline stripped), both from ``settings`` (built here from the
    environment when not given: the SDK runs inside a job's process, whose start is not ours). Raises
    :class:`PseudonymKeyMissing`."""
    origin = "the pseudonym_key argument"
    if key is None:
        from producers.settings import PseudonymSettings

        settings = settings or PseudonymSettings()
    if key is None and settings is not None and settings.key is not None:
        key, origin = settings.key.get_secret_value(), KEY_ENV
    elif key is None and settings is not None and settings.key_file is not None:
        path = settings.key_file
        try:
            key, origin = path.read_bytes().rstrip(b"\r\n"), f"{KEY_FILE_ENV} ({path})"
        except OSError as exc:
            raise PseudonymKeyMissing(f"cannot read the pseudonym key file {path}: {exc}") from exc
    if key is None:
        raise PseudonymKeyMissing(
            f"no pseudonymisation key: set {KEY_ENV}, or {KEY_FILE_ENV} to a file holding the key, or pass "
            "pseudonym_key; user ids are never sent unhashed (requirement P1)"
        )
    raw = key.encode() if isinstance(key, str) else bytes(key)
    if len(raw) < MIN_KEY_BYTES:
        raise PseudonymKeyMissing(
            f"the pseudonym key from {origin} has {len(raw)} bytes; use at least {MIN_KEY_BYTES} "
            "(e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`)"
        )
    return raw


class Pseudonymiser:
    """Maps raw user ids to ``u_`` + 16 hex characters (64 bits of HMAC-SHA256). Holds the key; its repr
    never shows it."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes | str | None = None) -> None:
        self._key = load_key(key)

    def __call__(self, user_id: str) -> str:
        digest = hmac.new(self._key, user_id.encode("utf-8"), hashlib.sha256).hexdigest()
        return PREFIX + digest[:HEX_CHARS]

    def __repr__(self) -> str:
        return "Pseudonymiser(key=<hidden>)"
