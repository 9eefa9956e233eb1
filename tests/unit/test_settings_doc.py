"""The README's variable table is the one the settings models generate, and it lists every variable the
code and the infra scripts name: a setting added to a model without regenerating the README, or a variable
read somewhere no model declares, fails here."""

from __future__ import annotations

import re

from aima_metrics.settings_doc import MODELS, README, current, documented, render
from bus.settings import REPO_ROOT, AimaSettings

PACKAGES = ("bus", "producers", "streams", "consumers", "api", "aima_metrics")
NAMED_BY_A_ROUTING_FILE = {"AIMA_SLACK_URL", "AIMA_SMTP_PASSWORD", "AIMA_SMS_TOKEN"}
"""Examples in consumers/notify/config.py's docstring of names a user's routing file may give."""


def test_the_readme_table_is_generated_from_the_models() -> None:
    assert current(README.read_text()) == render(), "run: python -m aima_metrics.settings_doc"


def test_every_field_says_what_it_is_for() -> None:
    undescribed = [
        f"{model.__name__}.{field}"
        for _, model in MODELS
        for field, info in model.model_fields.items()
        if not (info.description or "").strip()
    ]
    assert undescribed == []


def test_every_settings_model_is_in_the_table() -> None:
    def subclasses(cls: type) -> set[type]:
        return {sub for direct in cls.__subclasses__() for sub in {direct, *subclasses(direct)}}

    listed = {model for _, model in MODELS}
    ours = {cls for cls in subclasses(AimaSettings) if cls.__module__.split(".")[0] in PACKAGES}
    assert ours - listed == set()


def test_every_variable_the_code_and_scripts_name_is_documented() -> None:
    sources = [path for package in PACKAGES for path in (REPO_ROOT / package).rglob("*.py")]
    sources += [*(REPO_ROOT / "infra").rglob("*.sh"), *(REPO_ROOT / "infra" / "notify").glob("*.yaml")]
    named = {
        name
        for path in sources
        for name in re.findall(r"\bAIMA_[A-Z0-9_]*[A-Z0-9]\b", path.read_text())
        # A prefix (AIMA_STREAMS_ in a docstring) names a family, not a variable.
        if not name.endswith("_")
    }
    variables = {name for _, name, _, _ in documented()}
    assert named - variables - NAMED_BY_A_ROUTING_FILE == set()
