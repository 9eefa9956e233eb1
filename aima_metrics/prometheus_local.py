"""The local stack's Prometheus (A5; the short-term store of seed §4.2): `up` runs `aima-metrics prometheus`
as one of its processes, which writes a configuration scraping every other process of the stack and then
becomes Debian's ``prometheus`` binary (exec: `up` stops it like any child, and the parent-death signal set
for it survives the exec).

The configuration is infra/prometheus/prometheus.yml (the compose stack's) with the compose hosts swapped
for the local ports: the same global settings, the seed's ``gpu_metrics`` job (interval, ``service``
label) on the GPU exporter, and one job per process named as in compose, so a query or dashboard reads the
same series either way."""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import yaml

from bus.settings import REPO_ROOT

__all__ = ["GPU_JOB", "TEMPLATE", "config_path", "local_config", "prometheus"]

TEMPLATE = REPO_ROOT / "infra" / "prometheus" / "prometheus.yml"
GPU_JOB = "gpu_metrics"
"""The seed's job (§3.2) on the GPU exporter: its device values and the GPU collector's own metrics."""


def local_config(
    template: dict[str, Any], port: int, gpu_exporter: str, targets: Sequence[tuple[str, str]]
) -> dict[str, Any]:
    """``template`` (prometheus.yml as loaded) for the local stack: Prometheus itself on ``port``, the
    ``gpu_metrics`` job on ``gpu_exporter`` (host:port), and a job per ``(name, host:port)`` of
    ``targets``, with the template's interval for a job of that name (the global one otherwise)."""
    jobs = {job["job_name"]: job for job in template.get("scrape_configs", [])}
    if GPU_JOB not in jobs:
        raise ValueError(f"{TEMPLATE.name} has no {GPU_JOB} job")
    config: dict[str, Any] = {"global": copy.deepcopy(template.get("global", {}))}
    scrape = [{"job_name": "prometheus", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}]
    gpu = copy.deepcopy(jobs[GPU_JOB])
    labels = {k: v for group in gpu.get("static_configs", []) for k, v in group.get("labels", {}).items()}
    gpu["static_configs"] = [{"targets": [gpu_exporter], **({"labels": labels} if labels else {})}]
    scrape.append(gpu)
    for name, address in targets:
        job: dict[str, Any] = {"job_name": name, "static_configs": [{"targets": [address]}]}
        if "scrape_interval" in jobs.get(name, {}):
            job["scrape_interval"] = jobs[name]["scrape_interval"]
        scrape.append(job)
    config["scrape_configs"] = scrape
    return config


def _target(value: str) -> tuple[str, str]:
    name, sep, address = value.partition("=")
    if not sep or not name or ":" not in address:
        raise click.BadParameter(f"{value!r}: expected NAME=HOST:PORT")
    return name, address


@click.command()
@click.option("--port", type=int, required=True, help="where Prometheus listens (127.0.0.1)")
@click.option("--gpu-exporter", required=True, help="HOST:PORT of the GPU exporter (the gpu_metrics job)")
@click.option("--scrape", "targets", multiple=True, help="NAME=HOST:PORT of a process's self-metrics")
@click.option("--retention", default="1d", show_default=True, help="how long samples are kept")
def prometheus(port: int, gpu_exporter: str, targets: tuple[str, ...], retention: str) -> None:
    """Run the local stack's Prometheus (`up` starts it): scrapes the GPU exporter and the given
    processes; its configuration and data live in <state_dir>/prometheus."""
    from bus.settings import Settings

    binary = shutil.which("prometheus")
    if binary is None:
        raise click.ClickException("no prometheus on PATH: ./dev setup installs it (Debian's prometheus)")
    config_file = config_path(Settings().state_dir)
    folder = config_file.parent
    folder.mkdir(parents=True, exist_ok=True)
    config = local_config(
        yaml.safe_load(TEMPLATE.read_text()), port, gpu_exporter, [_target(t) for t in targets]
    )
    config_file.write_text(
        "# Written by `aima-metrics prometheus` (aima_metrics/prometheus_local.py) from "
        f"{TEMPLATE.relative_to(REPO_ROOT)}; rewritten at each start.\n"
        + yaml.safe_dump(config, sort_keys=False)
    )
    args = [
        binary,
        f"--config.file={config_file}",
        f"--storage.tsdb.path={folder / 'data'}",
        f"--storage.tsdb.retention.time={retention}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--web.enable-remote-write-receiver",
    ]
    click.echo(" ".join(args), err=True)
    os.execv(binary, args)


def config_path(state_dir: Path) -> Path:
    """Where :func:`prometheus` writes the configuration it runs with."""
    return state_dir / "prometheus" / "prometheus.yml"
