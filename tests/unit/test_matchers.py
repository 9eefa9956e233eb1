"""The one label matcher grammar (bus/matchers.py) against Alertmanager's own cases (pkg/labels/parse_test.go,
TestMatchers), the inputs this project's three earlier parsers accepted, and each caller: rules, notifier
routes and silences. The API's use is tested in tests/integration/test_api.py."""

from __future__ import annotations

import pytest

from bus.matchers import InvalidMatcher, Matcher, matchers_of, parse_matchers
from consumers.notify.config import ConfigError, parse
from streams.alerts.rules import RuleError, parse_rules

# Alertmanager's TestMatchers: input -> (name, op, value) triples, in order.
ALERTMANAGER_LISTS = [
    ('{foo="bar"}', [("foo", "=", "bar")]),
    ('{foo=~"bar.*"}', [("foo", "=~", "bar.*")]),
    ('{foo!="bar"}', [("foo", "!=", "bar")]),
    ('{foo!~"bar.*"}', [("foo", "!~", "bar.*")]),
    ('{foo="bar", baz!="quux"}', [("foo", "=", "bar"), ("baz", "!=", "quux")]),
    ('{foo="bar", baz!~"quux.*"}', [("foo", "=", "bar"), ("baz", "!~", "quux.*")]),
    (
        '{foo="bar",baz!~".*quux", derp="wat"}',
        [("foo", "=", "bar"), ("baz", "!~", ".*quux"), ("derp", "=", "wat")],
    ),
    ('{foo="bar", instance=~"some-api.*"}', [("foo", "=", "bar"), ("instance", "=~", "some-api.*")]),
    ('{foo=""}', [("foo", "=", "")]),
    ('{foo="bar,quux", job="job1"}', [("foo", "=", "bar,quux"), ("job", "=", "job1")]),
    ('{foo = "bar", dings != "bums", }', [("foo", "=", "bar"), ("dings", "!=", "bums")]),
    ("foo=bar,dings!=bums", [("foo", "=", "bar"), ("dings", "!=", "bums")]),
    (
        '{quote="She said: \\"Hi, ladies! That\'s gender-neutral…\\""}',
        [("quote", "=", 'She said: "Hi, ladies! That\'s gender-neutral…"')],
    ),
    ('statuscode=~"5.."', [("statuscode", "=~", "5..")]),
    ("tricky=~~~", [("tricky", "=~", "~~")]),
    ('trickier==\\\\=\\=\\"', [("trickier", "=", '=\\=\\="')]),
    (
        'contains_quote != "\\"" , contains_comma !~ "foo,bar" , ',
        [("contains_quote", "!=", '"'), ("contains_comma", "!~", "foo,bar")],
    ),
]

ALERTMANAGER_ERRORS = [
    'job="value',
    'job=value"',
    'trickier==\\\\=\\=\\""',
    'contains_unescaped_quote = foo"bar',
    '{invalid-name = "valid label"}',
    '{foo=~"invalid[regexp"}',
    '"{foo=\\"bar"}',
    '"foo=\\"bar"',
    '"foo=\\"bar\\""',
    '"foo=\\"bar\\"',
    '"{foo=\\"bar\\"}"',
    '"foo="bar""',
]


def triples(matchers: tuple[Matcher, ...]) -> list[tuple[str, str, str]]:
    return [(m.name, m.op, m.value) for m in matchers]


@pytest.mark.parametrize(("text", "expected"), ALERTMANAGER_LISTS)
def test_alertmanager_lists(text: str, expected: list[tuple[str, str, str]]) -> None:
    assert triples(parse_matchers(text)) == expected


@pytest.mark.parametrize("text", ALERTMANAGER_ERRORS)
def test_alertmanager_errors(text: str) -> None:
    with pytest.raises(InvalidMatcher, match=r"bad label matcher|bad regex"):
        parse_matchers(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # accepted by the three earlier parsers (rules, notifier, API), with the same meaning
        ("severity=critical", ("severity", "=", "critical")),
        ("host = a", ("host", "=", "a")),
        ('rule=~"Gpu.*"', ("rule", "=~", "Gpu.*")),
        ("host!~gpu-.*", ("host", "!~", "gpu-.*")),
        ("mig_instance=", ("mig_instance", "=", "")),  # the empty value, as before (Alertmanager: "")
        ("host=a,b", ("host", "=", "a,b")),  # one matcher: a comma outside braces is the value's
        # the rules' reading of escapes, now everyone's (Alertmanager's)
        ('name="say \\"hi\\""', ("name", "=", 'say "hi"')),
        ('path="a\\\\b"', ("path", "=", "a\\b")),
        ('text="two\\nlines"', ("text", "=", "two\nlines")),
        ("odd=a\\d", ("odd", "=", "a\\d")),  # a backslash before anything else stays
        ("le:bucket=1", ("le:bucket", "=", "1")),  # Alertmanager's label names allow colons
    ],
)
def test_one_matcher(text: str, expected: tuple[str, str, str]) -> None:
    assert triples(matchers_of([text])) == [expected]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("host='a'", "single quotes"),  # the notifier and the API used to strip them: refused, not reread
        ('host="a', "unescaped double quote"),  # the notifier and the API took the quote as the value's
        ("host", "bad label matcher 'host'"),
        ("1host=a", "bad label matcher"),
        ("host==a", None),  # valid: the value is "=a"
        ("host=~(", r"bad regex '\('"),
    ],
)
def test_refused_or_odd_inputs(text: str, message: str | None) -> None:
    if message is None:
        assert triples(matchers_of([text])) == [("host", "=", "=a")]
        return
    with pytest.raises(InvalidMatcher, match=message):
        matchers_of([text])


def test_regexes_are_anchored_and_a_missing_label_is_empty() -> None:
    assert Matcher.parse('host=~"gpu-[0-9]+"').matches({"host": "gpu-12"})
    assert not Matcher.parse("host=~gpu").matches({"host": "gpu-12"})
    assert not Matcher.parse("host=~gpu|cpu").matches({"host": "gpu-1"})  # ^(?:gpu|cpu)$
    assert Matcher.parse("host=~gpu|cpu").matches({"host": "cpu"})
    assert Matcher.parse("team=").matches({}) and Matcher.parse("team!~.+").matches({})


def test_text_form_round_trips() -> None:
    for text in ('quote="say \\"hi\\"\\nbye\\\\"', "host=~gpu-.*", "a!=", "b!~x,y"):
        matcher = Matcher.parse(text)
        assert Matcher.parse(str(matcher)) == matcher
        assert Matcher.from_json(matcher.to_json()) == matcher


def test_json_forms() -> None:
    assert Matcher.from_json({"name": "host", "value": "a"}) == Matcher("host", "=", "a")
    assert Matcher.from_json({"name": "host", "value": "a", "isEqual": False}) == Matcher("host", "!=", "a")
    assert Matcher.from_json({"name": "h", "value": "a.*", "isRegex": True, "isEqual": False}).op == "!~"
    assert matchers_of(['{a="1", b=~"2|3"}', {"name": "c", "op": "!=", "value": ""}, "d=4"]) == (
        Matcher("a", "=", "1"),
        Matcher("b", "=~", "2|3"),
        Matcher("c", "!=", ""),
        Matcher("d", "=", "4"),
    )
    with pytest.raises(InvalidMatcher, match="lacks 'name'"):
        Matcher.from_json({"value": "a"})
    with pytest.raises(InvalidMatcher, match="neither a text nor a mapping"):
        matchers_of([3])  # type: ignore[list-item]


# -- each caller ---------------------------------------------------------------------------------------------


RULE = """rules:
  - name: Hot
    metric: gpu_temperature_celsius
    condition: gt
    threshold: 85
    severity: critical
    match: {match}
"""


def test_rules_take_a_list_in_braces() -> None:
    (rule,) = parse_rules(RULE.format(match="""'{host="a", gpu_model=~".*H100.*"}'"""))
    assert [str(m) for m in rule.matchers] == ['host="a"', 'gpu_model=~".*H100.*"']
    with pytest.raises(RuleError, match=r"field 'match': bad label matcher .*single quotes"):
        parse_rules(RULE.format(match="""["host='a'"]"""))


def notify_config(matchers: list[object]) -> dict[str, object]:
    return {
        "route": {"receiver": "ops", "routes": [{"receiver": "ops", "matchers": matchers}]},
        "receivers": [{"name": "ops", "slack": {"url": "https://hooks.slack.test/ops"}}],
    }


def test_notifier_routes_take_every_form_and_name_the_field() -> None:
    config = parse(
        notify_config(['{severity="critical", host=~"gpu-.*"}', {"name": "team", "value": "ml"}]), environ={}
    )
    assert triples(config.route.routes[0].matchers) == [
        ("severity", "=", "critical"),
        ("host", "=~", "gpu-.*"),
        ("team", "=", "ml"),
    ]
    with pytest.raises(ConfigError, match=r"route\.routes\[0\]\.matchers: bad label matcher .*single quotes"):
        parse(notify_config(["severity='critical'"]), environ={})
