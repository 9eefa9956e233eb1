"""The API's settings beyond :class:`bus.settings.Settings`: where it listens, TLS, the token pepper and
the alert stream's limit. Built once when the process starts (``api.main.run``, the token commands) and
passed down; never read at import time.

``AIMA_API_TOKEN_PEPPER`` is a server-side secret mixed into every token hash (HMAC-SHA256 keyed with it).
Tokens are stored as that hash only; a token created under one pepper does not authenticate under another,
so changing or removing it revokes every token (create them anew)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from bus.prices import DEFAULT_PRICES_FILE
from bus.settings import REPO_ROOT, AimaSettings, described

__all__ = ["ApiSettings"]


class ApiSettings(AimaSettings):
    model_config = SettingsConfigDict(env_prefix="AIMA_API_")

    host: str = Field("127.0.0.1", description="address the API listens on")
    port: int = Field(8000, gt=0, lt=65536, description="port the API listens on")
    tls_cert: Path | None = Field(
        None, description="PEM certificate; with AIMA_API_TLS_KEY the API speaks HTTPS"
    )
    tls_key: Path | None = Field(None, description="PEM key of AIMA_API_TLS_CERT")
    token_pepper: SecretStr | None = Field(
        None,
        description="server-side key mixed into token hashes (the same value for the API and the token "
        "commands; changing it revokes every token)",
    )
    max_streams: int = Field(100, ge=0, description="how many `/alerts/stream` clients may listen at once")
    recommend_window_hours: int = Field(
        24, gt=0, le=24 * 31, description="hours of hourly cost figures `/recommendations` looks back over"
    )
    recommend_idle_min_share: float = Field(
        0.5,
        ge=0,
        le=1,
        description="share of a group's GPU hours that must be idle for `/recommendations` to list it",
    )
    recommend_idle_below_percent: float = Field(
        10.0,
        ge=0,
        le=100,
        description="a GPU hour whose mean utilization is below this percent is idle (`/recommendations` "
        "per GPU)",
    )
    recommend_idle_min_hours: int = Field(
        2, gt=0, le=24 * 31, description="consecutive idle hours before `/recommendations` lists a GPU"
    )
    recommend_allocated_memory_percent: float = Field(
        5.0,
        gt=0,
        le=100,
        description="an idle GPU hour whose mean memory in use is at least this percent of the total was "
        "held by a job (allocated); below it, unallocated",
    )
    recommend_memory_safe_percent: float = Field(
        90.0,
        gt=0,
        le=100,
        description="share of GPU memory a job may fill; a job's batch factor is this over its peak share",
    )
    recommend_batch_min_factor: float = Field(
        1.5,
        gt=1,
        le=100,
        description="least batch factor for `/recommendations` to list a job with memory headroom",
    )
    recommend_slowdown_min_drop_percent: float = Field(
        30.0,
        gt=0,
        lt=100,
        description="a job's whole hour is slow when its frames/s is at least this percent below its fastest "
        "hour's; `/recommendations` lists a job with slow hours after normal ones, and the GPU metrics that "
        "moved most between them",
    )
    recommend_prices_file: Path = described(
        DEFAULT_PRICES_FILE,
        "price catalogue `/recommendations` prices providers by for the cheapest one (the file of "
        "AIMA_PRICES_FILE)",
        shown="streams/costs/prices.yaml",
    )
    ui_library_dir: Path = described(
        REPO_ROOT / ".aima" / "npm" / "node_modules" / "uplot" / "dist",
        "folder holding the console's chart library (uPlot's `uPlot.iife.min.js` and `uPlot.min.css`, from "
        "the npm registry); without it the console shows tables",
        shown=".aima/npm/node_modules/uplot/dist (./dev setup installs it there)",
    )

    @model_validator(mode="after")
    def _tls_pair(self) -> ApiSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both AIMA_API_TLS_CERT and AIMA_API_TLS_KEY (or neither)")
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def pepper(self) -> str | None:
        return self.token_pepper.get_secret_value() if self.token_pepper is not None else None
