"""Email channel: SMTP with STARTTLS (required by default; opportunistic, implicit TLS or none when
configured), one multipart message with a plain-text and an HTML part."""

from __future__ import annotations

import html
import smtplib
import ssl
import time
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

from consumers.notify.channels.base import DeliveryError, labels_text
from consumers.notify.config import EmailConfig
from consumers.notify.model import Alert, Notification, rfc3339

__all__ = ["EmailChannel", "message"]


def message(notification: Notification, config: EmailConfig, now: float | None = None) -> EmailMessage:
    msg = EmailMessage()
    msg["Subject"] = notification.title
    msg["From"] = config.sender
    msg["To"] = ", ".join(config.to)
    msg["Date"] = format_datetime(datetime.fromtimestamp(now if now is not None else time.time(), UTC))
    msg["Message-ID"] = make_msgid(domain=config.sender.rpartition("@")[2] or None)
    msg["X-AIMA-Group-Key"] = notification.group_key
    msg["X-AIMA-Fingerprints"] = ",".join(a.fingerprint for a in notification.alerts)
    msg.set_content(plain_text(notification))
    msg.add_alternative(html_text(notification), subtype="html")
    return msg


def plain_text(notification: Notification) -> str:
    lines = [notification.title, ""]
    for alert in notification.alerts:
        lines.append(f"{alert.rule} [{alert.severity}] {alert.status.upper()}")
        for key in ("summary", "description", "runbook_url"):
            if key in alert.annotations:
                lines.append(f"  {key}: {alert.annotations[key]}")
        if alert.value is not None:
            lines.append(f"  value: {alert.value:g}")
        lines.append(f"  labels: {labels_text(alert.labels)}")
        lines.append(f"  started: {rfc3339(alert.starts_at)}")
        if alert.ends_at is not None:
            lines.append(f"  ended: {rfc3339(alert.ends_at)}")
        lines.append(f"  fingerprint: {alert.fingerprint}")
        lines.append("")
    if notification.external_url:
        lines.append(notification.external_url)
    return "\n".join(lines)


def html_text(notification: Notification) -> str:
    rows = "".join(_row(a) for a in notification.alerts)
    link = (
        f'<p><a href="{html.escape(notification.external_url)}">Open</a></p>'
        if notification.external_url
        else ""
    )
    return (
        "<!DOCTYPE html><html><body>"
        f"<h2>{html.escape(notification.title)}</h2>"
        '<table border="1" cellpadding="4" cellspacing="0">'
        "<tr><th>alert</th><th>severity</th><th>status</th><th>summary</th><th>labels</th><th>started</th>"
        f"<th>fingerprint</th></tr>{rows}</table>{link}</body></html>"
    )


def _row(alert: Alert) -> str:
    cells = [
        alert.rule,
        alert.severity,
        alert.status,
        alert.annotations.get("summary", ""),
        labels_text(alert.labels),
        rfc3339(alert.starts_at),
        alert.fingerprint,
    ]
    return "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"


class EmailChannel:
    def __init__(self, config: EmailConfig) -> None:
        self.config = config
        self._tls = ssl.create_default_context(cafile=config.ca_file) if config.tls != "none" else None

    def send(self, notification: Notification, progress: set[str]) -> None:
        config = self.config
        recipients = [r for r in config.to if r not in progress]
        if not recipients:
            return
        msg = message(notification, config)
        where = f"smtp {config.host}:{config.port}"
        try:
            if config.tls == "implicit":
                smtp: smtplib.SMTP = smtplib.SMTP_SSL(
                    config.host,
                    config.port,
                    local_hostname=config.hello,
                    timeout=config.timeout_s,
                    context=self._tls,
                )
            else:
                smtp = smtplib.SMTP(
                    config.host, config.port, local_hostname=config.hello, timeout=config.timeout_s
                )
            with smtp:
                smtp.ehlo()
                if config.tls == "starttls" or (config.tls == "opportunistic" and smtp.has_extn("starttls")):
                    if not smtp.has_extn("starttls"):
                        raise DeliveryError(
                            f"{where} does not offer STARTTLS (tls: starttls requires it)",
                            retryable=False,
                            error_type="DeliveryRejected",
                        )
                    smtp.starttls(context=self._tls)
                    smtp.ehlo()
                if config.username and config.password is not None:
                    smtp.login(config.username, config.password.get())
                refused = smtp.send_message(msg, from_addr=config.sender, to_addrs=recipients)
        except DeliveryError:
            raise
        except smtplib.SMTPAuthenticationError as exc:
            raise DeliveryError(
                f"{where} refused the login: {exc.smtp_code}", retryable=False, error_type="DeliveryRejected"
            ) from exc
        except smtplib.SMTPRecipientsRefused as exc:
            raise DeliveryError(
                f"{where} refused every recipient: {_refusals(exc.recipients)}",
                retryable=False,
                error_type="DeliveryRejected",
            ) from exc
        except smtplib.SMTPResponseException as exc:
            transient = 400 <= exc.smtp_code < 500
            raise DeliveryError(
                f"{where} answered {exc.smtp_code} {exc.smtp_error!r}",
                retryable=transient,
                error_type="DeliveryFailed" if transient else "DeliveryRejected",
            ) from exc
        except ssl.SSLCertVerificationError as exc:
            raise DeliveryError(
                f"{where}: TLS certificate not trusted: {exc.verify_message}",
                retryable=False,
                error_type="DeliveryRejected",
            ) from exc
        except (smtplib.SMTPException, OSError) as exc:
            kind = "DeliveryTimeout" if isinstance(exc, TimeoutError) else "DeliveryUnreachable"
            raise DeliveryError(f"{where}: {type(exc).__name__}: {exc}", error_type=kind) from exc
        progress.update(r for r in recipients if r not in refused)
        if refused:
            raise DeliveryError(
                f"{where} refused {len(refused)} of {len(recipients)} recipients: {_refusals(refused)}",
                retryable=False,
                error_type="DeliveryRejected",
            )

    def close(self) -> None:
        pass


def _refusals(refused: dict[str, tuple[int, bytes]]) -> str:
    return "; ".join(f"{r} ({code})" for r, (code, _) in refused.items())
