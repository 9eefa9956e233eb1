"""The machine line every bench report starts with."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path


def machine() -> str:
    """CPUs and their model, memory and Python version, e.g. ``2 CPUs (AMD EPYC), 23.5 GiB RAM, Python
    3.11.7``."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())[1])
    except (OSError, TypeError):
        mem_kb = 0
    return (
        f"{os.cpu_count()} CPUs ({cpu}), {mem_kb / 1024**2:.1f} GiB RAM, Python {platform.python_version()}"
    )
