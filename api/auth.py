"""API tokens and what they may read (A2, P3).

A token is ``aima_<id-prefix>_<secret>``: the first 12 hex digits of its id (so a leaked token can be
recognised in ``api_tokens``) and 32 random bytes. Only a hash is stored: SHA-256 of the whole token, or
HMAC-SHA256 keyed with a server-side pepper (``AIMA_API_TOKEN_PEPPER``) when one is configured, so a copy
of the table alone does not let anyone check guesses. The plaintext is shown once, when it is created.

Roles:
- ``admin``: everything (scopes are not consulted).
- ``finance``: costs, budgets and the cost metrics (those of the cost processor) of every project, plus
  any metric named in its scopes.
- ``user``: the metrics its scopes name (``metrics:read:<name>`` or ``metrics:read:*``); job and project
  data (metrics labelled with a project or job, costs, budgets) only of the projects the token lists.
Alerts, the alert stream and silences are for admins.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

import psycopg
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from psycopg.rows import dict_row

from api import audit, audit_log, deps
from api.audit_log import Origin
from api.errors import ApiError
from bus import catalogue
from bus.catalogue import Metric

__all__ = [
    "ROLES",
    "Auth",
    "Principal",
    "Refused",
    "authenticated",
    "create_token",
    "hash_token",
    "identify",
    "list_tokens",
    "lookup",
    "parse_scopes",
    "revoke_token",
]

Role = Literal["admin", "user", "finance"]
ROLES: tuple[Role, ...] = ("admin", "user", "finance")
SCOPE_PREFIX = "metrics:read:"
_TOKEN_PREFIX = "aima"
_bearer = HTTPBearer(auto_error=False, description="An API token: `aima-metrics token create`")


def hash_token(token: str, pepper: str | None) -> str:
    if pepper:
        return hmac.new(pepper.encode(), token.encode(), hashlib.sha256).hexdigest()
    return hashlib.sha256(token.encode()).hexdigest()


def parse_scopes(scopes: Iterable[str]) -> list[str]:
    """Checks every scope: ``metrics:read:*`` (or ``*``) or ``metrics:read:<a catalogue metric>``."""
    checked = []
    for scope in scopes:
        scope = scope.strip()
        if scope == "*":  # as the migration's comment allows: the same as metrics:read:*
            scope = f"{SCOPE_PREFIX}*"
        if not scope.startswith(SCOPE_PREFIX):
            raise ValueError(f"scope {scope!r} is not metrics:read:<metric> or metrics:read:*")
        name = scope.removeprefix(SCOPE_PREFIX)
        if name != "*" and name not in catalogue.BY_NAME:
            raise ValueError(f"scope {scope!r} names no metric of the catalogue")
        checked.append(scope)
    return checked


def create_token(
    conn: psycopg.Connection[Any],
    role: str,
    scopes: Iterable[str] = (),
    projects: Iterable[str] = (),
    name: str = "",
    *,
    subject: str | None = None,
    expires_at: datetime | None = None,
    pepper: str | None = None,
    origin: Origin | None = None,
) -> tuple[str, str]:
    """Stores a new token; returns (its id, the plaintext token): the only time the plaintext exists.
    Audited as ``token.create`` by ``origin`` (default: this process's user) in the same transaction."""
    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
    checked = parse_scopes(scopes)
    project_list = [p.strip() for p in projects if p.strip()]
    token_id = uuid.uuid4()
    token = f"{_TOKEN_PREFIX}_{token_id.hex[:12]}_{secrets.token_urlsafe(32)}"
    with conn.transaction():
        conn.execute(
            """INSERT INTO api_tokens (id, name, token_hash, role, scopes, projects, subject, expires_at)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s)""",
            (
                token_id,
                name or f"{role}-{token_id.hex[:8]}",
                hash_token(token, pepper),
                role,
                checked,
                project_list,
                subject,
                expires_at,
            ),
        )
        audit_log.record_event(
            conn,
            "token.create",
            endpoint="aima-metrics token create",
            origin=origin or Origin.local(),
            target=str(token_id),
            parameters={
                "name": name or f"{role}-{token_id.hex[:8]}",
                "role": role,
                "scopes": checked,
                "projects": project_list,
                "expires_at": expires_at,
            },
        )
    return str(token_id), token


def list_tokens(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """SELECT id, name, role, scopes, projects, subject, created_at, expires_at, revoked_at
                 FROM api_tokens ORDER BY created_at, id"""
        )
        return cur.fetchall()


def revoke_token(conn: psycopg.Connection[Any], token_id: str, *, origin: Origin | None = None) -> bool:
    """Marks a token revoked (kept for the audit trail); False when no such unrevoked token exists. Audited
    as ``token.revoke`` by ``origin`` (default: this process's user), found or not (outcome invalid)."""
    try:
        key = uuid.UUID(token_id)
    except ValueError:
        raise ValueError(f"{token_id!r} is not a token id (a UUID)") from None
    with conn.transaction():
        cur = conn.execute(
            "UPDATE api_tokens SET revoked_at = now() WHERE id = %s AND revoked_at IS NULL", (key,)
        )
        found = cur.rowcount > 0
        audit_log.record_event(
            conn,
            "token.revoke",
            endpoint="aima-metrics token revoke",
            origin=origin or Origin.local(),
            target=str(key),
            outcome="allowed" if found else "invalid",
            reason=None if found else "no_active_token",
        )
    return found


@dataclass(frozen=True)
class Principal:
    id: str
    name: str
    role: Role
    scopes: frozenset[str]
    projects: tuple[str, ...]

    @property
    def restricted(self) -> bool:
        """Whether job and project data is limited to :attr:`projects`."""
        return self.role == "user"

    def can_read(self, metric: Metric) -> bool:
        if self.role == "admin":
            return True
        if self.role == "finance" and metric.source == "cost_processor":
            return True
        return f"{SCOPE_PREFIX}*" in self.scopes or f"{SCOPE_PREFIX}{metric.name}" in self.scopes

    def require_metric(self, metric: Metric) -> None:
        if not self.can_read(metric):
            raise ApiError(
                403,
                "forbidden",
                f"this token ({self.role}) may not read metric {metric.name!r}: "
                f"it needs the scope {SCOPE_PREFIX}{metric.name} or {SCOPE_PREFIX}*",
                reason="insufficient_scope",
            )

    def require_role(self, *roles: Role, what: str) -> None:
        if self.role not in roles:
            raise ApiError(
                403,
                "forbidden",
                f"{what} needs the role {' or '.join(roles)}; this token is {self.role}",
                reason="insufficient_role",
            )

    def require_project(self, project: str | None) -> None:
        """A restricted token asking for another project's data explicitly is denied, not given nothing."""
        if self.restricted and project is not None and project not in self.projects:
            raise ApiError(
                403,
                "forbidden",
                f"project {project[:100]!r} is not one of this token's projects",
                reason="project_not_allowed",
            )


@dataclass(frozen=True)
class Refused:
    """Why a token does not authenticate: ``malformed_token``, ``unknown_token``, ``revoked_token`` or
    ``expired_token``; the id and name of the stored token when it is a known one (for the audit row)."""

    reason: str
    token_id: str | None = None
    name: str | None = None


def identify(conn: psycopg.Connection[Any], token: str, pepper: str | None) -> Principal | Refused:
    """The principal of a valid (known, unrevoked, unexpired) token, else why not. One indexed query, the
    same for every token; the caller sees the same 401 whatever the reason."""
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != _TOKEN_PREFIX or len(token) > 200:
        return Refused("malformed_token")
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """SELECT id, name, role, scopes, projects, revoked_at IS NOT NULL AS revoked,
                      coalesce(expires_at <= now(), false) AS expired
                 FROM api_tokens WHERE token_hash = %s""",
            (hash_token(token, pepper),),
        )
        row = cur.fetchone()
    if row is None or not row["id"].hex.startswith(parts[1]):
        return Refused("unknown_token")
    if row["revoked"] or row["expired"]:
        reason = "revoked_token" if row["revoked"] else "expired_token"
        return Refused(reason, str(row["id"]), row["name"])
    return Principal(
        id=str(row["id"]),
        name=row["name"],
        role=row["role"],
        scopes=frozenset(row["scopes"]),
        projects=tuple(row["projects"]),
    )


def lookup(conn: psycopg.Connection[Any], token: str, pepper: str | None) -> Principal | None:
    """The principal of a valid (known, unrevoked, unexpired) token, else None."""
    found = identify(conn, token, pepper)
    return found if isinstance(found, Principal) else None


def authenticated(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    """FastAPI dependency: the request's principal, or 401. Notes the token, role and actor in the
    request's audit row, and for a refused token why (and which stored token it was, never its text)."""
    challenge = {"WWW-Authenticate": 'Bearer realm="aima-metrics"'}
    if credentials is None:
        raise ApiError(
            401,
            "unauthenticated",
            "send an API token as 'Authorization: Bearer <token>'",
            headers=challenge,
            reason="missing_token",
        )
    state = deps.api_state(request)
    with state.pool.connection(timeout=deps.POOL_TIMEOUT_S) as conn:
        found = identify(conn, credentials.credentials, state.config.pepper())
    record = audit.current(request)
    if isinstance(found, Refused):
        if record is not None and found.token_id is not None:
            record.token_id, record.actor = found.token_id, audit_log.clean(f"api:{found.name}")
        raise ApiError(
            401,
            "unauthenticated",
            "the token is unknown, revoked or expired",
            headers=challenge,
            reason=found.reason,
        )
    if record is not None:
        record.token_id, record.role = found.id, found.role
        record.actor = audit_log.clean(f"api:{found.name}")
    return found


Auth = Annotated[Principal, Depends(authenticated)]
"""A route parameter of this type gets the authenticated principal (or the request is answered 401)."""
