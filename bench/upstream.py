"""The benchmark's fake upstream: nginx serving fixed bodies on a free loopback port.

Paths (all ``POST``): ``/json/v1/chat/completions`` (one ``chat.completion``),
``/sse/v1/chat/completions`` (10 ``chat.completion.chunk`` events + ``[DONE]``),
``/api/v1/kb/bench/ask`` (Nuclia ndjson: 10 answer items, retrieval, status, metadata),
``/hook`` and ``*/conversations`` (analytics sinks: 200 ``{}``), and
``/cached/v1/chat/completions`` (the JSON body again, logged: the calls a cache let through).
"""

from __future__ import annotations

import os
import shutil
import string
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from bench.processes import BenchProcessError, free_port, spawn, stop, tail, wait_http

TEMPLATE = Path(__file__).with_name("nginx.conf.tmpl")
CHUNKS = 10
KBID = "bench"
_CREATED = 1_700_000_000
_PIECES = [f"Part {i} of the benchmark answer. " for i in range(CHUNKS)]


def completion_body() -> bytes:
    return orjson.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": _CREATED,
        "model": "bench-upstream",
        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                     "message": {"role": "assistant", "content": "".join(_PIECES)}}],
        "usage": {"prompt_tokens": 24, "completion_tokens": 70, "total_tokens": 94},
    })


def stream_body() -> bytes:
    events = []
    for i, piece in enumerate(_PIECES):
        delta: dict[str, Any] = {"content": piece}
        if i == 0:
            delta["role"] = "assistant"
        last = i == CHUNKS - 1
        chunk: dict[str, Any] = {
            "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": _CREATED,
            "model": "bench-upstream",
            "choices": [{"index": 0, "delta": delta, "finish_reason": "stop" if last else None,
                         "logprobs": None}],
        }
        if last:
            chunk["usage"] = {"prompt_tokens": 24, "completion_tokens": 70, "total_tokens": 94}
        events.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
    return b"".join(events) + b"data: [DONE]\n\n"


def _retrieval() -> dict[str, Any]:
    """A small ``KnowledgeboxFindResults``: one resource with three paragraphs."""
    rid = "0" * 31 + "1"
    paragraphs = {}
    for order in range(3):
        text = f"Benchmark paragraph {order} of the sample resource."
        pid = f"{rid}/t/text/{order * 100}-{order * 100 + len(text)}"
        paragraphs[pid] = {"score": 0.9 - order / 10, "score_type": "BOTH", "order": order,
                           "text": text, "id": pid, "labels": [], "position": None,
                           "fuzzy_result": False, "page_with_visual": False,
                           "reference": None, "is_a_table": False,
                           "relevant_relations": None}
    return {"resources": {rid: {"id": rid, "slug": "bench", "title": "Benchmark resource",
                                "summary": None,
                                "fields": {"/t/text": {"paragraphs": paragraphs}}}},
            "relations": None, "query": "benchmark", "rephrased_query": None,
            "total": len(paragraphs), "page_number": 0, "page_size": 20, "next_page": False,
            "nodes": None, "shards": None, "autofilters": [],
            "min_score": {"semantic": 0.7, "bm25": 0.0}, "best_matches": list(paragraphs),
            "metrics": None, "search_after": None}


def ask_body() -> bytes:
    items: list[dict[str, Any]] = [{"type": "answer", "text": piece} for piece in _PIECES]
    items.append({"type": "retrieval", "results": _retrieval()})
    items.append({"type": "status", "code": "0", "status": "success", "details": None})
    items.append({"type": "metadata", "tokens": {"input": 10, "output": 20},
                  "timings": {"generative_first_chunk": 0.1, "generative_total": 0.5}})
    return b"".join(orjson.dumps({"item": item}) + b"\n" for item in items)


@dataclass(frozen=True)
class Upstream:
    """Where the running fake upstream answers."""

    url: str  # http://127.0.0.1:PORT
    pid: int
    logs: Path  # the folder of the sink and cached-model access logs

    @property
    def json_base(self) -> str:
        return f"{self.url}/json/v1"

    @property
    def sse_base(self) -> str:
        return f"{self.url}/sse/v1"

    @property
    def nuclia_base(self) -> str:
        return f"{self.url}/api/v1"

    @property
    def hook(self) -> str:
        return f"{self.url}/hook"

    @property
    def cached_base(self) -> str:
        return f"{self.url}/cached/v1"

    def sink_posts(self) -> int:
        """How many POSTs the sink endpoints received (nginx flushes its logs every second)."""
        return _lines(self.logs / "sink.log")

    def cached_calls(self) -> int:
        """How many calls for the cached model reached the upstream."""
        return _lines(self.logs / "cached.log")


def _lines(path: Path) -> int:
    try:
        with path.open("rb") as log:
            return sum(1 for _ in log)
    except FileNotFoundError:
        return 0


def render_conf(prefix: Path, port: int) -> str:
    # started as root, nginx's workers would switch to "nobody", who cannot read a private
    # temp dir: keep them as the user who runs the benchmark
    user = "user root;" if os.geteuid() == 0 else ""
    return string.Template(TEMPLATE.read_text()).substitute(prefix=prefix, port=port,
                                                            user_directive=user)


@contextmanager
def nginx_upstream(workdir: Path) -> Iterator[Upstream]:
    """Run nginx (1 worker, no access log) on a free port until the block exits."""
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists()
                                       else None)
    if binary is None:
        raise BenchProcessError("nginx is not installed (`make bench` installs nginx-light)")
    prefix = workdir / "nginx"
    for sub in ("bodies", "tmp"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    (prefix / "bodies" / "completion.json").write_bytes(completion_body())
    (prefix / "bodies" / "stream.sse").write_bytes(stream_body())
    (prefix / "bodies" / "ask.ndjson").write_bytes(ask_body())
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(render_conf(prefix, port))
    log = prefix / "nginx.out"
    proc: subprocess.Popen[bytes] = spawn(
        [binary, "-c", str(conf), "-p", str(prefix), "-e", str(prefix / "error.log")], log=log
    )
    try:
        url = f"http://127.0.0.1:{port}"
        try:
            wait_http(f"{url}/json/v1/chat/completions", proc, log, timeout=10)
        except BenchProcessError as exc:
            raise BenchProcessError(f"nginx: {exc}\n{tail(prefix / 'error.log')}") from exc
        yield Upstream(url=url, pid=proc.pid, logs=prefix)
    finally:
        stop(proc)
