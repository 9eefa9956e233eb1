"""The README's table of variables, generated from the settings models (their Field descriptions and
defaults): ``python -m aima_metrics.settings_doc`` rewrites it between the marker comments in README.md,
``--check`` exits 1 when it is out of date (tests/unit/test_settings_doc.py checks the same). It lives here
because only aima_metrics may import every layer's models."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

from pydantic import SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from aima_metrics.settings import LifecycleSettings, StackSettings
from api.config import ApiSettings
from bus.settings import REPO_ROOT, Settings, env_name, shown_default
from bus.tracing import TracingSettings
from consumers.settings import (
    ArchiveSettings,
    NotifySettings,
    ReaderSettings,
    RetentionSettings,
    SinkSettings,
)
from producers.settings import CollectorSettings, JobGpuSettings, PseudonymSettings
from streams.settings import AlertSettings, AnomalySettings, CostSettings, StreamsSettings

__all__ = ["BEGIN", "END", "MODELS", "ROUTING_FILE_VARIABLES", "documented", "render", "update"]

README = REPO_ROOT / "README.md"
BEGIN = "<!-- settings:begin (generated from the settings models: python -m aima_metrics.settings_doc) -->"
END = "<!-- settings:end -->"

MODELS: tuple[tuple[str, type[BaseSettings]], ...] = (
    ("every process", Settings),
    ("tracing (A6, every process: bus/tracing.py)", TracingSettings),
    ("stream worker", StreamsSettings),
    ("cost processors", CostSettings),
    ("alert processor", AlertSettings),
    ("anomaly detector", AnomalySettings),
    ("sink", SinkSettings),
    ("retention (the sink's scheduled run and `db retention`)", RetentionSettings),
    ("archive (D5: retention writes it, `archive list` and `archive restore` read it)", ArchiveSettings),
    ("notifier", NotifySettings),
    ("dashboard logins (`db grant-reader`)", ReaderSettings),
    ("API and token commands", ApiSettings),
    ("collectors (`aima-metrics collect`)", CollectorSettings),
    ("job SDK", PseudonymSettings),
    ("job SDK: the job's GPUs (read where they name GPU UUIDs)", JobGpuSettings),
    ("local stack (`up`, its scripts, the webhook receiver)", StackSettings),
    ("children of `up`", LifecycleSettings),
)
"""Each model once, in the order a reader follows the data; a new model must be added here (the test
fails on a variable the table does not list)."""

ROUTING_FILE_VARIABLES = {
    "AIMA_LOCAL_WEBHOOK_URL": "set by `up` for its notifier: the development webhook receiver's URL, named "
    "by infra/notify/local.yaml (`url_env`)",
}
"""Variables no model reads: the local routing file names them, and the notifier resolves such names
(consumers/notify/config.py, any name a routing file gives)."""


def _default(info: FieldInfo) -> str:
    if (shown := shown_default(info)) is not None:
        return shown
    value = info.default
    if value is None or isinstance(value, SecretStr):
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(str(part) for part in value) if value else "none"
    if isinstance(value, Path):
        return str(value.relative_to(REPO_ROOT)) if value.is_relative_to(REPO_ROOT) else str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def documented() -> Iterator[tuple[str, str, str, str]]:
    """(group, variable, default, meaning) for every field of every model, then the routing file's."""
    for group, model in MODELS:
        for field, info in model.model_fields.items():
            yield group, env_name(model, field), _default(info), info.description or ""
    for name, meaning in ROUTING_FILE_VARIABLES.items():
        yield "routing file", name, "set by `up`", meaning


def render() -> str:
    lines = [BEGIN]
    group_now = None
    for group, name, default, meaning in documented():
        if group != group_now:
            if group_now is not None:
                lines.append("")
            lines += [f"**{group}**", "", "| variable | default | meaning |", "|---|---|---|"]
            group_now = group
        cell = meaning.replace("|", "\\|")
        shown = default if "`" in default else f"`{default}`"
        lines.append(f"| `{name}` | {shown} | {cell} |")
    lines.append(END)
    return "\n".join(lines)


def current(text: str) -> str:
    """The generated block as it stands in ``text`` (the README)."""
    start, end = text.index(BEGIN), text.index(END) + len(END)
    return text[start:end]


def update(text: str) -> str:
    start, end = text.index(BEGIN), text.index(END) + len(END)
    return text[:start] + render() + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when README.md's table is out of date")
    args = parser.parse_args(argv)
    text = README.read_text()
    if args.check:
        if current(text) != render():
            print("README.md's variable table is out of date: python -m aima_metrics.settings_doc")
            return 1
        return 0
    README.write_text(update(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
