"""The price catalogue of the cost processor: its home is bus/prices.py (the API reads it too, and may
import only bus); these names stay importable from here for the cost processors and their tests."""

from __future__ import annotations

from bus.prices import (
    DEFAULT_PRICES_FILE,
    PRICINGS,
    CatalogueError,
    ModelPrice,
    PriceCatalogue,
    Reloading,
    ReloadingCatalogue,
    load_yaml,
    model_tokens,
    read_config,
)

__all__ = [
    "DEFAULT_PRICES_FILE",
    "PRICINGS",
    "CatalogueError",
    "ModelPrice",
    "PriceCatalogue",
    "Reloading",
    "ReloadingCatalogue",
    "load_yaml",
    "model_tokens",
    "read_config",
]
