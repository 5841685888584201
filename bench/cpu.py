"""CPU accounting around one measurement, from /proc: the server's CPU time (gateway or nginx,
with its child processes), wrk's (a reaped child), and everything else on the machine.

On a shared 2-core machine throughput moves with whatever else runs; the server's CPU time
per request moves much less, and "other load" says when a row was disturbed.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_TICK = os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds spent busy by all cores since boot (idle and iowait excluded)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(x) for x in fields[:8]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
    return (user + nice + system + irq + softirq + steal) / _TICK


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, user+system CPU seconds) of one process, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = raw[raw.rindex(")") + 2:].split()  # fields after "pid (comm) "
    return int(rest[1]), (int(rest[11]) + int(rest[12])) / _TICK


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of `pid` and its direct children (nginx master + worker)."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        got = _stat(int(entry))
        if got is not None and (int(entry) == pid or got[0] == pid):
            total += got[1]
    return total


def _children_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class CpuSample:
    wall_s: float
    server_s: float  # the loaded server (and its children)
    wrk_s: float
    other_s: float  # everything else on the machine

    @property
    def server_cores(self) -> float:
        return self.server_s / self.wall_s if self.wall_s else 0.0

    @property
    def other_cores(self) -> float:
        return max(0.0, self.other_s / self.wall_s) if self.wall_s else 0.0

    def us_per_request(self, requests: int) -> float:
        return self.server_s / requests * 1e6 if requests else 0.0

    def __add__(self, other: CpuSample) -> CpuSample:
        return CpuSample(self.wall_s + other.wall_s, self.server_s + other.server_s,
                         self.wrk_s + other.wrk_s, self.other_s + other.other_s)

    def as_dict(self) -> dict[str, Any]:
        return {"wall_s": round(self.wall_s, 3), "server_cpu_s": round(self.server_s, 3),
                "wrk_cpu_s": round(self.wrk_s, 3), "other_cpu_s": round(self.other_s, 3),
                "server_cores": round(self.server_cores, 3),
                "other_cores": round(self.other_cores, 3)}


class CpuWindow:
    """Filled in when the `cpu_window` block exits."""

    sample: CpuSample | None = None


@contextmanager
def cpu_window(server_pid: int) -> Iterator[CpuWindow]:
    window = CpuWindow()
    wall, busy = time.monotonic(), machine_busy_s()
    server, children = tree_cpu_s(server_pid), _children_s()
    yield window
    wall, busy = time.monotonic() - wall, machine_busy_s() - busy
    server, children = tree_cpu_s(server_pid) - server, _children_s() - children
    window.sample = CpuSample(wall, server, children, busy - server - children)
