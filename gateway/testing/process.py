"""Child processes for the tests and the benchmark, above all ``python -m gateway serve``.

Each child runs in its own session with its output in a log file; it is waited for by polling
its HTTP port (never a fixed sleep) and always stopped: SIGTERM, then SIGKILL of its whole
process group (uvicorn or nginx workers included) when it lingers.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

# the config file decides these; a developer's shell must not switch them under a test
_CALLER_SETTINGS = ("GATEWAY_CONFIG", "GATEWAY_REDIS_URL", "PROMETHEUS_MULTIPROC_DIR")


class ProcessError(RuntimeError):
    """A child process that exited or stayed silent when it should have answered."""


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spawn(argv: Sequence[str], *, log: Path,
          env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start `argv` in a new session (a Ctrl-C reaches only us, and we stop it), its stdout
    and stderr appended to `log`: a file, never a pipe that nobody reads."""
    with log.open("ab") as out:
        return subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)


def stop(proc: subprocess.Popen[bytes], *, grace: float = 10.0) -> None:
    """SIGTERM, up to `grace` seconds to exit, then SIGKILL whatever is left of its group."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the whole group is gone already
    proc.wait()


def _tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_until_answers(url: str, proc: subprocess.Popen[bytes], log: Path, *,
                       timeout: float = 30.0) -> None:
    """Poll ``GET url`` until it answers 2xx; fail as soon as `proc` exits, with its log."""
    parts = urlsplit(url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ProcessError(f"exited with status {proc.returncode} before answering {url}; "
                               f"its output ends:\n{_tail(log)}")
        connection = http.client.HTTPConnection(parts.netloc, timeout=1.0)
        try:
            connection.request("GET", parts.path or "/")
            if 200 <= connection.getresponse().status < 300:
                return
        except OSError:
            pass  # not listening yet
        finally:
            connection.close()
        time.sleep(0.02)
    raise ProcessError(f"no answer from {url} within {timeout:.0f} s:\n{_tail(log)}")


@dataclass(frozen=True)
class GatewayProcess:
    """One running ``gateway serve``: where it answers, its pid, and what it has printed."""

    url: str  # http://127.0.0.1:PORT
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        """Its stdout and stderr so far."""
        return self.log_path.read_text(errors="replace")

    def send_signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def kill(self) -> int:
        """Crash it: SIGKILL to its whole process group, so no shutdown code runs anywhere.
        Returns its exit status."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.wait(10)


def gateway_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a gateway command: ours, less what the config decides, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in _CALLER_SETTINGS}
    env["PYTHONUNBUFFERED"] = "1"  # its log is complete whenever a test reads it
    env.update(extra or {})
    return env


@contextmanager
def run_gateways(config: Path, count: int, *, workers: int = 1,
                 env: Mapping[str, str] | None = None, ready: str = "/healthz",
                 timeout: float = 30.0, grace: float = 10.0, args: Sequence[str] = (),
                 wrapper: Sequence[str] = ()) -> Iterator[list[GatewayProcess]]:
    """`count` replicas of ``gateway serve --config config`` (plus `args`, e.g. ``--demo``),
    each on a free port with `workers` uvicorn workers, run by `wrapper` if any (a profiler,
    valgrind); all are started before the first is waited for (start-up is mostly imports).
    Each logs to ``gateway-<port>.log`` beside the config. The block starts once every
    replica answers ``GET ready``; all are stopped when it exits."""
    with ExitStack() as stack:
        started = []
        for _ in range(count):
            port = free_port()
            log = config.with_name(f"gateway-{port}.log")
            argv = [*wrapper, sys.executable, "-m", "gateway", "serve", "--config", str(config),
                    "--port", str(port), "--workers", str(workers), *args]
            proc = spawn(argv, log=log, env=gateway_env(env))
            stack.callback(stop, proc, grace=grace)
            started.append(GatewayProcess(f"http://127.0.0.1:{port}", proc, log))
        for gateway in started:
            wait_until_answers(gateway.url + ready, gateway.proc, gateway.log_path,
                               timeout=timeout)
        yield started


@contextmanager
def run_gateway(config: Path, *, workers: int = 1, env: Mapping[str, str] | None = None,
                ready: str = "/healthz", timeout: float = 30.0, grace: float = 10.0,
                args: Sequence[str] = (), wrapper: Sequence[str] = ()
                ) -> Iterator[GatewayProcess]:
    """One ``gateway serve`` (as `run_gateways`)."""
    with run_gateways(config, 1, workers=workers, env=env, ready=ready, timeout=timeout,
                      grace=grace, args=args, wrapper=wrapper) as (gateway,):
        yield gateway
