"""The benchmark's upstream: nginx serving fixed bodies (``nginx.conf.tmpl`` lists its paths)
on a free loopback port, at next to no cost, so that what is measured is the gateway."""

from __future__ import annotations

import os
import shutil
import string
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from gateway.testing.process import free_port, spawn, stop, wait_until_answers

CHUNKS = 10
PIECES = [f"Part {i} of the benchmark answer. " for i in range(CHUNKS)]
USAGE = {"prompt_tokens": 24, "completion_tokens": 70, "total_tokens": 94}
_ID = {"id": "chatcmpl-bench", "created": 1_700_000_000, "model": "bench-upstream"}


def completion_body() -> bytes:
    message = {"role": "assistant", "content": "".join(PIECES)}
    return orjson.dumps({**_ID, "object": "chat.completion", "usage": USAGE, "choices": [
        {"index": 0, "finish_reason": "stop", "logprobs": None, "message": message}]})


def stream_body() -> bytes:
    events = []
    for i, piece in enumerate(PIECES):
        last = i == CHUNKS - 1
        delta = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
        chunk: dict[str, Any] = {**_ID, "object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": delta, "finish_reason": "stop" if last else None}]}
        if last:
            chunk["usage"] = USAGE
        events.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
    return b"".join(events) + b"data: [DONE]\n\n"


def ask_body() -> bytes:
    """Nuclia's /ask stream: the answer in 10 items, then retrieval (one resource, three
    paragraphs), status and metadata."""
    ids = [f"{'0' * 32}/t/text/{i}" for i in range(3)]
    paragraphs = {pid: {"id": pid, "score": 0.9 - i / 10, "score_type": "BOTH", "order": i,
                        "text": f"Benchmark paragraph {i}."} for i, pid in enumerate(ids)}
    results = {"best_matches": ids, "resources": {"0" * 32: {
        "title": "Benchmark resource", "fields": {"/t/text": {"paragraphs": paragraphs}}}}}
    items: list[dict[str, Any]] = [{"type": "answer", "text": piece} for piece in PIECES]
    items += [{"type": "retrieval", "results": results},
              {"type": "status", "code": "0", "status": "success"},
              {"type": "metadata", "tokens": {"input": 10, "output": 20}}]
    return b"".join(orjson.dumps({"item": item}) + b"\n" for item in items)


@dataclass(frozen=True)
class Upstream:
    url: str  # http://127.0.0.1:PORT
    pid: int
    prefix: Path  # nginx's folder: config, bodies, logs

    def cached_calls(self) -> int:
        """Requests that reached ``/cached`` (its access log is written unbuffered)."""
        log = self.prefix / "cached.log"
        return len(log.read_bytes().splitlines()) if log.exists() else 0


@contextmanager
def nginx(workdir: Path) -> Iterator[Upstream]:
    """nginx (one worker) serving the fixed bodies until the block exits."""
    prefix = workdir / "nginx"
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    for name, body in (("completion.json", completion_body()), ("stream.sse", stream_body()),
                       ("ask.ndjson", ask_body())):
        (prefix / name).write_bytes(body)
    port = free_port()
    # started as root, nginx's worker would run as "nobody", who cannot read a private folder
    user = "user root;" if os.geteuid() == 0 else ""
    conf = prefix / "nginx.conf"
    conf.write_text(string.Template(Path(__file__).with_name("nginx.conf.tmpl").read_text())
                    .substitute(prefix=prefix, port=port, user_directive=user))
    log = prefix / "error.log"
    binary = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")  # not on all PATHs
    if binary is None:
        raise RuntimeError("nginx is not installed (`make bench` installs nginx-light)")
    proc = spawn([binary, "-c", str(conf), "-p", str(prefix), "-e", str(log)], log=log)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_answers(f"{url}/health", proc, log, timeout=10)
        yield Upstream(url, proc.pid, prefix)
    finally:
        stop(proc)
