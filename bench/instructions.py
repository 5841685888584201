"""Instructions per request of a real gateway, counted by valgrind's callgrind: the same on
every run to 1–2 %, where CPU time on a shared machine moves by 15 %. For the before and
after of a hot-path change whose cost is smaller than the bench's noise:

    .venv/bin/python bench/instructions.py [--requests 1000] [--stream]

One `core` gateway (as `bench/run.py` starts it) in front of nginx, run under callgrind; a
warm-up (not counted, so only a few times slower), then `--requests` requests one after the
other on one connection, counted. It counts the gateway's own instructions (Python, uvicorn,
the upstream client), not the kernel's (its sockets), nor any wait: compare runs of it, not
CPU time.
"""

from __future__ import annotations

import argparse
import http.client
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as bench/instructions.py

from bench.measure import chat_body, check_answer  # noqa: E402
from bench.run import CLIENT_KEY, gateway_yaml  # noqa: E402
from bench.upstream import nginx  # noqa: E402
from gateway.testing.process import run_gateway  # noqa: E402

# the line of a callgrind dump with the instructions it counted
TOTAL_LINES = ("summary:", "totals:")


def post(connection: http.client.HTTPConnection, body: bytes, *, stream: bool) -> None:
    """One request, read whole; anything but a complete answer stops the count."""
    connection.request("POST", "/v1/chat/completions", body, {
        "authorization": f"Bearer {CLIENT_KEY}", "content-type": "application/json"})
    reply = connection.getresponse()
    data = reply.read()
    if reply.status != 200:
        raise RuntimeError(f"the gateway answered {reply.status}: {data[:200]!r}")
    check_answer(data, stream=stream)


def callgrind(pid: int, command: str) -> None:
    subprocess.run(["callgrind_control", f"--{command}", str(pid)], check=True,
                   capture_output=True, timeout=120)


def total(dump: Path) -> int:
    for line in dump.read_text(errors="replace").splitlines():
        if line.startswith(TOTAL_LINES):
            return int(line.split()[1])
    raise RuntimeError(f"no total in {dump}")


def count(workdir: Path, *, requests: int, warmup: int, stream: bool) -> float:
    """Instructions per request over `requests`, after `warmup` requests."""
    with nginx(workdir) as upstream:
        config = workdir / "gateway.yaml"
        config.write_text(gateway_yaml(upstream, "core"))
        out = workdir / "callgrind.out"
        # counting from the start would run the imports some 50 times slower
        with run_gateway(config, wrapper=["valgrind", "--tool=callgrind", "--instr-atstart=no",
                                          f"--callgrind-out-file={out}"],
                         # the same str hashes, so the same dict and set probing, every run
                         env={"PYTHONHASHSEED": "0"}, timeout=300, grace=60) as gateway:
            host, port = gateway.url.removeprefix("http://").split(":")
            connection = http.client.HTTPConnection(host, int(port), timeout=120)
            body = chat_body("bench-sse" if stream else "bench-json", stream=stream)
            for _ in range(warmup):
                post(connection, body, stream=stream)
            callgrind(gateway.pid, "instr=on")
            for _ in range(requests):
                post(connection, body, stream=stream)
            callgrind(gateway.pid, "dump")
            connection.close()
        # `callgrind.out.1` is the dump of what was counted since counting began
        return total(workdir / "callgrind.out.1") / requests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--stream", action="store_true", help="streamed answers (10 chunks)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as workdir:
        per_request = count(Path(workdir), requests=args.requests, warmup=args.warmup,
                            stream=args.stream)
    kind = "stream" if args.stream else "whole"
    print(f"{kind}: {per_request:,.0f} instructions/request over {args.requests:,} requests")
    return 0


if __name__ == "__main__":
    sys.exit(main())
