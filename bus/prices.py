"""The price catalogue (S2): EUR per GPU-hour by provider, GPU model and pricing (on-demand or spot), plus
an optional energy tariff, read from YAML and re-read when the file changes. The cost processor prices GPU
time by it (streams/costs); the API's cheapest-provider recommendation reads it too, so it lives here, in
the one package both may import.

File format::

    default_provider: aws            # optional: used for jobs that name no provider
    energy_eur_per_kwh: 0.25         # optional
    providers:
      aws:
        "NVIDIA H100 80GB HBM3": {on_demand: 3.9, spot: 1.6}
        L4: {on_demand: 0.8}         # a price may be left out: no price is then known, none is invented

Model matching. Jobs and GPU samples name models as NVML reports them ("NVIDIA H100 80GB HBM3",
"NVIDIA A100-SXM4-40GB"); people write catalogues with short names ("H100", "A100 40GB"). Both sides are
reduced to a set of tokens: lower case, split at spaces, ``-``, ``_``, ``/``, ``,`` and parentheses, the
vendor word ``nvidia`` dropped. Within the provider, in this order:

1. the entry with the same token set;
2. else the entries all of whose tokens occur in the observed name (the catalogue is less specific): the
   one with the most tokens; two different ones with as many tokens is ambiguous;
3. else the entries that contain every token of the observed name (the observed name is the short one):
   only when exactly one does.

No match, or an ambiguous one, means no price. Whole tokens, never substrings: "L4" does not match "L40S".
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import yaml

__all__ = [
    "DEFAULT_PRICES_FILE",
    "PRICINGS",
    "CatalogueError",
    "ModelPrice",
    "PriceCatalogue",
    "Reloading",
    "ReloadingCatalogue",
    "model_tokens",
]

log = logging.getLogger(__name__)

Pricing = Literal["on_demand", "spot"]
PRICINGS: tuple[Pricing, ...] = ("on_demand", "spot")
_TOP_KEYS = frozenset({"providers", "energy_eur_per_kwh", "default_provider"})
_SPLIT = re.compile(r"[\s\-_/,()]+")
_VENDOR_WORDS = frozenset({"nvidia"})

DEFAULT_PRICES_FILE = Path(__file__).resolve().parent.parent / "streams" / "costs" / "prices.yaml"
"""The shipped price catalogue, streams/costs/prices.yaml (a file beside the cost processor that reads it;
no import of streams)."""


class CatalogueError(ValueError):
    """A price catalogue (or another YAML configuration file read the same way) that cannot be used;
    ``origin`` names the file, ``problems`` lists each problem as 'where: why'."""

    def __init__(self, origin: str, problems: list[str]) -> None:
        super().__init__(f"{origin}: " + "; ".join(problems))
        self.origin = origin
        self.problems = problems


def model_tokens(name: str) -> frozenset[str]:
    """The token set a GPU model name is matched by (see the module doc)."""
    return frozenset(t for t in _SPLIT.split(name.lower()) if t and t not in _VENDOR_WORDS)


@dataclass(frozen=True)
class ModelPrice:
    model: str
    """The model as written in the catalogue."""
    on_demand: float | None
    spot: float | None

    def eur_per_gpu_hour(self, pricing: str) -> float | None:
        """The price for ``pricing`` (``on_demand`` or ``spot``); None when the catalogue has none."""
        return {"on_demand": self.on_demand, "spot": self.spot}.get(pricing)


class PriceCatalogue:
    """Prices by provider and GPU model. Immutable; :class:`ReloadingCatalogue` swaps whole catalogues."""

    def __init__(
        self,
        providers: Mapping[str, Mapping[str, ModelPrice]],
        *,
        energy_eur_per_kwh: float | None = None,
        default_provider: str | None = None,
    ) -> None:
        if default_provider is not None and default_provider not in providers:
            raise ValueError(f"default provider {default_provider!r} is not among {sorted(providers)}")
        self.providers = {provider: dict(models) for provider, models in providers.items()}
        self.energy_eur_per_kwh = energy_eur_per_kwh
        self.default_provider = default_provider
        self._tokens = {
            provider: [(model_tokens(name), price) for name, price in models.items()]
            for provider, models in self.providers.items()
        }
        self._matches: dict[tuple[str, str], ModelPrice | None] = {}

    # -- reading -----------------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> PriceCatalogue:
        return cls.parse(read_config(path), str(path))

    @classmethod
    def parse(cls, text: str | bytes, origin: str = "<prices>") -> PriceCatalogue:
        return cls.from_mapping(load_yaml(text, origin), origin)

    @classmethod
    def from_mapping(cls, data: Any, origin: str = "<prices>") -> PriceCatalogue:
        problems: list[str] = []
        if not isinstance(data, Mapping):
            raise CatalogueError(origin, [f"top level: must be a mapping, got {type(data).__name__}"])
        problems += [
            f"{key}: unknown key (known: {', '.join(sorted(_TOP_KEYS))})"
            for key in data
            if key not in _TOP_KEYS
        ]
        energy = data.get("energy_eur_per_kwh")
        if energy is not None and not _is_price(energy):
            problems.append(f"energy_eur_per_kwh: must be a non-negative number, got {energy!r}")
        providers: dict[str, dict[str, ModelPrice]] = {}
        raw_providers = data.get("providers")
        if not isinstance(raw_providers, Mapping) or not raw_providers:
            problems.append("providers: must be a non-empty mapping of provider to models")
            raw_providers = {}
        for provider, models in raw_providers.items():
            providers[str(provider)] = _models(str(provider), models, problems)
        default = data.get("default_provider")
        if default is not None and default not in providers:
            problems.append(f"default_provider: {default!r} is not one of the providers {sorted(providers)}")
        if problems:
            raise CatalogueError(origin, problems)
        return cls(providers, energy_eur_per_kwh=energy, default_provider=default)

    def current(self) -> PriceCatalogue:
        """A fixed catalogue is its own current version (the same call as :class:`Reloading`)."""
        return self

    # -- lookup ------------------------------------------------------------------------------------------

    def provider_for(self, provider: str | None) -> str | None:
        """The provider a job is priced by: its own, else the catalogue's default."""
        return provider if provider is not None else self.default_provider

    def match(self, provider: str | None, gpu_model: str | None) -> ModelPrice | None:
        """The catalogue entry for ``gpu_model`` at ``provider`` (default provider when None), by the
        matching rule of the module doc; None when there is none or it is ambiguous."""
        provider = self.provider_for(provider)
        if provider is None or gpu_model is None or provider not in self._tokens:
            return None
        key = (provider, gpu_model)
        if key not in self._matches:
            self._matches[key] = _best(self._tokens[provider], model_tokens(gpu_model), provider, gpu_model)
        return self._matches[key]

    def eur_per_gpu_hour(self, provider: str | None, gpu_model: str | None, pricing: str) -> float | None:
        """The price of one GPU-hour, or None when the catalogue has none for this provider, model and
        pricing."""
        entry = self.match(provider, gpu_model)
        return None if entry is None else entry.eur_per_gpu_hour(pricing)


def _best(
    entries: list[tuple[frozenset[str], ModelPrice]], seen: frozenset[str], provider: str, name: str
) -> ModelPrice | None:
    if not seen:
        return None
    for tokens, price in entries:
        if tokens == seen:
            return price
    broader = [(len(tokens), price) for tokens, price in entries if tokens < seen]
    if broader:
        most = max(size for size, _ in broader)
        best = [price for size, price in broader if size == most]
        if len(best) == 1:
            return best[0]
        log.warning(
            "GPU model %r matches %s at %s equally well: no price",
            name,
            ", ".join(repr(p.model) for p in best),
            provider,
        )
        return None
    narrower = [price for tokens, price in entries if seen < tokens]
    if len(narrower) == 1:
        return narrower[0]
    if narrower:
        log.warning(
            "GPU model %r is short for %s at %s: ambiguous, no price",
            name,
            ", ".join(repr(p.model) for p in narrower),
            provider,
        )
    return None


def _is_price(value: Any) -> bool:
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    )


def _models(provider: str, models: Any, problems: list[str]) -> dict[str, ModelPrice]:
    where = f"providers.{provider}"
    if not isinstance(models, Mapping) or not models:
        problems.append(f"{where}: must be a non-empty mapping of GPU model to prices")
        return {}
    out: dict[str, ModelPrice] = {}
    seen: dict[frozenset[str], str] = {}
    for model, prices in models.items():
        at = f"{where}.{model}"
        model = str(model)
        tokens = model_tokens(model)
        if not tokens:
            problems.append(f"{at}: a model name needs at least one word besides the vendor")
            continue
        if tokens in seen:
            problems.append(f"{at}: names the same model as {seen[tokens]!r} (see the matching rule)")
            continue
        seen[tokens] = model
        if not isinstance(prices, Mapping):
            problems.append(f"{at}: must be a mapping with on_demand and/or spot, got {prices!r}")
            continue
        unknown = [str(key) for key in prices if key not in PRICINGS]
        if unknown:
            problems.append(f"{at}: unknown key(s) {', '.join(unknown)} (known: on_demand, spot)")
        bad = [
            f"{at}.{key}: must be a non-negative number (EUR per GPU-hour), got {prices[key]!r}"
            for key in PRICINGS
            if key in prices and not _is_price(prices[key])
        ]
        problems += bad
        if not any(key in prices for key in PRICINGS):
            problems.append(f"{at}: needs on_demand and/or spot")
        if not bad and not unknown:
            out[model] = ModelPrice(model, prices.get("on_demand"), prices.get("spot"))
    return out


def read_config(path: str | Path) -> bytes:
    """The bytes of a configuration file, or a :class:`CatalogueError` that names it."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CatalogueError(str(path), [f"cannot read: {exc.strerror or exc}"]) from exc


def load_yaml(text: str | bytes, origin: str) -> Any:
    """Parse YAML, turning syntax errors into :class:`CatalogueError` with the line."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "YAML"
        problem = getattr(exc, "problem", None) or str(exc)
        raise CatalogueError(origin, [f"{where}: {problem}"]) from exc


# -- reloading -------------------------------------------------------------------------------------------

T = TypeVar("T")


class Reloading(Generic[T]):
    """A configuration file kept current: :meth:`current` re-reads it when its modification time or size
    changed and its content hash differs, checking at most every ``check_interval_s`` seconds of the
    (monotonic, injectable) ``clock``. Reloading configuration is not a result, so process time is right
    here; results still depend on event time only.

    The first load raises on a bad file. A later bad or missing file is logged once and the last good
    configuration stays in force."""

    def __init__(
        self,
        path: str | Path,
        parse: Callable[[bytes, str], T],
        *,
        check_interval_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self._parse = parse
        self._interval = check_interval_s
        self._clock = clock
        self.reloads = 0
        """How often a changed file replaced the configuration."""
        data = self._read()
        if data is None:
            raise CatalogueError(str(self.path), ["cannot read the file"])
        self._value = parse(data, str(self.path))
        self._hash = hashlib.sha256(data).digest()
        self._stat = self._stat_of()
        self._checked = clock()
        self._failed_hash: bytes | None = None

    def current(self) -> T:
        now = self._clock()
        if now - self._checked >= self._interval:
            self._checked = now
            self._check()
        return self._value

    def _check(self) -> None:
        stat = self._stat_of()
        if stat == self._stat:
            return
        data = self._read()
        if data is None:
            if self._stat is not None:
                log.warning("%s is gone or unreadable; keeping the configuration read before", self.path)
            self._stat = None
            return
        self._stat = stat
        digest = hashlib.sha256(data).digest()
        if digest == self._hash or digest == self._failed_hash:
            return
        try:
            value = self._parse(data, str(self.path))
        except CatalogueError as exc:
            self._failed_hash = digest
            log.error("not reloading %s, keeping the configuration read before: %s", self.path, exc)
            return
        self._value, self._hash, self._failed_hash = value, digest, None
        self.reloads += 1
        log.info("reloaded %s", self.path)

    def _stat_of(self) -> tuple[int, int] | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def _read(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except OSError:
            return None


class ReloadingCatalogue(Reloading[PriceCatalogue]):
    """The price catalogue at ``path``, re-read when it changes (see :class:`Reloading`)."""

    def __init__(
        self,
        path: str | Path,
        *,
        check_interval_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(path, PriceCatalogue.parse, check_interval_s=check_interval_s, clock=clock)
