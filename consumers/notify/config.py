"""The notifier's routing configuration: receivers (each a set of channels), a route tree that picks
receivers by rule, severity, labels and the channels a rule names, and the grouping timers.

Read from the YAML file that ``AIMA_NOTIFY_CONFIG`` names. Secrets (webhook HMAC keys, SMTP passwords,
Slack and Teams URLs, SMS tokens) come from environment variables or files named in the YAML
(``hmac_key_env: AIMA_WEBHOOK_KEY``, ``password_file: /run/secrets/smtp``), never from literals there::

    external_url: https://grafana.example.com
    delivery: {max_attempts: 10, initial_backoff: 1s, max_backoff: 1m, max_elapsed: 10m, timeout: 10s,
               log_wait: 5m}               # how long a delivery waits for the notification log (below)
    route:
      receiver: ops                    # the root route matches every alert
      group_by: [alertname]            # "..." groups by all labels, i.e. one alert per group
      group_wait: 30s
      group_interval: 5m
      repeat_interval: 4h
      routes:
        - matchers: ["severity=critical"]
          channels: [sms]              # only alerts whose rule names sms (its routing hint)
          receiver: oncall
          group_wait: 0s
          continue: true
    receivers:
      - name: ops
        webhook: {url: "https://hooks.example.com/aima", hmac_key_env: AIMA_WEBHOOK_KEY}
        slack: {url_env: AIMA_SLACK_URL}
        email: {to: [ops@example.com], from: aima@example.com, smarthost: "mail:587",
                username: aima, password_env: AIMA_SMTP_PASSWORD}
      - name: oncall
        sms: {account_sid: AC123, auth_token_env: AIMA_SMS_TOKEN, from: "+4930123", to: ["+4917012"]}

Routing, Alertmanager's way: the root route takes every alert; an alert goes down to the first child that
matches (and on to the next ones where a matching child says ``continue``), and a route no child of which
matches is where it ends. Its receiver is told on every one of its channels. A rule's ``channels`` are a
routing hint, never a filter: a route's ``channels`` (or a matcher on the ``channels`` label) picks the
alerts whose rule names one of them, and a receiver without a channel of that kind still gets them. So a
receiver named by a route without a channel is refused at start (the alerts it would take reach nobody),
and so is a file that routes nothing. Without a routing file at all there is no receiver: every
notification then goes to the dead-letter topic with the reason (:class:`NowhereConfig`), counted, never
settled untold.

``delivery.log_wait``: before a first delivery the notifier asks the notification log (PostgreSQL) whether
this state was already told; while the database is away it waits, up to this long, and then sends
unchecked (a repeat is possible; a lost alert is worse).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from bus import durations
from bus.matchers import InvalidMatcher, Matcher, matchers_of, matches_all
from consumers.notify.model import Alert, channel_kind

if TYPE_CHECKING:
    from consumers.settings import NotifySettings

__all__ = [
    "ALL_LABELS",
    "CHANNEL_KINDS",
    "AppriseConfig",
    "ChannelConfig",
    "ConfigError",
    "EmailConfig",
    "NotifyConfig",
    "NowhereConfig",
    "Receiver",
    "RetryPolicy",
    "Route",
    "Secret",
    "SlackConfig",
    "SmsConfig",
    "TeamsConfig",
    "WebhookConfig",
    "load",
    "load_configured",
    "load_from_env",
    "parse",
    "parse_duration",
]

ALL_LABELS = "..."
CHANNEL_KINDS = ("webhook", "slack", "teams", "email", "sms", "apprise")
HINT_KINDS = (*CHANNEL_KINDS, "push")
"""What a route's ``channels`` may name: a channel kind, or ``push`` (the web UI's feed, served from the
database, which a rule may name too)."""


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the file and the place in it."""


class Secret:
    """A secret value that never shows up in a repr, a log line or a traceback."""

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str) -> None:
        self._value = value
        self.source = source

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret(from {self.source})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter: before attempt n+1 sleep uniform(0, min(max, initial * 2**n)).
    Delivery gives up after ``max_attempts`` or once ``max_elapsed_s`` has passed, whichever comes first."""

    max_attempts: int = 10
    initial_backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    max_elapsed_s: float = 600.0


@dataclass(frozen=True)
class ChannelConfig:
    """What every channel has: its kind, its id within the receiver (``webhook``, or ``webhook/1`` for a
    receiver's second webhook), whether it hears about resolved alerts, its timeout and retry policy."""

    kind: str
    id: str
    send_resolved: bool = True
    timeout_s: float = 10.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)


@dataclass(frozen=True)
class WebhookConfig(ChannelConfig):
    url: Secret | None = None
    hmac_key: Secret | None = None
    """None only when the receiver said ``unsigned: true``."""
    max_alerts: int = 0
    """0 sends every alert of the group; more are counted in ``truncatedAlerts``."""
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SlackConfig(ChannelConfig):
    url: Secret | None = None
    channel: str | None = None
    username: str | None = None


@dataclass(frozen=True)
class TeamsConfig(ChannelConfig):
    url: Secret | None = None


@dataclass(frozen=True)
class EmailConfig(ChannelConfig):
    to: tuple[str, ...] = ()
    sender: str = ""
    host: str = "localhost"
    port: int = 587
    tls: str = "starttls"
    """``starttls`` (required), ``opportunistic`` (when the server offers it), ``implicit`` (SMTPS) or
    ``none``."""
    username: str | None = None
    password: Secret | None = None
    ca_file: str | None = None
    hello: str | None = None


@dataclass(frozen=True)
class SmsConfig(ChannelConfig):
    base_url: str = "https://api.twilio.com"
    account_sid: str = ""
    auth_token: Secret | None = None
    sender: str = ""
    to: tuple[str, ...] = ()
    max_chars: int = 1600


@dataclass(frozen=True)
class AppriseConfig(ChannelConfig):
    urls: Secret | None = None
    """One or more Apprise URLs separated by whitespace or commas."""


@dataclass(frozen=True)
class NowhereConfig(ChannelConfig):
    """The one channel of the configuration without a routing file (:meth:`NotifyConfig.empty`): it
    reaches nobody, so every notification on it is dead-lettered with :attr:`reason` (channels/nowhere.py),
    counted and logged like any other, instead of being settled untold."""

    reason: str = "no routing file (AIMA_NOTIFY_CONFIG) names a receiver: nobody was told"


@dataclass(frozen=True)
class Receiver:
    """Who is told: every one of its channels gets each notification routed here."""

    name: str
    channels: tuple[ChannelConfig, ...]


@dataclass(frozen=True)
class Route:
    id: str
    """Position in the tree (``root``, ``root/0``, ``root/0/1``), part of each group's key."""
    receiver: str
    matchers: tuple[Matcher, ...] = ()
    channels: tuple[str, ...] = ()
    """Matches only alerts whose rule names one of these channel kinds (its routing hint, the
    ``channels`` match label); empty matches any."""
    group_by: tuple[str, ...] = ("alertname",)
    group_wait_s: float = 30.0
    group_interval_s: float = 300.0
    repeat_interval_s: float = 4 * 3600.0
    continue_: bool = False
    routes: tuple[Route, ...] = ()

    def matches(self, alert: Alert) -> bool:
        if self.channels and not set(alert.hints) & set(self.channels):
            return False
        return matches_all(self.matchers, alert.match_labels)

    def group_labels(self, alert: Alert) -> dict[str, str]:
        if ALL_LABELS in self.group_by:
            return dict(alert.labels)
        labels = alert.match_labels
        return {name: labels[name] for name in self.group_by if name in labels}

    def select(self, alert: Alert) -> list[Route]:
        """The routes an alert goes to, Alertmanager's way: depth first, the first matching child unless
        it says ``continue``; the route itself when no child matches."""
        found: list[Route] = []
        for child in self.routes:
            if child.matches(alert):
                found.extend(child.select(alert))
                if not child.continue_:
                    break
        return found or [self]

    def walk(self) -> list[Route]:
        """This route and every one below it, depth first."""
        return [self, *(route for child in self.routes for route in child.walk())]

    @property
    def place(self) -> str:
        """Where the route is in the file: ``route``, ``route.routes[0]``, ``route.routes[0].routes[1]``."""
        return "route" + "".join(f".routes[{i}]" for i in self.id.split("/")[1:])


@dataclass(frozen=True)
class NotifyConfig:
    route: Route
    receivers: Mapping[str, Receiver]
    external_url: str = ""
    workers: int = 16
    """Concurrent deliveries (threads)."""
    log_wait_s: float = 300.0
    """How long a delivery waits for an unreachable notification log before it sends unchecked."""
    source: str = "<defaults>"

    def __post_init__(self) -> None:
        """Every route ends at a receiver that exists and has a channel: an alert always reaches someone
        (or, without a routing file, the dead-letter topic)."""
        for route in self.route.walk():
            receiver = self.receivers.get(route.receiver)
            if receiver is None:
                known = ", ".join(sorted(self.receivers)) or "none"
                raise ConfigError(
                    f"route {route.id} names receiver {route.receiver!r}, which is not defined "
                    f"(receivers: {known})"
                )
            if not receiver.channels:
                raise ConfigError(
                    f"route {route.id} ({route.place}) ends at receiver {receiver.name!r}, which has no "
                    f"channel: the alerts routed there would reach nobody. Give receiver "
                    f"{receiver.name!r} a channel ({', '.join(CHANNEL_KINDS)}) or route those alerts to "
                    "a receiver that has one"
                )

    def receiver(self, name: str) -> Receiver:
        return self.receivers[name]

    @property
    def nowhere(self) -> bool:
        """Without a routing file: every notification goes to the dead-letter topic."""
        return any(isinstance(c, NowhereConfig) for r in self.receivers.values() for c in r.channels)

    @classmethod
    def empty(cls) -> NotifyConfig:
        """Without a routing file: one receiver, ``none``, whose one channel dead-letters every
        notification with the reason (the web UI's feed, from the database, shows the alerts still)."""
        nowhere = NowhereConfig(kind="none", id="none")
        return cls(route=Route(id="root", receiver="none"), receivers={"none": Receiver("none", (nowhere,))})


# ---- parsing -----------------------------------------------------------------------------------------


def parse_duration(value: Any, where: str = "duration") -> float:
    """A duration in the one grammar (bus/durations.py: ``30s``, ``5m``, ``1h30m``, ``1w``) or a number of
    seconds; returns seconds. The error names the field."""
    try:
        return durations.parse_duration(value).total_seconds()
    except durations.InvalidDuration as exc:
        raise ConfigError(f"{where}: {value!r} is not a duration like 30s, 5m, 4h or 1h30m ({exc})") from None


def load_configured(settings: NotifySettings, environ: Mapping[str, str] | None = None) -> NotifyConfig:
    """The file ``settings`` name (AIMA_NOTIFY_CONFIG); the empty configuration when they name none."""
    if settings.config is None:
        return NotifyConfig.empty()
    return load(settings.config, environ)


def load_from_env() -> NotifyConfig:
    """:func:`load_configured` with the process's own :class:`consumers.settings.NotifySettings`, for a
    caller that has built none (the notifier's ``run()`` without a ``config``)."""
    from consumers.settings import NotifySettings

    return load_configured(NotifySettings())


def load(path: Path, environ: Mapping[str, str] | None = None) -> NotifyConfig:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read notifier configuration {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse(data, environ, source=str(path))


def parse(data: Any, environ: Mapping[str, str] | None = None, source: str = "<config>") -> NotifyConfig:
    """A configuration from the YAML's data; every error names ``source`` and the place in it."""
    env = os.environ if environ is None else environ
    try:
        return _Parser(env, source).config(data)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


class _Parser:
    def __init__(self, env: Mapping[str, str], source: str) -> None:
        self.env = env
        self.source = source

    def config(self, data: Any) -> NotifyConfig:
        data = _mapping(data if data is not None else {}, "top level")
        _known(data, {"external_url", "delivery", "route", "receivers", "workers"}, "top level")
        delivery = _mapping(data.get("delivery", {}), "delivery")
        _known(
            delivery,
            {"max_attempts", "initial_backoff", "max_backoff", "max_elapsed", "timeout", "log_wait"},
            "delivery",
        )
        retry = self.retry(delivery, RetryPolicy(), "delivery")
        timeout_s = parse_duration(delivery.get("timeout", 10), "delivery.timeout")
        log_wait_s = parse_duration(delivery.get("log_wait", NotifyConfig.log_wait_s), "delivery.log_wait")

        receivers: dict[str, Receiver] = {}
        for i, raw in enumerate(_sequence(data.get("receivers", []), "receivers")):
            receiver = self.receiver(_mapping(raw, f"receivers[{i}]"), i, retry, timeout_s)
            if receiver.name in receivers:
                raise ConfigError(f"receivers[{i}]: a receiver named {receiver.name!r} already exists")
            receivers[receiver.name] = receiver
        if "route" not in data:
            if receivers:
                raise ConfigError("'route' is missing: it names the default receiver (route.receiver)")
            raise ConfigError(
                "no route and no receivers: every alert would reach nobody (give a route and a receiver "
                "with a channel, or leave AIMA_NOTIFY_CONFIG unset: then every alert is dead-lettered)"
            )
        root = self.route(_mapping(data["route"], "route"), None, "root", "route")
        workers = data.get("workers", 16)
        if not isinstance(workers, int) or workers < 1:
            raise ConfigError(f"workers: {workers!r} is not a positive integer")
        return NotifyConfig(
            route=root,
            receivers=receivers,
            external_url=str(data.get("external_url", "")),
            workers=workers,
            log_wait_s=log_wait_s,
            source=self.source,
        )

    def retry(self, raw: Mapping[str, Any], base: RetryPolicy, where: str) -> RetryPolicy:
        attempts = raw.get("max_attempts", base.max_attempts)
        if not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 1:
            raise ConfigError(f"{where}.max_attempts: {attempts!r} is not a positive integer")
        policy = RetryPolicy(
            max_attempts=attempts,
            initial_backoff_s=parse_duration(
                raw.get("initial_backoff", base.initial_backoff_s), f"{where}.initial_backoff"
            ),
            max_backoff_s=parse_duration(raw.get("max_backoff", base.max_backoff_s), f"{where}.max_backoff"),
            max_elapsed_s=parse_duration(raw.get("max_elapsed", base.max_elapsed_s), f"{where}.max_elapsed"),
        )
        if policy.max_backoff_s < policy.initial_backoff_s:
            raise ConfigError(f"{where}: max_backoff is shorter than initial_backoff")
        return policy

    def route(self, raw: Mapping[str, Any], parent: Route | None, route_id: str, where: str) -> Route:
        _known(
            raw,
            {
                "receiver",
                "matchers",
                "channels",
                "group_by",
                "group_wait",
                "group_interval",
                "repeat_interval",
                "continue",
                "routes",
            },
            where,
        )
        receiver = raw.get("receiver", parent.receiver if parent else None)
        if not receiver:
            raise ConfigError(f"{where}.receiver is missing: the root route names the default receiver")
        try:
            matchers = matchers_of(_sequence(raw.get("matchers", []), f"{where}.matchers"))
        except InvalidMatcher as exc:
            raise ConfigError(f"{where}.matchers: {exc}") from None
        if parent is None and matchers:
            raise ConfigError(f"{where}.matchers: the root route matches every alert and takes no matchers")
        channels = tuple(str(c) for c in _sequence(raw.get("channels", []), f"{where}.channels"))
        for name in channels:
            if channel_kind(name) not in HINT_KINDS:
                raise ConfigError(
                    f"{where}.channels: unknown channel {name!r} (known: {', '.join(HINT_KINDS)})"
                )
        inherited = parent or Route(id="", receiver=str(receiver))
        group_by = raw.get("group_by")
        route = Route(
            id=route_id,
            receiver=str(receiver),
            matchers=matchers,
            channels=tuple(channel_kind(c) for c in channels),
            group_by=(
                tuple(str(g) for g in _sequence(group_by, f"{where}.group_by"))
                if group_by is not None
                else inherited.group_by
            ),
            group_wait_s=self.duration(raw, "group_wait", inherited.group_wait_s, where),
            group_interval_s=self.duration(raw, "group_interval", inherited.group_interval_s, where),
            repeat_interval_s=self.duration(raw, "repeat_interval", inherited.repeat_interval_s, where),
            continue_=bool(raw.get("continue", False)),
        )
        if route.group_interval_s <= 0:
            raise ConfigError(f"{where}.group_interval must be more than 0")
        children = tuple(
            self.route(
                _mapping(child, f"{where}.routes[{i}]"), route, f"{route_id}/{i}", f"{where}.routes[{i}]"
            )
            for i, child in enumerate(_sequence(raw.get("routes", []), f"{where}.routes"))
        )
        return replace(route, routes=children)

    @staticmethod
    def duration(raw: Mapping[str, Any], key: str, default: float, where: str) -> float:
        return parse_duration(raw[key], f"{where}.{key}") if key in raw else default

    def receiver(self, raw: Mapping[str, Any], index: int, retry: RetryPolicy, timeout_s: float) -> Receiver:
        where = f"receivers[{index}]"
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}.name is missing")
        where = f"receiver {name!r}"
        _known(raw, {"name", *CHANNEL_KINDS}, where)
        channels: list[ChannelConfig] = []
        for kind in CHANNEL_KINDS:
            if kind not in raw:
                continue
            entries = raw[kind] if isinstance(raw[kind], list) else [raw[kind]]
            for i, entry in enumerate(entries):
                channel_id = kind if len(entries) == 1 else f"{kind}/{i}"
                place = f"{where}.{kind}" + (f"[{i}]" if len(entries) > 1 else "")
                channels.append(
                    self.channel(kind, channel_id, _mapping(entry, place), place, retry, timeout_s)
                )
        return Receiver(name=name, channels=tuple(channels))

    def channel(
        self,
        kind: str,
        channel_id: str,
        raw: Mapping[str, Any],
        where: str,
        retry: RetryPolicy,
        timeout_s: float,
    ) -> ChannelConfig:
        common_keys = {"send_resolved", "timeout", "retry"}
        retry_raw = _mapping(raw.get("retry", {}), f"{where}.retry")
        _known(retry_raw, {"max_attempts", "initial_backoff", "max_backoff", "max_elapsed"}, f"{where}.retry")
        common: dict[str, Any] = {
            "kind": kind,
            "id": channel_id,
            "send_resolved": bool(raw.get("send_resolved", True)),
            "timeout_s": parse_duration(raw.get("timeout", timeout_s), f"{where}.timeout"),
            "retry": self.retry(retry_raw, retry, f"{where}.retry"),
        }
        if common["timeout_s"] <= 0:
            raise ConfigError(f"{where}.timeout must be more than 0")
        if kind == "webhook":
            _known(
                raw,
                common_keys | _secret_keys("url", "hmac_key") | {"unsigned", "max_alerts", "headers"},
                where,
            )
            unsigned = bool(raw.get("unsigned", False))
            key = self.secret(raw, "hmac_key", where, required=not unsigned, literal=False)
            if unsigned and key is not None:
                raise ConfigError(f"{where}: 'unsigned: true' and an hmac_key contradict each other")
            headers = _mapping(raw.get("headers", {}), f"{where}.headers")
            return WebhookConfig(
                **common,
                url=self.url(raw, where),
                hmac_key=key,
                max_alerts=int(raw.get("max_alerts", 0)),
                headers={str(k): str(v) for k, v in headers.items()},
            )
        if kind == "slack":
            _known(raw, common_keys | _secret_keys("url") | {"channel", "username"}, where)
            return SlackConfig(
                **common, url=self.url(raw, where), channel=raw.get("channel"), username=raw.get("username")
            )
        if kind == "teams":
            _known(raw, common_keys | _secret_keys("url"), where)
            return TeamsConfig(**common, url=self.url(raw, where))
        if kind == "email":
            return self.email(raw, where, common, common_keys)
        if kind == "sms":
            _known(
                raw,
                common_keys
                | _secret_keys("auth_token")
                | {"base_url", "account_sid", "from", "to", "max_chars"},
                where,
            )
            for key in ("account_sid", "from", "to"):
                if not raw.get(key):
                    raise ConfigError(f"{where}.{key} is missing")
            return SmsConfig(
                **common,
                base_url=str(raw.get("base_url", "https://api.twilio.com")).rstrip("/"),
                account_sid=str(raw["account_sid"]),
                auth_token=self.secret(raw, "auth_token", where, required=True, literal=False),
                sender=str(raw["from"]),
                to=_addresses(raw["to"]),
                max_chars=int(raw.get("max_chars", 1600)),
            )
        _known(raw, common_keys | _secret_keys("urls"), where)
        return AppriseConfig(**common, urls=self.secret(raw, "urls", where, required=True, literal=True))

    def email(
        self, raw: Mapping[str, Any], where: str, common: dict[str, Any], keys: set[str]
    ) -> EmailConfig:
        _known(
            raw,
            keys
            | _secret_keys("password")
            | {"to", "from", "smarthost", "host", "port", "tls", "username", "ca_file", "hello"},
            where,
        )
        for key in ("to", "from"):
            if not raw.get(key):
                raise ConfigError(f"{where}.{key} is missing")
        tls = str(raw.get("tls", "starttls"))
        if tls not in ("starttls", "opportunistic", "implicit", "none"):
            raise ConfigError(f"{where}.tls: {tls!r} is not starttls, opportunistic, implicit or none")
        host, port = str(raw.get("host", "localhost")), raw.get("port")
        if "smarthost" in raw:
            host, _, port_text = str(raw["smarthost"]).rpartition(":")
            if not host or not port_text.isdigit():
                raise ConfigError(f"{where}.smarthost: {raw['smarthost']!r} is not host:port")
            port = int(port_text)
        if port is None:
            port = 465 if tls == "implicit" else 587
        password = self.secret(raw, "password", where, required=False, literal=False)
        if password is not None and not raw.get("username"):
            raise ConfigError(f"{where}: a password without a username")
        if password is not None and tls == "none":
            raise ConfigError(f"{where}: refusing to send the SMTP password without TLS (tls: none)")
        return EmailConfig(
            **common,
            to=_addresses(raw["to"]),
            sender=str(raw["from"]),
            host=host,
            port=int(port),
            tls=tls,
            username=raw.get("username"),
            password=password,
            ca_file=raw.get("ca_file"),
            hello=raw.get("hello"),
        )

    def url(self, raw: Mapping[str, Any], where: str) -> Secret:
        url = self.secret(raw, "url", where, required=True, literal=True)
        assert url is not None
        if not url.get().startswith(("http://", "https://")):
            raise ConfigError(f"{where}.url is not an http(s) URL")
        return url

    def secret(
        self, raw: Mapping[str, Any], key: str, where: str, *, required: bool, literal: bool
    ) -> Secret | None:
        """``key`` (a literal, where allowed), ``key_env`` (an environment variable's name) or ``key_file``
        (a file's path), exactly one."""
        given = [k for k in (key, f"{key}_env", f"{key}_file") if k in raw]
        if len(given) > 1:
            raise ConfigError(f"{where}: give only one of {', '.join(given)}")
        if not given:
            if required:
                hint = f"{key}_env or {key}_file" if not literal else f"{key}, {key}_env or {key}_file"
                raise ConfigError(f"{where}: {key} is missing (set {hint})")
            return None
        (which,) = given
        if which == key:
            if not literal:
                raise ConfigError(
                    f"{where}.{key}: secrets are not written into the file; use {key}_env "
                    f"(an environment variable's name) or {key}_file (a file's path)"
                )
            return Secret(str(raw[key]), f"{where}.{key}")
        name = str(raw[which])
        if which.endswith("_env"):
            value = self.env.get(name)
            if not value:
                raise ConfigError(f"{where}.{which}: environment variable {name} is not set or empty")
            return Secret(value, f"${name}")
        try:
            value = Path(name).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{where}.{which}: cannot read {name}: {exc.strerror}") from None
        if not value:
            raise ConfigError(f"{where}.{which}: {name} is empty")
        return Secret(value, name)


def _secret_keys(*keys: str) -> set[str]:
    return {f"{k}{suffix}" for k in keys for suffix in ("", "_env", "_file")}


def _addresses(value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, list) else str(value).split(",")
    return tuple(str(item).strip() for item in items if str(item).strip())


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a mapping, not {type(value).__name__}")
    return value


def _sequence(value: Any, where: str) -> Sequence[Any]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ConfigError(f"{where} must be a list, not {type(value).__name__}")
    return value


def _known(raw: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})"
        )
