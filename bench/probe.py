"""One request before each measurement, to prove the load measures what it claims: a 200, and
for a stream the number of ``chat.completion.chunk`` events and the closing ``[DONE]``.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass

from bench.processes import BenchProcessError


@dataclass(frozen=True)
class Probe:
    status: int
    note: str  # e.g. "12 chunks/answer" for a stream; "" for a whole answer
    cache: str | None = None  # the gateway's cache header, when it sends one


def count_chunks(body: bytes) -> tuple[int, bool]:
    """(chunk events, whether the stream ended with ``data: [DONE]``) of an SSE body."""
    events = [line for line in body.split(b"\n") if line.startswith(b"data:")]
    chunks = sum(1 for line in events if b"chat.completion.chunk" in line)
    done = bool(events) and events[-1].strip() == b"data: [DONE]"
    return chunks, done


def probe(url: str, body: bytes, authorization: str, *, unique: str = "probe") -> Probe:
    """POST `body` once (``@N@`` replaced by `unique`) and check the answer's shape."""
    request = urllib.request.Request(
        url, data=body.replace(b"@N@", unique.encode()), method="POST",
        headers={"content-type": "application/json", "authorization": authorization},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:  # noqa: S310 (loopback)
            data = reply.read()
            status = reply.status
            kind = reply.headers.get("content-type", "")
            cache = next((f"{k}: {v}" for k, v in reply.headers.items()
                          if "cache" in k.lower() and k.lower() != "cache-control"), None)
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:300].decode("utf-8", "replace")
        raise BenchProcessError(f"probe {url}: HTTP {exc.code}: {detail}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise BenchProcessError(f"probe {url}: {exc}") from exc
    if kind.startswith("text/event-stream"):
        chunks, done = count_chunks(data)
        if not done:
            raise BenchProcessError(f"probe {url}: the stream did not end with [DONE]")
        return Probe(status, f"{chunks} chunks/answer", cache)
    if b'"chat.completion"' not in data and b"choices" not in data:
        raise BenchProcessError(f"probe {url}: not a chat.completion: {data[:200]!r}")
    return Probe(status, "", cache)
