"""Cost of the Nuclia -> OpenAI translation per item, and of whole answers stream vs synchronous.

    .venv/bin/python bench/nuclia_translate.py [--answers N] [--items-per-answer 10]
    .venv/bin/python bench/nuclia_translate.py --complete [--requests N]

The first form feeds N synthetic answers (each: `--items-per-answer` ``answer`` items plus the
``retrieval``, ``status``, ``citations`` and ``metadata`` items of a real answer, in the real
wrapped shape, split into 1 KiB network reads) through `gateway.ndjson` and
`translate_ask_stream`, and prints µs per item and translated answers per second (one core,
no network). The second form fetches one whole answer from the fake Nuclia both ways (streamed
and ``X-Synchronous: true``) and times what `NucliaBackend.complete` does with each body.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator

import orjson

from gateway.backends.nuclia_stream import translate_ask_stream
from gateway.ndjson import iter_lines
from gateway.testing.fake_nuclia import answer_text, encode, find_results, split_answer


def answer_body(items_per_answer: int) -> tuple[bytes, int]:
    """One answer's ndjson body and its number of items."""
    text = answer_text("How does the gateway translate Nuclia answers?")
    results = find_results("q")
    items = [{"type": "answer", "text": piece} for piece in split_answer(text, items_per_answer)]
    items += [
        {"type": "retrieval", "results": results,
         "best_matches": [{"id": p} for p in results["best_matches"]]},
        {"type": "status", "code": "0", "status": "success", "details": None},
        {"type": "citations", "citations": {results["best_matches"][0]: [[0, 10]]}},
        {"type": "metadata", "tokens": {"input": 900, "output": 40, "input_nuclia": None,
                                        "output_nuclia": None},
         "timings": {"generative_first_chunk": 0.3, "generative_total": 1.1}},
    ]
    return b"".join(encode(item) for item in items), len(items)


async def reads_of(body: bytes, size: int = 1024) -> AsyncIterator[bytes]:
    for i in range(0, len(body), size):
        yield body[i:i + size]


async def translate(answers: int, items_per_answer: int) -> None:
    body, items = answer_body(items_per_answer)
    chunks = 0
    started = time.perf_counter()
    for _ in range(answers):
        async for _chunk in translate_ask_stream(iter_lines(reads_of(body)), backend="bench",
                                                 cid="c", model="m", created=0):
            chunks += 1
    elapsed = time.perf_counter() - started
    total_items = answers * items
    print(f"answers={answers} items/answer={items} ({items_per_answer} answer items) "
          f"body={len(body)} B chunks/answer={chunks // answers}")
    print(f"translation: {elapsed / total_items * 1e6:.2f} µs/item, "
          f"{elapsed / answers * 1e6:.1f} µs/answer, {answers / elapsed:,.0f} answers/s")


async def complete(requests: int) -> None:
    """Gateway-side cost of a whole answer: the streamed body vs the X-Synchronous body.

    Both bodies are fetched once from the fake Nuclia and then converted `requests` times, so
    the figure is our CPU per answer (the upstream's own wait is the same either way: both
    forms end when Nuclia has finished the answer).
    """
    import aiohttp

    from gateway.answer import Answer
    from gateway.backends.nuclia_stream import completion_from_sync
    from gateway.ndjson import NdjsonDecoder
    from gateway.testing.fake_nuclia import create_fake_nuclia_app
    from gateway.testing.server import run_server

    query = {"query": "How? [reasoning]", "citations": True}
    async with run_server(create_fake_nuclia_app(kbid="kb")) as url, \
            aiohttp.ClientSession() as session:
        bodies = {}
        for sync in (False, True):
            headers = {"x-synchronous": "true"} if sync else {}
            async with session.post(f"{url}/api/v1/kb/kb/ask", json=query,
                                    headers=headers) as resp:
                bodies[sync] = await resp.read()

    async def from_stream(raw: bytes) -> None:
        answer = Answer()
        decoder = NdjsonDecoder()

        async def lines() -> AsyncIterator[bytes]:
            for line in decoder.feed(raw) + decoder.flush():
                yield line

        async for data in translate_ask_stream(lines(), backend="b", cid="c", model="m",
                                               created=0):
            answer.add_chunk(data)
        answer.to_completion("c", "m", 0)

    for _ in range(2):
        for sync in (False, True):
            started = time.perf_counter()
            for _ in range(requests):
                if sync:
                    completion_from_sync(orjson.loads(bodies[sync]), backend="b", cid="c",
                                         model="m", created=0)
                else:
                    await from_stream(bodies[sync])
            elapsed = time.perf_counter() - started
            mode = "X-Synchronous" if sync else "from stream  "
            print(f"complete() {mode}: body {len(bodies[sync])} B, "
                  f"{elapsed / requests * 1e6:.1f} µs/answer of gateway CPU")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers", type=int, default=5000)
    parser.add_argument("--items-per-answer", type=int, default=10)
    parser.add_argument("--complete", action="store_true")
    parser.add_argument("--requests", type=int, default=5000)
    args = parser.parse_args()
    if args.complete:
        asyncio.run(complete(args.requests))
    else:
        asyncio.run(translate(args.answers, args.items_per_answer))


if __name__ == "__main__":
    main()
