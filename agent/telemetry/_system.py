"""Device health numbers for telemetry: CPU, memory, disk free, uptime.

psutil is not an agent dependency; everything comes from ``os``, ``shutil`` and, on
Linux, a few small reads of ``/proc``. A number the platform does not offer is None.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["SystemSampler"]

_PROC = Path("/proc")


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _system_cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    text = _read(_PROC / "stat")
    if text is None or not text.startswith("cpu "):
        return None
    fields = [int(v) for v in text.split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user/nice
    return total - idle, total


def _meminfo() -> dict[str, int]:
    text = _read(_PROC / "meminfo") or ""
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0]) * 1024  # values are in KiB
    return out


def _process_rss_bytes() -> int | None:
    text = _read(_PROC / "self" / "statm")
    if text is None:
        return None
    return int(text.split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _boot_uptime_s() -> float | None:
    text = _read(_PROC / "uptime")
    return None if text is None else float(text.split()[0])


class SystemSampler:
    """CPU use since the previous sample, memory, disk free of ``state_dir`` and uptimes."""

    def __init__(
        self, state_dir: str | Path, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.state_dir = Path(state_dir)
        self._clock = clock
        self._started = clock()
        self._last_wall = self._started
        self._last_proc = self._process_cpu_s()
        self._last_sys = _system_cpu_ticks()

    @staticmethod
    def _process_cpu_s() -> float:
        t = os.times()
        return t.user + t.system

    def sample(self) -> dict[str, Any]:
        """JSON-ready numbers; CPU percentages cover the time since the previous call."""
        now = self._clock()
        wall = max(now - self._last_wall, 1e-9)
        proc = self._process_cpu_s()
        sys_ticks = _system_cpu_ticks()
        system_cpu = None
        if sys_ticks is not None and self._last_sys is not None:
            busy = sys_ticks[0] - self._last_sys[0]
            total = sys_ticks[1] - self._last_sys[1]
            system_cpu = round(100.0 * busy / total, 2) if total > 0 else None
        process_cpu = round(100.0 * (proc - self._last_proc) / wall, 2)
        self._last_wall, self._last_proc, self._last_sys = now, proc, sys_ticks

        mem = _meminfo()
        try:
            disk = shutil.disk_usage(self.state_dir)
            disk_free: int | None = disk.free
            disk_total: int | None = disk.total
        except OSError:
            disk_free = disk_total = None
        try:
            load: list[float] | None = [round(v, 2) for v in os.getloadavg()]
        except OSError:
            load = None
        return {
            # Percent of one CPU for the process (can exceed 100 with threads), percent of
            # all CPUs for the system.
            "cpu_process_pct": process_cpu,
            "cpu_system_pct": system_cpu,
            "cpu_count": os.cpu_count(),
            "load_avg": load,
            "mem_process_rss_bytes": _process_rss_bytes(),
            "mem_total_bytes": mem.get("MemTotal"),
            "mem_available_bytes": mem.get("MemAvailable"),
            "disk_free_bytes": disk_free,
            "disk_total_bytes": disk_total,
            "uptime_process_s": round(now - self._started, 1),
            "uptime_system_s": _boot_uptime_s(),
        }
