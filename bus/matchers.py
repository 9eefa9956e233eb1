"""Label matchers, the one grammar of alert rules, notifier routes, silences, the API and the command line:
Alertmanager's (``pkg/labels/parse.go``), so a matcher copied from an Alertmanager configuration or from
``amtool`` means the same here.

- One matcher: a label name, one of ``=``, ``!=``, ``=~``, ``!~``, and a value, with any white space
  between them. The value may be in double quotes; inside it ``\\"``, ``\\\\`` and ``\\n`` are escapes (a
  backslash before anything else is a literal backslash), and an unescaped ``"`` is an error.
- A list: ``{a="b", c=~"d.*"}`` (braces optional in :func:`parse_matchers`), separated by commas outside
  quotes; a trailing comma is allowed.
- Regular expressions match the whole value (Alertmanager anchors them as ``^(?:re)$``); they are Python's
  ``re`` syntax. A label an alert lacks matches as the empty string.

Two deliberate differences from Alertmanager, both kept from this project's earlier parsers: ``name=``
with nothing after it is the empty value (Alertmanager wants ``name=""``), and a value in single quotes is
refused rather than read as containing the quotes (earlier parsers here stripped them; a silent change of
meaning would be worse than an error)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "LABEL_NAME",
    "OPS",
    "InvalidMatcher",
    "Matcher",
    "Op",
    "matchers_of",
    "matches_all",
    "parse_matchers",
]

Op = Literal["=", "!=", "=~", "!~"]
OPS: tuple[Op, ...] = ("=", "!=", "=~", "!~")
LABEL_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
# '=~' before '=' so that the '~' is not read as the value's first character.
_SYNTAX = re.compile(rf"\s*({LABEL_NAME.pattern})\s*(=~|=|!=|!~)\s*(.*?)\s*", re.DOTALL)
_UNESCAPED = 'bad label matcher {text!r}: the value contains an unescaped double quote (write \\")'
_ESCAPES = {"n": "\n", '"': '"', "\\": "\\"}


class InvalidMatcher(ValueError):
    """A matcher that does not parse, names an unknown operator or carries a bad regular expression."""


@dataclass(frozen=True)
class Matcher:
    name: str
    op: Op
    value: str
    _regex: re.Pattern[str] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.op not in OPS:
            known = ", ".join(OPS)
            raise InvalidMatcher(f"matcher {self.name!r}: operator {self.op!r} is not one of {known}")
        if not self.name:
            raise InvalidMatcher("matcher without a label name")
        if self.op in ("=~", "!~"):
            try:
                object.__setattr__(self, "_regex", re.compile(self.value))
            except (re.error, RecursionError, OverflowError) as exc:
                raise InvalidMatcher(
                    f"bad regex {self.value!r} for label {self.name!r}: bad regular expression: {exc}"
                ) from None

    @classmethod
    def parse(cls, text: str) -> Matcher:
        """One matcher: ``severity=critical``, ``host!=gpu-1``, ``rule=~"Gpu.*"``."""
        found = _SYNTAX.fullmatch(text)
        if found is None:
            raise InvalidMatcher(
                f"bad label matcher {text!r}: write label=value, label!=value, label=~regex or label!~regex"
            )
        name, op, raw = found.groups()
        return cls(name, op, _unquote(raw, text))

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str) -> Matcher:
        """Our stored form ``{"name", "op", "value"}`` (op defaults to ``=``), Alertmanager's API form
        ``{"name", "value", "isRegex", "isEqual"}``, or the text form of one matcher."""
        if isinstance(data, str):
            return cls.parse(data)
        if "name" not in data:
            raise InvalidMatcher(f"matcher {dict(data)!r} lacks 'name'")
        name, value = str(data["name"]), str(data.get("value", ""))
        if "op" in data:
            return cls(name, str(data["op"]), value)  # type: ignore[arg-type]
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
        """The text form, which :meth:`parse` reads back to an equal matcher."""
        quoted = self.value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'{self.name}{self.op}"{quoted}"'


def parse_matchers(text: str) -> tuple[Matcher, ...]:
    """A list as Alertmanager's ``ParseMatchers`` reads it: ``{foo="bar", baz!~"quux.*"}`` or
    ``foo=bar,dings!=bums``; commas inside double quotes belong to the value."""
    body = text.strip()
    body = body.removeprefix("{").removesuffix("}")
    tokens, token, quoted, escaped = [], [], False, False
    for char in body:
        if char == "," and not quoted:
            tokens.append("".join(token))
            token = []
            continue
        if char == '"':
            quoted = quoted if escaped else not quoted
            escaped = False
        elif char == "\\":
            escaped = not escaped
        else:
            escaped = False
        token.append(char)
    if last := "".join(token).strip():
        tokens.append(last)
    return tuple(Matcher.parse(item) for item in tokens)


def matchers_of(items: Iterable[Matcher | Mapping[str, Any] | str]) -> tuple[Matcher, ...]:
    """The matchers of a configured or requested list: each item a :class:`Matcher`, a mapping
    (:meth:`Matcher.from_json`), a list in braces (``{a="b", c=~"d.*"}``) or one matcher's text; a text
    without braces is one matcher, so ``host=a,b`` keeps meaning the value ``a,b``."""
    out: list[Matcher] = []
    for item in items:
        if isinstance(item, Matcher):
            out.append(item)
        elif isinstance(item, str) and item.strip().startswith("{"):
            out.extend(parse_matchers(item))
        elif isinstance(item, str | Mapping):
            out.append(Matcher.from_json(item))
        else:
            raise InvalidMatcher(f"matcher {item!r} is neither a text nor a mapping")
    return tuple(out)


def matches_all(matchers: Iterable[Matcher], labels: Mapping[str, str]) -> bool:
    return all(m.matches(labels) for m in matchers)


def _unquote(raw: str, text: str) -> str:
    """The value with its quotes and escapes undone, as Alertmanager's ParseMatcher does."""
    if len(raw) >= 2 and raw[0] == raw[-1] == "'":
        raise InvalidMatcher(
            f"bad label matcher {text!r}: single quotes are not quotes in Alertmanager's syntax; "
            "write the value in double quotes"
        )
    quoted = raw.startswith('"')
    if quoted:
        raw = raw[1:]
    out: list[str] = []
    index = 0
    while index < len(raw):
        char = raw[index]
        if char == "\\" and index + 1 < len(raw):
            following = raw[index + 1]
            out.append(_ESCAPES.get(following, "\\" + following))
            index += 2
            continue
        if char == '"':
            if not quoted or index != len(raw) - 1:
                raise InvalidMatcher(_UNESCAPED.format(text=text))
            quoted = False
        else:
            out.append(char)
        index += 1
    if quoted:
        raise InvalidMatcher(_UNESCAPED.format(text=text))
    return "".join(out)
