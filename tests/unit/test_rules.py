"""Alert rules: YAML loading and its errors, durations, matchers, templates and the fingerprint."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from bus.durations import parse_duration
from bus.matchers import Matcher
from bus.settings import REPO_ROOT
from streams.alerts.rules import RuleError, default_rules, load_rules, parse_rules, render
from streams.runtime.findings import fingerprint

GPU_LABELS = {"host": "a", "gpu": "0", "gpu_uuid": "GPU-1", "gpu_model": "NVIDIA H100"}


def rule_yaml(**fields: str) -> str:
    base = {
        "name": "Hot",
        "metric": "gpu_temperature_celsius",
        "condition": "gt",
        "threshold": "85",
        "severity": "critical",
    }
    base.update(fields)
    return "rules:\n  - " + "\n    ".join(f"{key}: {value}" for key, value in base.items()) + "\n"


# -- the default rules (S4) --------------------------------------------------------------------------------


def test_the_five_default_rules_of_s4_ship_and_are_on() -> None:
    rules = {rule.name: rule for rule in default_rules()}
    summary = {
        name: (rule.metric, rule.condition, rule.threshold, rule.for_, rule.severity)
        for name, rule in rules.items()
    }
    assert summary == {
        "GpuUtilizationHigh": ("gpu_utilization_percent", "gt", 95, timedelta(minutes=10), "warning"),
        "GpuTemperatureHigh": ("gpu_temperature_celsius", "gt", 85, timedelta(0), "critical"),
        "GpuMemoryUtilizationHigh": ("gpu_memory_utilization_percent", "gt", 90, timedelta(0), "warning"),
        "QueueBacklog": ("queue_length_jobs", "gt", 20, timedelta(minutes=30), "warning"),
        "JobErrorRateHigh": (None, "gt", 5, timedelta(0), "critical"),
    }
    ratio = rules["JobErrorRateHigh"].ratio
    assert ratio is not None
    assert (ratio.numerator, ratio.denominator) == (("failed",), ("finished", "failed"))
    assert ratio.window == timedelta(minutes=5) and ratio.min_count == 20
    for rule in rules.values():
        assert rule.channels == ("webhook",)
        assert {"summary", "description"} <= set(rule.annotations)


def test_default_rule_annotations_render_value_and_labels() -> None:
    hot = next(rule for rule in default_rules() if rule.name == "GpuTemperatureHigh")
    assert hot.render_annotations(90.0, GPU_LABELS)["summary"] == "GPU 0 on a at 90 °C"


# -- durations ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0", 0), (0, 0), ("30s", 30), ("10m", 600), ("1h30m", 5400), ("500ms", 0.5), ("1d", 86400), (90, 90)],
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["10x", "", "m", "10 m", "-5s", "1h-", True, None, -1])
def test_bad_durations_are_refused(text: object) -> None:
    with pytest.raises(ValueError, match="bad duration"):
        parse_duration(text)


# -- clear errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"condition": "above"},
            "rule 'Hot' field 'condition': unknown condition 'above'; use one of gt, ge",
        ),
        ({"for": "10x"}, "rule 'Hot' field 'for': bad duration '10x'"),
        ({"keep_firing_for": "soon"}, "rule 'Hot' field 'keep_firing_for': bad duration 'soon'"),
        ({"metric": "gpu_temp"}, "rule 'Hot' field 'metric': unknown metric 'gpu_temp'; did you mean"),
        ({"threshhold": "3"}, "rule 'Hot' field 'threshhold': unknown field"),
        ({"threshold": "hot"}, "rule 'Hot' field 'threshold': must be a finite number, got 'hot'"),
        ({"severity": "page"}, "rule 'Hot' field 'severity': unknown severity 'page'"),
        ({"no_data": "ignore"}, "rule 'Hot' field 'no_data': unknown policy 'ignore'"),
        ({"match": "['queue=a']"}, "rule 'Hot' field 'match': queue=\"a\": the series have no label 'queue'"),
        ({"match": "['host=~(']"}, "rule 'Hot' field 'match': bad regex '('"),
        ({"match": "['host']"}, "rule 'Hot' field 'match': bad label matcher 'host'"),
        ({"channels": "webhook"}, "rule 'Hot' field 'channels': must be a list"),
        (
            {"annotations": "{summary: 'on {{ $labels.queue }}'}"},
            "rule 'Hot' field 'annotations.summary': {{ $labels.queue }}: the alert has no label 'queue'",
        ),
        (
            {"annotations": "{summary: '{{ $val }}'}"},
            "rule 'Hot' field 'annotations.summary': unknown template variable $val",
        ),
    ],
)
def test_yaml_errors_name_the_rule_and_the_field(fields: dict[str, str], expected: str) -> None:
    with pytest.raises(RuleError) as caught:
        parse_rules(rule_yaml(**fields), source="team.yaml")
    assert str(caught.value).startswith(f"team.yaml: {expected}"), str(caught.value)
    assert caught.value.rule == "Hot"


def test_missing_and_conflicting_fields() -> None:
    with pytest.raises(RuleError, match="rule 'Cold' field 'threshold': missing"):
        parse_rules("- {name: Cold, metric: gpu_temperature_celsius, condition: lt, severity: info}")
    with pytest.raises(RuleError, match="give exactly one of 'metric'"):
        parse_rules("- {name: Both, condition: gt, threshold: 1, severity: info}")
    with pytest.raises(RuleError, match="rule 'Hot' defined twice"):
        parse_rules(rule_yaml() + rule_yaml().replace("rules:\n", ""))
    with pytest.raises(RuleError, match="rule #1: 'name' must be a name"):
        parse_rules("- {metric: gpu_temperature_celsius}")
    with pytest.raises(RuleError, match="not valid YAML"):
        parse_rules("rules: [")


def test_ratio_errors() -> None:
    ratio = "- {name: Err, condition: gt, threshold: 5, severity: critical, ratio: %s}"
    with pytest.raises(RuleError, match=re.escape("field 'ratio.numerator': must list job events")):
        parse_rules(ratio % "{numerator: [crashed], denominator: [finished]}")
    with pytest.raises(RuleError, match="every numerator event must also count in the denominator"):
        parse_rules(ratio % "{numerator: [failed], denominator: [finished]}")
    with pytest.raises(RuleError, match=re.escape("field 'ratio.window': must be a whole number of minutes")):
        parse_rules(ratio % "{numerator: [failed], denominator: [finished, failed], window: 90s}")
    with pytest.raises(RuleError, match=re.escape("field 'ratio.min_count'")):
        parse_rules(ratio % "{numerator: [failed], denominator: [finished, failed], min_count: 0}")


def test_a_rules_file_parses_every_field(tmp_path: Path) -> None:
    (rule,) = parse_rules(
        """
        rules:
          - name: H100Hot
            metric: gpu_temperature_celsius
            match: ['gpu_model=~".*H100.*"', 'host!=lab']
            condition: ">="
            threshold: 80
            for: 1m30s
            keep_firing_for: 5m
            severity: warning
            channels: [webhook, slack]
            labels: {team: platform}
            annotations: {summary: 'printf {{ printf "%.1f" $value }} on {{ $labels.team }}'}
            no_data: resolve
            no_data_after: 2m
        """
    )
    assert rule.condition == "ge" and rule.threshold == 80.0
    assert rule.for_ == timedelta(seconds=90) and rule.keep_firing_for == timedelta(minutes=5)
    assert rule.channels == ("webhook", "slack") and dict(rule.labels) == {"team": "platform"}
    assert (rule.no_data, rule.no_data_after) == ("resolve", timedelta(minutes=2))
    assert [str(m) for m in rule.matchers] == ['gpu_model=~".*H100.*"', 'host!="lab"']
    assert rule.matches(GPU_LABELS) and not rule.matches({**GPU_LABELS, "host": "lab"})
    assert not rule.matches({**GPU_LABELS, "gpu_model": "NVIDIA A100"})
    labels = rule.alert_labels(GPU_LABELS)
    assert rule.render_annotations(80.25, labels) == {"summary": "printf 80.2 on platform"}


def test_files_add_to_replace_and_switch_off_defaults(tmp_path: Path) -> None:
    path = tmp_path / "team.yaml"
    path.write_text(
        "rules:\n"
        "  - {name: GpuTemperatureHigh, enabled: false}\n"
        "  - {name: QueueBacklog, metric: queue_length_jobs, condition: gt, threshold: 50, severity: info}\n"
        + rule_yaml().replace("rules:\n", "")
    )
    rules = {rule.name: rule for rule in load_rules([path])}
    assert "GpuTemperatureHigh" not in rules
    assert rules["QueueBacklog"].threshold == 50 and rules["QueueBacklog"].severity == "info"
    assert set(rules) == {
        "GpuUtilizationHigh",
        "GpuMemoryUtilizationHigh",
        "QueueBacklog",
        "JobErrorRateHigh",
        "Hot",
    }
    assert [rule.name for rule in load_rules([path], defaults=False)] == ["QueueBacklog", "Hot"]
    with pytest.raises(RuleError, match=re.escape("missing.yaml: cannot read rules file")):
        load_rules([tmp_path / "missing.yaml"])


# -- matchers and templates --------------------------------------------------------------------------------


def test_matchers_are_anchored_and_a_missing_label_is_empty() -> None:
    assert Matcher.parse('host=~"gpu-[0-9]+"').matches({"host": "gpu-12"})
    assert not Matcher.parse('host=~"gpu-[0-9]+"').matches({"host": "xgpu-12"})
    assert Matcher.parse("host!~gpu-.*").matches({"host": "cpu-1"})
    assert Matcher.parse("host = a").matches({"host": "a"})
    assert Matcher.parse("mig_instance=").matches({"host": "a"})
    assert Matcher.parse('name="say \\"hi\\""').value == 'say "hi"'


def test_templates() -> None:
    labels = {"host": "a", "gpu": "0"}
    assert render("{{ $value }} on {{$labels.host}}/{{ $labels.gpu }}", value=96.1234, labels=labels) == (
        "96.12 on a/0"
    )
    assert render("{{ $value }}|{{ $labels.missing }}|", value=None, labels=labels) == "n/a||"
    assert render('{{ printf "%.3f" $value }}', value=2.0, labels={}) == "2.000"
    assert render("{{ $value }}", value=0.000123, labels={}) == "0.000123"


# -- fingerprint -------------------------------------------------------------------------------------------


def test_fingerprint_is_sha256_of_rule_and_sorted_labels() -> None:
    expected = hashlib.sha256(b"Hot\xffgpu\xff0\xffhost\xffa\xff").hexdigest()[:16]
    assert fingerprint("Hot", {"host": "a", "gpu": "0"}) == expected
    assert fingerprint("Hot", {"gpu": "0", "host": "a"}) == expected
    assert len(expected) == 16 and int(expected, 16) >= 0
    assert fingerprint("Hot", {"host": "b", "gpu": "0"}) != expected
    assert fingerprint("Cold", {"host": "a", "gpu": "0"}) != expected
    # No ambiguity between a label's name and value boundaries.
    assert fingerprint("r", {"a": "bc"}) != fingerprint("r", {"ab": "c"})


def test_fingerprint_is_the_same_in_another_process() -> None:
    code = (
        "from streams.runtime.findings import fingerprint; "
        "print(fingerprint('Hot', {'host': 'a', 'gpu': '0'}))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "123", "PATH": ""},
    )
    assert other.stdout.strip() == fingerprint("Hot", {"gpu": "0", "host": "a"})
