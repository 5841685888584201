"""Server-sent events: a small stateful decoder for upstream streams.

`SSEDecoder.feed(bytes)` returns the events completed by those bytes; reads may split lines,
events and UTF-8 sequences anywhere. Lines end in LF, CRLF or CR; ``:`` lines are comments;
several ``data:`` lines join with LF (the WHATWG event-stream rules).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SSEEvent:
    data: str
    event: str = "message"
    id: str | None = None


class SSEDecoder:
    __slots__ = ("_buffer", "_data", "_event", "_id", "_pending_cr")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None
        self._pending_cr = False

    def feed(self, data: bytes) -> list[SSEEvent]:
        if not data:
            return []
        if self._pending_cr and data[:1] == b"\n":
            data = data[1:]  # the LF of a CRLF split across two reads
        self._pending_cr = data.endswith(b"\r")
        text = bytes(self._buffer) + data if self._buffer else data
        if b"\r" in text:
            text = text.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = text.split(b"\n")
        tail = lines.pop()
        self._buffer = bytearray(tail)
        events: list[SSEEvent] = []
        for line in lines:
            if line[:6] == b"data: ":  # the common case, without a call
                self._data.append(line[6:].decode("utf-8", errors="replace"))
                continue
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def flush(self) -> list[SSEEvent]:
        """End of body: a last event without its blank line still counts."""
        events: list[SSEEvent] = []
        if self._buffer:
            line, self._buffer = bytes(self._buffer), bytearray()
            event = self._line(line)
            if event is not None:
                events.append(event)
        event = self._line(b"")
        if event is not None:
            events.append(event)
        return events

    def _line(self, raw: bytes) -> SSEEvent | None:
        if not raw:
            if not self._data:
                self._event = ""
                return None
            event = SSEEvent("\n".join(self._data), self._event or "message", self._id)
            self._data = []
            self._event = ""
            return event
        if raw[:1] == b":":
            return None
        line = raw.decode("utf-8", errors="replace")
        field, sep, value = line.partition(":")
        if sep and value[:1] == " ":
            value = value[1:]
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        elif field == "id" and "\0" not in value:
            self._id = value
        return None
