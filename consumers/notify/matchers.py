"""Label matchers as Alertmanager writes them (``name=value``, ``!=``, ``=~``, ``!~``), shared by routes and
silences. Regular expressions are anchored at both ends; a missing label matches as the empty string."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["InvalidMatcher", "Matcher", "matches_all", "parse_matchers"]

OPS = ("=~", "!~", "!=", "=")
_SYNTAX = re.compile(r"^\s*(?P<name>[A-Za-z_][A-Za-z0-9_]*)\s*(?P<op>=~|!~|!=|=)\s*(?P<value>.*?)\s*$")


class InvalidMatcher(ValueError):
    """A matcher that does not parse, names an unknown operator or carries a bad regular expression."""


@dataclass(frozen=True)
class Matcher:
    name: str
    op: str
    value: str
    _regex: re.Pattern[str] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise InvalidMatcher(
                f"matcher {self.name!r}: operator {self.op!r} is not one of {', '.join(OPS)}"
            )
        if not self.name:
            raise InvalidMatcher("matcher without a label name")
        if self.op in ("=~", "!~"):
            try:
                object.__setattr__(self, "_regex", re.compile(self.value))
            except re.error as exc:
                raise InvalidMatcher(f"matcher {self}: bad regular expression: {exc}") from exc

    @classmethod
    def parse(cls, text: str) -> Matcher:
        """``severity=critical``, ``host!=gpu-1``, ``rule=~"Gpu.*"`` (quotes optional)."""
        match = _SYNTAX.match(text)
        if match is None:
            raise InvalidMatcher(f"matcher {text!r} is not of the form name=value, !=, =~ or !~")
        value = match["value"]
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        return cls(match["name"], match["op"], value)

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str) -> Matcher:
        """Our stored form ``{"name", "op", "value"}``, Alertmanager's ``{"name", "value", "isRegex",
        "isEqual"}``, or the text form."""
        if isinstance(data, str):
            return cls.parse(data)
        try:
            name, value = str(data["name"]), str(data["value"])
        except KeyError as exc:
            raise InvalidMatcher(f"matcher {dict(data)!r} lacks {exc.args[0]!r}") from None
        if "op" in data:
            return cls(name, str(data["op"]), value)
        regex, equal = bool(data.get("isRegex", False)), bool(data.get("isEqual", True))
        return cls(name, ("=~" if regex else "=") if equal else ("!~" if regex else "!="), value)

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "op": self.op, "value": self.value}

    def matches(self, labels: Mapping[str, str]) -> bool:
        actual = labels.get(self.name, "")
        if self.op == "=":
            return actual == self.value
        if self.op == "!=":
            return actual != self.value
        assert self._regex is not None
        found = self._regex.fullmatch(actual) is not None
        return found if self.op == "=~" else not found

    def __str__(self) -> str:
        return f'{self.name}{self.op}"{self.value}"'


def parse_matchers(items: Iterable[Mapping[str, Any] | str]) -> tuple[Matcher, ...]:
    return tuple(Matcher.from_json(item) for item in items)


def matches_all(matchers: Iterable[Matcher], labels: Mapping[str, str]) -> bool:
    return all(m.matches(labels) for m in matchers)
