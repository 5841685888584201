"""Child processes of the benchmark: start them in their own session, wait until they answer,
read their memory, and always stop them (TERM, then KILL of the whole process group).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from gateway.testing.redis_server import free_port

__all__ = ["BenchProcessError", "free_port", "read_rss_mb", "spawn", "stop", "tail",
           "wait_http"]


class BenchProcessError(RuntimeError):
    """A child process that did not start, or died while it was needed."""


def spawn(argv: Sequence[str], *, log: Path, cwd: Path | None = None,
          env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start `argv` in a new session (Ctrl-C reaches only us; we stop it) with its output in
    `log` (a file, never a pipe nobody reads)."""
    with log.open("ab") as out:
        return subprocess.Popen(
            list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=cwd, env=env, start_new_session=True,
        )


def stop(proc: subprocess.Popen[bytes], *, grace: float = 5.0) -> None:
    """TERM the process, wait up to `grace` seconds, then KILL its whole process group."""
    if proc.poll() is None:
        try:
            proc.terminate()
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers (nginx workers) of the session
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait(grace)


def tail(log: Path, lines: int = 15) -> str:
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30.0) -> None:
    """Poll `url` with GET until it answers 2xx; fail early if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchProcessError(
                f"exited with status {proc.returncode} before answering {url}:\n{tail(log)}"
            )
        try:
            with urllib.request.urlopen(url, timeout=1.0) as reply:  # noqa: S310 (loopback)
                if 200 <= reply.status < 300:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise BenchProcessError(f"no answer from {url} within {timeout:.0f} s:\n{tail(log)}")


def read_rss_mb(pid: int) -> float:
    """Resident memory (VmRSS) of one process, in MB (10^6 bytes)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise BenchProcessError(f"no VmRSS for pid {pid}")
