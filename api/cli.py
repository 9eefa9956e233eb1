"""What `aima-metrics token ...` does, as plain functions for the command line to call: each opens its own
connection to ``settings.database_dsn()`` (``schema``: the schema holding ``api_tokens``, default the
connection's search_path). Each creation and revocation is audited (``audit_log``) as made by ``by`` (a
name the caller gives) or else the local login."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from api import auth
from api.audit_log import Origin
from bus.settings import Settings

__all__ = ["create_token_cmd", "list_tokens", "revoke_token"]


@contextmanager
def _connect(settings: Settings, schema: str | None) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(settings.database_dsn(), autocommit=True) as conn:
        if schema is not None:
            conn.execute(sql.SQL("SET search_path TO {}, public").format(sql.Identifier(schema)))
        yield conn


def create_token_cmd(
    settings: Settings,
    role: str,
    scopes: Iterable[str] = (),
    projects: Iterable[str] = (),
    name: str = "",
    *,
    expires_at: datetime | None = None,
    schema: str | None = None,
    pepper: str | None = None,
    by: str | None = None,
) -> str:
    """Creates a token and returns its plaintext, to be printed once (it is not stored). ValueError for
    an unknown role or a scope that names no metric. Hashed with ``pepper`` (the command line passes
    AIMA_API_TOKEN_PEPPER's, :class:`api.config.ApiSettings`) when given: the API must run with the same."""
    with _connect(settings, schema) as conn:
        _, token = auth.create_token(
            conn, role, scopes, projects, name, expires_at=expires_at, pepper=pepper, origin=Origin.local(by)
        )
    return token


def list_tokens(settings: Settings, *, schema: str | None = None) -> list[dict[str, Any]]:
    """Every token (never its secret): id, name, role, scopes, projects, created_at, expires_at,
    revoked_at."""
    with _connect(settings, schema) as conn:
        rows = auth.list_tokens(conn)
    return [{**row, "id": str(row["id"])} for row in rows]


def revoke_token(
    settings: Settings, token_id: str, *, schema: str | None = None, by: str | None = None
) -> bool:
    """Revokes a token by id; False when there is no such unrevoked token. ValueError for a malformed id."""
    with _connect(settings, schema) as conn:
        return auth.revoke_token(conn, token_id, origin=Origin.local(by))
