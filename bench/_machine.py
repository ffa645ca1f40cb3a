"""What every benchmark records about the machine it ran on: a number means little without it."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

# The CPU flags that change what the runtimes can do (int8 dot products, vector width).
_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "neon", "asimd")


def machine() -> dict[str, Any]:
    """CPU model, the flags above that this CPU has, core count, OS and Python."""
    model, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model is None:
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {
        "cpu": model or platform.processor() or platform.machine(),
        "cpu_flags": sorted(f for f in _FLAGS if f in flags),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
