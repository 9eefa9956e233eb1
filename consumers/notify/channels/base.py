"""What every channel shares: the error that tells delivery whether to retry, the channel protocol, and an
HTTP POST that turns transport failures and status codes into that error."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx

from consumers.notify.config import ChannelConfig
from consumers.notify.model import Notification

__all__ = ["Channel", "DeliveryError", "post", "redact"]

USER_AGENT = "aima-notifier/0.1"
# Worth another try: a timeout or overload on the receiver's side, rate limits, server errors.
_RETRYABLE_STATUS = {408, 425, 429}


class DeliveryError(Exception):
    """A delivery attempt failed. ``retryable``: another attempt may succeed (timeouts, 5xx, 429,
    connection errors); otherwise the notification goes straight to the dead-letter topic (4xx, bad
    credentials). ``retry_after_s``: the receiver asked to wait this long (Retry-After)."""

    def __init__(
        self,
        reason: str,
        *,
        retryable: bool = True,
        error_type: str = "DeliveryFailed",
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.error_type = error_type
        self.retry_after_s = retry_after_s


class Channel(Protocol):
    config: ChannelConfig

    def send(self, notification: Notification, progress: set[str]) -> None:
        """Deliver once or raise :class:`DeliveryError`. ``progress`` lives across the retries of one
        notification: a channel with several recipients records those already served, so a retry does not
        serve them twice."""
        ...

    def close(self) -> None: ...


def post(
    client: httpx.Client,
    url: str,
    *,
    timeout_s: float,
    what: str,
    content: bytes | None = None,
    data: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
    auth: tuple[str, str] | None = None,
) -> httpx.Response:
    """POST and return a 2xx response, or raise :class:`DeliveryError`. Reasons name the receiver by
    scheme, host and port only: the path of a Slack or Teams URL is its secret."""
    where = redact(url)
    sent_headers = {"User-Agent": USER_AGENT, **(headers or {})}
    try:
        response = client.post(
            url, content=content, data=data, headers=sent_headers, auth=auth, timeout=timeout_s
        )
    except httpx.TimeoutException as exc:
        raise DeliveryError(
            f"{what} {where}: no answer within {timeout_s:g} s ({type(exc).__name__})",
            error_type="DeliveryTimeout",
        ) from exc
    except httpx.HTTPError as exc:
        raise DeliveryError(
            f"{what} {where}: {type(exc).__name__}: {exc}", error_type="DeliveryUnreachable"
        ) from exc
    if response.is_success:
        return response
    status = response.status_code
    snippet = response.text[:200].strip().replace("\n", " ")
    reason = f"{what} {where} answered HTTP {status}" + (f": {snippet}" if snippet else "")
    retryable = status >= 500 or status in _RETRYABLE_STATUS
    raise DeliveryError(
        reason,
        retryable=retryable,
        error_type="DeliveryFailed" if retryable else "DeliveryRejected",
        retry_after_s=_retry_after(response.headers.get("Retry-After")),
    )


def redact(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - time.time())


def labels_text(labels: Mapping[str, Any], skip: tuple[str, ...] = ("alertname",)) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(labels.items()) if k not in skip)
