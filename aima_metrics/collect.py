"""`aima-metrics collect ...`: runs the collectors (GPU, system, simulator, dcgm-exporter) as one
process, with one publisher and one self-metrics endpoint, until SIGTERM."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

from bus.codec import Codec
from bus.runtime import Service
from bus.settings import Settings
from producers.publisher import Publisher, last_flush_s
from producers.settings import CollectorSettings

Records = list[tuple[str, dict[str, Any]]]
log = logging.getLogger(__name__)


def _gpu(
    settings: Settings, own: CollectorSettings, once: bool, service: Service | None, publisher: Publisher
) -> Records:
    from producers.gpu.collector import run as run_gpu

    return run_gpu(
        settings,
        once=once,
        service=service,
        publisher=publisher,
        fast_interval_s=own.gpu_fast_interval_s,
        slow_interval_s=own.gpu_slow_interval_s,
        exporter_port=None if once else own.gpu_exporter_port,
        host=own.host,
    )


def _system(
    settings: Settings, own: CollectorSettings, once: bool, service: Service | None, publisher: Publisher
) -> Records:
    from producers.k8s import K8sConfig
    from producers.system import run as run_system

    return run_system(
        settings,
        once=once,
        service=service,
        publisher=publisher,
        intervals=own.system_intervals(),
        k8s=K8sConfig.from_settings(own),
        host=own.host or own.k8s_node_name,
    )


def _simulator(
    settings: Settings, own: CollectorSettings, once: bool, service: Service | None, publisher: Publisher
) -> Records:
    from producers.faults import FaultPlan
    from producers.simulator import run as run_simulator

    every_s = own.sim_faults_every_s
    return run_simulator(
        settings,
        once=once,
        service=service,
        publisher=publisher,
        rate_hz=own.sim_rate_hz,
        hosts=own.sim_hosts,
        gpus_per_host=own.sim_gpus_per_host,
        seed=own.sim_seed,
        faults=FaultPlan(every_s=every_s, seed=own.sim_seed) if every_s is not None else None,
    )


def _dcgm(
    settings: Settings, own: CollectorSettings, once: bool, service: Service | None, publisher: Publisher
) -> Records:
    from producers.dcgm.collector import run as run_dcgm

    assert own.dcgm_url is not None  # run() refuses to start dcgm without one
    return run_dcgm(
        settings,
        url=own.dcgm_url,
        once=once,
        service=service,
        publisher=publisher,
        fast_interval_s=own.gpu_fast_interval_s,
        slow_interval_s=own.gpu_slow_interval_s,
        timeout_s=own.dcgm_timeout_s,
        backoff_max_s=own.dcgm_backoff_max_s,
        host=own.host,
    )


Collector = Callable[[Settings, CollectorSettings, bool, Service | None, Publisher], Records]
COLLECTORS: dict[str, Collector] = {
    "gpu": _gpu,
    "system": _system,
    "jobs-sim": _simulator,
    "dcgm": _dcgm,
}


def _missing_topics(settings: Settings, service: Service | None) -> list[str] | None:
    """The collectors' topics the broker does not have. ``service`` None (``--once``): the broker has 15 s
    to answer. Otherwise wait for it as long as it takes, backing off and watching the stop: None when a
    stop came first."""
    from bus.kafka import admin, broker_metadata_unless_stopped, wait_for_broker
    from bus.topics import BY_KEY

    wanted = [BY_KEY[key].name(settings.topic_prefix) for key in TOPICS_USED]
    client = admin(settings)
    if service is None:
        wait_for_broker(settings, timeout_s=15)
        present = client.list_topics(timeout=10).topics
        return [name for name in wanted if name not in present]
    metadata = broker_metadata_unless_stopped(settings, service.stopping)
    return None if metadata is None else [name for name in wanted if name not in metadata.topics]


TOPICS_USED = ("gpu.samples", "system.samples", "job.events", "job.timings", "queue.samples", "k8s.pods")


def _json_default(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def run(names: list[str], once: bool, echo: Callable[[str], None], dcgm_url: str | None = None) -> int:
    """``dcgm_url``: the endpoint `collect dcgm` reads (``--url``), instead of AIMA_DCGM_URL."""
    settings = Settings()
    # Here, at the start: a bad value stops the process before anything runs.
    own = CollectorSettings(**({"dcgm_url": dcgm_url} if dcgm_url else {}))
    if "dcgm" in names and own.dcgm_url is None:
        echo("collect dcgm needs the endpoint: --url http://HOST:9400/metrics (or AIMA_DCGM_URL)")
        return 2
    service = Service(f"collect-{'+'.join(names)}", settings)
    if once:
        from bus import logs

        logs.configure("WARNING")
    else:
        # First of all, so that a stop while it waits for the broker is a clean one.
        service.start()
    missing = _missing_topics(settings, None if once else service)
    if missing is None:
        service.stopped()
        return 0
    if missing:
        echo(f"topics missing on {settings.kafka_bootstrap}: {', '.join(missing)}")
        echo("create them with `aima-metrics topics --create` (or start the stack with `aima-metrics up`)")
        if not once:
            service.stopped()
        return 2
    publisher = Publisher(settings, registry=service.registry, source="+".join(names))
    results: dict[str, Records] = {}
    errors: dict[str, BaseException] = {}

    def one(name: str) -> None:
        try:
            results[name] = COLLECTORS[name](settings, own, once, None if once else service, publisher)
        except BaseException as exc:  # reported below; one collector's failure must not hide the others'
            errors[name] = exc
            service.stopping.set()

    threads = [threading.Thread(target=one, args=(name,), name=name, daemon=True) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(0.5)
    # What is not acknowledged when the bound's time is up (the broker away) was never on a topic.
    publisher.flush(last_flush_s(None if once else service, settings))
    log.info(
        "publisher closed",
        extra={
            "delivered": publisher.delivered,
            "failed": publisher.failed,
            "pending": publisher.pending(),
            "dropped": publisher.dropped,
            "invalid": publisher.invalid,
        },
    )
    if not once:
        service.stopped()
    for name, exc in errors.items():
        echo(f"{name} collector failed: {exc!r}")
    if publisher.failed or publisher.pending():
        echo(f"{publisher.failed} records failed delivery, {publisher.pending()} still pending")
    if once:
        codec = Codec.from_settings(settings)
        for name in names:
            records = results.get(name, [])
            if name == "gpu" and not records and name not in errors:
                echo("gpu: no NVML device found (no NVIDIA driver or GPU on this machine); no GPU samples")
            if name == "dcgm" and not records and name not in errors:
                echo(f"dcgm: {own.dcgm_url} exports no GPU field this collector reads; no GPU samples")
            for record_name, value in records:
                # Printed as a subscriber sees it: encoded and decoded through the contract.
                full_name, decoded = codec.decode(codec.encode(record_name, value))
                echo(json.dumps({"record": full_name, "value": decoded}, default=_json_default))
    return 1 if errors or publisher.failed else 0
