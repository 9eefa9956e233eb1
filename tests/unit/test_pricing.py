"""The price catalogue: file format, model matching, clear errors, and reloading when the file changes."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from streams.costs.pricing import CatalogueError, PriceCatalogue, ReloadingCatalogue, model_tokens

SHIPPED = Path(__file__).resolve().parents[2] / "streams" / "costs" / "prices.yaml"

CATALOGUE = """
default_provider: aws
energy_eur_per_kwh: 0.3
providers:
  aws:
    "NVIDIA H100 80GB HBM3": {on_demand: 4.0, spot: 1.5}
    "A100 40GB": {on_demand: 3.0}
    "A100 80GB": {on_demand: 3.5}
    L4: {on_demand: 0.8, spot: 0.3}
  gcp:
    H100: {on_demand: 9.0}
"""


@pytest.fixture
def catalogue() -> PriceCatalogue:
    return PriceCatalogue.parse(CATALOGUE, "test")


def test_shipped_catalogue_prices_the_simulators_fleet() -> None:
    shipped = PriceCatalogue.load(SHIPPED)
    for provider in ("aws", "gcp", "azure"):
        assert shipped.eur_per_gpu_hour(provider, "NVIDIA H100 80GB HBM3", "on_demand") is not None
    assert shipped.eur_per_gpu_hour("gcp", "NVIDIA A100-SXM4-40GB", "spot") is not None
    assert shipped.eur_per_gpu_hour("gcp", "NVIDIA L4", "on_demand") is not None
    assert shipped.default_provider == "aws"


def test_prices_by_provider_model_and_pricing(catalogue: PriceCatalogue) -> None:
    assert catalogue.eur_per_gpu_hour("aws", "NVIDIA H100 80GB HBM3", "on_demand") == 4.0
    assert catalogue.eur_per_gpu_hour("aws", "NVIDIA H100 80GB HBM3", "spot") == 1.5
    assert catalogue.eur_per_gpu_hour("gcp", "NVIDIA H100 80GB HBM3", "on_demand") == 9.0
    assert catalogue.energy_eur_per_kwh == 0.3


def test_missing_price_is_none_never_invented(catalogue: PriceCatalogue) -> None:
    assert catalogue.eur_per_gpu_hour("aws", "NVIDIA A100-SXM4-40GB", "spot") is None  # no spot offer
    assert catalogue.eur_per_gpu_hour("gcp", "NVIDIA L4", "on_demand") is None  # not at that provider
    assert catalogue.eur_per_gpu_hour("lambda", "NVIDIA L4", "on_demand") is None  # unknown provider
    assert catalogue.eur_per_gpu_hour("aws", None, "on_demand") is None
    assert catalogue.eur_per_gpu_hour("aws", "NVIDIA L4", "reserved") is None


def test_default_provider_prices_jobs_without_one(catalogue: PriceCatalogue) -> None:
    assert catalogue.provider_for(None) == "aws"
    assert catalogue.provider_for("gcp") == "gcp"
    assert catalogue.eur_per_gpu_hour(None, "NVIDIA L4", "on_demand") == 0.8


def test_model_tokens_drop_vendor_and_separators() -> None:
    assert model_tokens("NVIDIA A100-SXM4-40GB") == {"a100", "sxm4", "40gb"}
    assert model_tokens("NVIDIA H100 80GB HBM3") == {"h100", "80gb", "hbm3"}
    assert model_tokens("nvidia") == frozenset()


@pytest.mark.parametrize(
    ("observed", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", 4.0),  # exact
        ("h100 80gb hbm3", 4.0),  # case and vendor do not matter
        ("H100", 4.0),  # the observed short name, one catalogue entry contains it
        ("NVIDIA A100-SXM4-40GB", 3.0),  # catalogue "A100 40GB" is a subset of the NVML name
        ("NVIDIA A100 80GB PCIe", 3.5),
        ("NVIDIA L4", 0.8),
        ("NVIDIA L40S", None),  # whole words: L4 is not L40S
        ("A100", None),  # short for two entries: ambiguous
        ("NVIDIA T4", None),
    ],
)
def test_model_matching_rule(catalogue: PriceCatalogue, observed: str, expected: float | None) -> None:
    assert catalogue.eur_per_gpu_hour("aws", observed, "on_demand") == expected


def test_most_specific_catalogue_entry_wins() -> None:
    catalogue = PriceCatalogue.parse(
        "providers: {p: {H100: {on_demand: 1}, 'H100 80GB HBM3': {on_demand: 2},"
        " 'H100 PCIe': {on_demand: 3}}}"
    )
    assert catalogue.eur_per_gpu_hour("p", "NVIDIA H100 80GB HBM3", "on_demand") == 2
    assert catalogue.eur_per_gpu_hour("p", "NVIDIA H100 PCIe", "on_demand") == 3
    assert catalogue.eur_per_gpu_hour("p", "NVIDIA H100 NVL", "on_demand") == 1


def test_equally_specific_entries_are_ambiguous(caplog: pytest.LogCaptureFixture) -> None:
    catalogue = PriceCatalogue.parse(
        "providers: {p: {'A100 SXM4': {on_demand: 1}, 'A100 40GB': {on_demand: 2}}}"
    )
    with caplog.at_level(logging.WARNING):
        assert catalogue.eur_per_gpu_hour("p", "NVIDIA A100-SXM4-40GB", "on_demand") is None
    assert "equally well" in caplog.text


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("- a list", "top level: must be a mapping"),
        ("providers: {}", "providers: must be a non-empty mapping"),
        (
            "providers: {aws: {L4: {on_demand: -1}}}",
            "providers.aws.L4.on_demand: must be a non-negative number",
        ),
        ("providers: {aws: {L4: {on_demand: .nan}}}", "must be a non-negative number"),
        ("providers: {aws: {L4: {on_demand: true}}}", "must be a non-negative number"),
        ("providers: {aws: {L4: {ondemand: 1}}}", "unknown key(s) ondemand"),
        ("providers: {aws: {L4: {}}}", "needs on_demand and/or spot"),
        ("providers: {aws: {L4: 0.8}}", "must be a mapping with on_demand and/or spot"),
        (
            "providers: {aws: {L4: {on_demand: 1}, 'NVIDIA L4': {on_demand: 2}}}",
            "names the same model as 'L4'",
        ),
        ("providers: {aws: {NVIDIA: {on_demand: 1}}}", "at least one word besides the vendor"),
        ("providers: {aws: {L4: {on_demand: 1}}}\ndefault_provider: gcp", "default_provider: 'gcp' is not"),
        ("providers: {aws: {L4: {on_demand: 1}}}\nenergy_eur_per_kwh: cheap", "energy_eur_per_kwh"),
        ("providers: {aws: {L4: {on_demand: 1}}}\ncurrency: USD", "currency: unknown key"),
        ("providers:\n  aws: {L4: {on_demand: 1}\n", "line 3"),
    ],
)
def test_bad_catalogues_are_rejected_with_the_reason(text: str, problem: str) -> None:
    with pytest.raises(CatalogueError) as caught:
        PriceCatalogue.parse(text, "prices.yaml")
    assert str(caught.value).startswith("prices.yaml: ")
    assert problem in str(caught.value)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(CatalogueError) as caught:
        PriceCatalogue.parse("providers: {aws: {L4: {on_demand: -1}, T4: {spot: x}}}\nfoo: 1")
    assert len(caught.value.problems) == 3


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(CatalogueError, match=r"nope\.yaml: cannot read"):
        PriceCatalogue.load(tmp_path / "nope.yaml")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _write(path: Path, text: str, mtime_s: int) -> None:
    path.write_text(text)
    os.utime(path, (mtime_s, mtime_s))


def test_reloads_a_changed_file_at_most_every_interval(tmp_path: Path) -> None:
    path, clock = tmp_path / "prices.yaml", FakeClock()
    _write(path, "providers: {aws: {L4: {on_demand: 0.8}}}", 1_700_000_000)
    prices = ReloadingCatalogue(path, check_interval_s=30, clock=clock)
    assert prices.current().eur_per_gpu_hour("aws", "NVIDIA L4", "on_demand") == 0.8

    _write(path, "providers: {aws: {L4: {on_demand: 0.95}}}", 1_700_000_100)
    clock.now += 10
    assert prices.current().eur_per_gpu_hour("aws", "NVIDIA L4", "on_demand") == 0.8  # not checked yet
    clock.now += 25
    assert prices.current().eur_per_gpu_hour("aws", "NVIDIA L4", "on_demand") == 0.95
    assert prices.reloads == 1


def test_touched_but_unchanged_file_is_not_reparsed(tmp_path: Path) -> None:
    path, clock = tmp_path / "prices.yaml", FakeClock()
    _write(path, "providers: {aws: {L4: {on_demand: 0.8}}}", 1_700_000_000)
    prices = ReloadingCatalogue(path, check_interval_s=1, clock=clock)
    first = prices.current()
    os.utime(path, (1_700_000_500, 1_700_000_500))
    clock.now += 2
    assert prices.current() is first
    assert prices.reloads == 0


def test_bad_new_file_keeps_the_last_good_catalogue(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path, clock = tmp_path / "prices.yaml", FakeClock()
    _write(path, "providers: {aws: {L4: {on_demand: 0.8}}}", 1_700_000_000)
    prices = ReloadingCatalogue(path, check_interval_s=1, clock=clock)
    _write(path, "providers: {aws: {L4: {on_demand: -5}}}", 1_700_000_100)
    clock.now += 2
    with caplog.at_level(logging.ERROR):
        assert prices.current().eur_per_gpu_hour("aws", "L4", "on_demand") == 0.8
    assert "not reloading" in caplog.text and "non-negative" in caplog.text

    path.unlink()
    clock.now += 2
    assert prices.current().eur_per_gpu_hour("aws", "L4", "on_demand") == 0.8

    _write(path, "providers: {aws: {L4: {on_demand: 0.7}}}", 1_700_000_200)
    clock.now += 2
    assert prices.current().eur_per_gpu_hour("aws", "L4", "on_demand") == 0.7


def test_bad_first_file_fails_fast(tmp_path: Path) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text("providers: nope")
    with pytest.raises(CatalogueError):
        ReloadingCatalogue(path)
    with pytest.raises(CatalogueError, match="cannot read"):
        ReloadingCatalogue(tmp_path / "missing.yaml")
