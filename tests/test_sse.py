"""The SSE decoder: arbitrary read boundaries, CRLF, comments, multi-line data."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.sse import SSEDecoder, SSEEvent

STREAM = (
    b": keep-alive comment\n"
    b"data: {\"a\": 1}\n\n"
    b"event: update\r\nid: 7\r\ndata: line one\r\ndata: line two\r\n\r\n"
    b"data:no-space\r\r"
    b"data: caf\xc3\xa9 \xe2\x82\xac\n\n"
    b"data: [DONE]\n\n"
)
EXPECTED = [
    SSEEvent('{"a": 1}'),
    SSEEvent("line one\nline two", "update", "7"),
    SSEEvent("no-space", id="7"),
    SSEEvent("café €", id="7"),
    SSEEvent("[DONE]", id="7"),
]


def decode(parts: list[bytes]) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events: list[SSEEvent] = []
    for part in parts:
        events.extend(decoder.feed(part))
    events.extend(decoder.flush())
    return events


def test_whole_stream() -> None:
    assert decode([STREAM]) == EXPECTED


def test_byte_by_byte() -> None:
    assert decode([STREAM[i:i + 1] for i in range(len(STREAM))]) == EXPECTED


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_any_split(cuts: list[int]) -> None:
    points = sorted(set(cuts))
    parts = [STREAM[a:b] for a, b in zip([0, *points], [*points, len(STREAM)], strict=True)]
    assert decode(parts) == EXPECTED


def test_crlf_split_between_reads() -> None:
    assert decode([b"data: x\r", b"\n\r", b"\n"]) == [SSEEvent("x")]


def test_last_event_without_blank_line() -> None:
    assert decode([b"data: tail"]) == [SSEEvent("tail")]


def test_comment_only_and_empty_data_lines() -> None:
    assert decode([b":ping\n\n:ping\n\n"]) == []
    assert decode([b"data\n\n"]) == [SSEEvent("")]
