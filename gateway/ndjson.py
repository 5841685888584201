"""A small stateful decoder of newline-delimited JSON bodies: network reads in, whole lines out.

Lines are split on ``b"\\n"`` bytes only, so a multi-byte UTF-8 character cut between two reads
is reassembled before anyone decodes it; callers get each line as ``bytes`` (``orjson.loads``
takes them as they are). There is no line-length cap: a Nuclia ``retrieval`` line carries whole
find results and can be megabytes long. A trailing ``\\r`` (CRLF bodies) is dropped, blank
lines are skipped, and `flush` returns a last line that had no trailing newline.

    decoder = NdjsonDecoder()
    for data in reads:
        for line in decoder.feed(data):
            ...
    for line in decoder.flush():
        ...
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator

__all__ = ["NdjsonDecoder", "iter_lines"]


class NdjsonDecoder:
    """Buffers the incomplete tail of the body between reads; yields complete, non-blank lines."""

    __slots__ = ("_tail",)

    def __init__(self) -> None:
        self._tail = bytearray()

    @property
    def pending(self) -> int:
        """Bytes of an incomplete line held back (0 once the body ended on a newline)."""
        return len(self._tail)

    def feed(self, data: bytes) -> list[bytes]:
        """The lines completed by this read (possibly none, possibly many)."""
        if b"\n" not in data:
            self._tail += data
            return []
        parts = data.split(b"\n")
        if self._tail:
            self._tail += parts[0]
            parts[0] = bytes(self._tail)
            self._tail.clear()
        self._tail += parts.pop()  # after the last newline: the start of the next line
        return [line for line in map(_clean, parts) if line]

    def flush(self) -> list[bytes]:
        """At the end of the body: the last line if it had no trailing newline."""
        if not self._tail:
            return []
        line = _clean(bytes(self._tail))
        self._tail.clear()
        return [line] if line else []


def _clean(line: bytes) -> bytes:
    """Drop a CR of a CRLF ending; a line of only whitespace counts as blank (``b""``)."""
    if line.endswith(b"\r"):
        line = line[:-1]
    if line[:1].isspace() or line[-1:].isspace():
        line = line.strip()
    return line


async def iter_lines(reads: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """Adapt an async iterator of network reads to an async iterator of ndjson lines."""
    decoder = NdjsonDecoder()
    async for data in reads:
        for line in decoder.feed(data):
            yield line
    for line in decoder.flush():
        yield line
