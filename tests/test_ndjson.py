"""The ndjson line decoder, fed plain lists of reads split at awkward places."""

from __future__ import annotations

import orjson
from hypothesis import given
from hypothesis import strategies as st

from gateway.ndjson import NdjsonDecoder, iter_lines


def decode(reads: list[bytes]) -> list[bytes]:
    decoder = NdjsonDecoder()
    out: list[bytes] = []
    for data in reads:
        out += decoder.feed(data)
    return out + decoder.flush()


def test_many_lines_in_one_read() -> None:
    assert decode([b'{"a":1}\n{"b":2}\n{"c":3}\n']) == [b'{"a":1}', b'{"b":2}', b'{"c":3}']


def test_line_split_across_reads() -> None:
    assert decode([b'{"a"', b":1", b'}\n{"b":', b"2}\n"]) == [b'{"a":1}', b'{"b":2}']


def test_feed_returns_nothing_until_the_newline() -> None:
    decoder = NdjsonDecoder()
    assert decoder.feed(b'{"a":') == []
    assert decoder.pending == 5
    assert decoder.feed(b"1}") == []
    assert decoder.feed(b"\n") == [b'{"a":1}']
    assert decoder.pending == 0
    assert decoder.flush() == []


def test_multibyte_utf8_split_across_reads() -> None:
    line = '{"text":"café — 日本語 🎉"}'.encode()
    for cut in range(1, len(line)):
        lines = decode([line[:cut], line[cut:] + b"\n"])
        assert lines == [line]
        assert orjson.loads(lines[0])["text"] == "café — 日本語 🎉"


def test_blank_lines_are_skipped() -> None:
    assert decode([b"\n\n{}\n \n\t\n\r\n{}\n\n"]) == [b"{}", b"{}"]


def test_crlf_line_endings() -> None:
    assert decode([b'{"a":1}\r\n{"b":2}\r', b"\n"]) == [b'{"a":1}', b'{"b":2}']


def test_missing_trailing_newline_comes_out_of_flush() -> None:
    decoder = NdjsonDecoder()
    assert decoder.feed(b'{"a":1}\n{"b":2}') == [b'{"a":1}']
    assert decoder.flush() == [b'{"b":2}']
    assert decoder.flush() == []


def test_no_line_length_cap() -> None:
    big = b'{"text":"' + b"x" * (3 << 20) + b'"}'
    reads = [big[i:i + 65536] for i in range(0, len(big), 65536)] + [b"\n"]
    assert decode(reads) == [big]


def test_empty_reads_are_harmless() -> None:
    assert decode([b"", b"{}", b"", b"\n", b""]) == [b"{}"]


@given(st.lists(st.binary(max_size=40).filter(lambda b: b"\n" not in b and b.strip() == b),
                max_size=8),
       st.data())
def test_any_split_gives_the_same_lines(lines: list[bytes], data: st.DataObject) -> None:
    lines = [line for line in lines if line]
    body = b"".join(line + b"\n" for line in lines)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=10)))
    reads = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    assert decode(reads) == lines


async def test_iter_lines_adapts_an_async_iterator() -> None:
    async def reads():  # type: ignore[no-untyped-def]
        for data in (b'{"a":', b'1}\n{"b"', b":2}"):
            yield data

    assert [line async for line in iter_lines(reads())] == [b'{"a":1}', b'{"b":2}']
