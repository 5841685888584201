"""The in-process outbox: per-sink queues in memory, made durable by an append-only spool file.

File format (``<spool_dir>/outbox-<n>.log``): one JSON object per line, applied in order on
open to rebuild the queues:

    {"op":"put","id":7,"key":"<idempotency key>","at":1763860000.5,"sinks":["a","b"],
     "data":{<the record>}}            (one line; "at": when it was put)
    {"op":"ack","id":7,"sink":"a"}
    {"op":"fail","id":7,"sink":"b","attempts":3,"first":1763860000.5}
    {"op":"dead","id":7,"sink":"b","reason":"...","time":1763863600.0}
    {"op":"replay","id":7,"sink":"b"}

A record's JSON is written into its put line as it is, not re-encoded as an escaped string
(which cost a decode and an escaping pass per record); data that is not a JSON object, and the
lines of older files, hold it as a string. A record is gone once every sink acked it. When the
file has grown past ``compact_bytes`` and most of its records are gone it is rewritten (temp
file + rename) with only the live ones.
A torn last line (a crash mid-write) is ignored. Each process takes the first file it can
lock (``flock``), so several workers never share a file and a restarted one adopts the
records its predecessor left. Appends are buffered; `flush()` (and `close()`) write them with
one ``write()``: on the event loop for up to ``INLINE_LINES`` lines (a page-cache append, no
fsync), in a thread for more, as are reads of spilled records and compaction. Record data
beyond ``max_resident`` records is dropped from memory and read back from the file when
claimed.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from gateway.stores.outbox import DeadLetter, OutboxItem, ids_by_sink

# Batches up to this many lines are appended on the event loop (one write() into the page
# cache, no fsync: tens of µs); larger ones, reads and compaction go to a thread.
INLINE_LINES = 256
_LINE = orjson.OPT_APPEND_NEWLINE
_PUT = b'{"op":"put","id":%d,"key":%b,"at":%b,"sinks":%b,"data":%b}\n'
_ACK = b'{"op":"ack","id":%d,"sink":%b}\n'


def _put_line(rid: int, key: str, at: bytes, sinks: bytes, data: bytes) -> bytes:
    """`at`: when it was put (unix time) and `sinks`, as JSON. The record's JSON goes in as
    it is, not re-encoded as an escaped string."""
    value = data if data[:1] == b"{" else orjson.dumps(data.decode())
    return _PUT % (rid, orjson.dumps(key), at, sinks, value)


def _put_data(value: Any) -> bytes:
    """A put line's record, as the bytes that were put (a string: an older file's line).
    Sliced, because orjson's output keeps its whole working buffer and records loaded at
    start stay resident."""
    if isinstance(value, str):
        return value.encode()
    return orjson.dumps(value, option=_LINE)[:-1]


@dataclass(slots=True)
class _Entry:
    id: int
    key: str
    data: bytes | None
    offset: int = -1  # of its put line in the file (-1: not written yet)
    length: int = 0
    live: set[str] = field(default_factory=set)  # sinks still owed (pending, claimed, dead)
    at: float | None = None  # when it was put (unix time; None in older files)


@dataclass
class _Dead:
    reason: str
    time: float
    attempts: int


def _lock_first_free(directory: Path) -> tuple[Path, int]:
    directory.mkdir(parents=True, exist_ok=True)
    n = 0
    while True:
        path = directory / f"outbox-{n}.log"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            n += 1
            continue
        return path, fd


def spool_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("outbox-*.log"))


class SpoolOutbox:
    def __init__(self, directory: Path, sinks: list[str], *, max_resident: int = 10_000,
                 compact_bytes: int = 4 * 1024 * 1024, path: Path | None = None,
                 readonly: bool = False) -> None:
        self.sinks = tuple(sinks)
        self._sink_json = {sink: orjson.dumps(sink) for sink in sinks}
        self._sinks_json = orjson.dumps(self.sinks)  # every put line's "sinks"
        self.max_resident = max_resident
        self.compact_bytes = compact_bytes
        self.readonly = readonly
        if path is None:
            self.path, self._fd = _lock_first_free(directory)
        elif readonly:  # inspect a file a running gateway may hold (the CLI)
            self.path = path
            self._fd = os.open(path, os.O_RDONLY)
        else:  # a given file (the CLI): BlockingIOError when a running gateway holds it
            self.path = path
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self._fd)
                raise
        self._entries: dict[int, _Entry] = {}
        self._pending: dict[str, OrderedDict[int, None]] = {s: OrderedDict() for s in sinks}
        self._claimed: dict[str, set[int]] = {s: set() for s in sinks}
        # the pending records not claimed, in order: a claim takes from the front instead of
        # stepping over the claimed ones at the head of `_pending` on every call
        self._unclaimed: dict[str, OrderedDict[int, None]] = {s: OrderedDict() for s in sinks}
        self._failures: dict[tuple[str, int], tuple[int, float]] = {}
        self._dead: dict[tuple[str, int], _Dead] = {}
        self._next_id = 1
        self._resident = 0
        self._buffer: list[tuple[bytes, _Entry | None]] = []
        self._size = 0
        self._lines = 0
        self._io = asyncio.Lock()
        self._load()

    # -- the file ----------------------------------------------------------------------------

    def _load(self) -> None:
        raw = os.pread(self._fd, os.fstat(self._fd).st_size, 0)
        offset = 0
        for line in raw.split(b"\n"):
            start, offset = offset, offset + len(line) + 1
            if not line:
                continue
            try:
                op = orjson.loads(line)
                self._apply(op, start, len(line))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
        self._size = len(raw)
        self._lines = raw.count(b"\n")
        # a torn last line: start the next one cleanly
        if raw and not raw.endswith(b"\n") and not self.readonly:
            os.write(self._fd, b"\n")
            self._size += 1

    def _apply(self, op: dict[str, Any], offset: int, length: int) -> None:
        kind, rid = op["op"], int(op["id"])
        if kind == "put":
            sinks = [s for s in op["sinks"] if s in self._pending]
            data = _put_data(op["data"])
            resident = self._resident < self.max_resident
            entry = _Entry(rid, op["key"], data if resident else None, offset, length,
                           set(sinks), op.get("at"))
            self._resident += resident
            if sinks:
                self._entries[rid] = entry
                for sink in sinks:
                    self._pending[sink][rid] = None
                    self._unclaimed[sink][rid] = None
            else:
                self._resident -= resident
            self._next_id = max(self._next_id, rid + 1)
            return
        sink = op["sink"]
        if rid not in self._entries or sink not in self._pending:
            return
        if kind == "ack":
            self._pending[sink].pop(rid, None)
            self._unclaimed[sink].pop(rid, None)
            self._forget(sink, (rid,))
        elif kind == "fail":
            self._failures[(sink, rid)] = (int(op["attempts"]), float(op["first"]))
        elif kind == "dead":
            self._pending[sink].pop(rid, None)
            self._unclaimed[sink].pop(rid, None)
            self._dead[(sink, rid)] = _Dead(op["reason"], float(op["time"]),
                                            self._failures.pop((sink, rid), (0, 0.0))[0])
        elif kind == "replay":
            if self._dead.pop((sink, rid), None) is not None:
                self._pending[sink][rid] = None
                self._unclaimed[sink][rid] = None

    def _forget(self, sink: str, rids: Iterable[int]) -> None:
        """`sink` is done with these records: each is gone once no sink owes it anything."""
        entries, failures = self._entries, self._failures
        for rid in rids:
            if failures:
                failures.pop((sink, rid), None)
            entry = entries.get(rid)
            if entry is None:
                continue
            entry.live.discard(sink)
            if not entry.live:
                del entries[rid]
                if entry.data is not None:
                    self._resident -= 1

    def _log(self, op: dict[str, Any], entry: _Entry | None = None) -> None:
        self._buffer.append((orjson.dumps(op, option=_LINE), entry))

    def _write(self, batch: list[tuple[bytes, _Entry | None]]) -> None:
        """(thread) Append a batch with one write, then note where each put landed."""
        payload = b"".join(line for line, _ in batch)
        os.write(self._fd, payload)
        offset = self._size
        for line, entry in batch:
            if entry is not None:
                entry.offset, entry.length = offset, len(line) - 1
            offset += len(line)
        self._size = offset
        self._lines += len(batch)

    async def flush(self) -> None:
        """Write buffered operations to the file (see the module docstring)."""
        if self.readonly:
            return
        async with self._io:
            if self._buffer:
                batch, self._buffer = self._buffer, []
                if len(batch) <= INLINE_LINES:
                    self._write(batch)
                else:
                    await asyncio.to_thread(self._write, batch)
            self._spill()
            if self._size > self.compact_bytes and len(self._entries) * 4 < self._lines:
                snap = self._snapshot()
                live = [sorted(entry.live) for entry, _ in snap]
                await asyncio.to_thread(self._compact, snap, live)

    def _spill(self) -> None:
        if self._resident <= self.max_resident:
            return
        for entry in reversed(self._entries.values()):
            if self._resident <= self.max_resident:
                break
            if entry.data is not None and entry.offset >= 0:
                entry.data = None
                self._resident -= 1

    def _read_data(self, entry: _Entry) -> bytes:
        line = os.pread(self._fd, entry.length, entry.offset)
        return _put_data(orjson.loads(line)["data"])

    def _snapshot(self) -> list[tuple[_Entry, list[bytes]]]:
        """(event loop) The live records already in the file, with their fail/dead lines."""
        snap = []
        for entry in self._entries.values():
            if entry.offset < 0:
                continue  # its put line is still in the buffer: it is written after
            extra = []
            for sink in sorted(entry.live):
                fail = self._failures.get((sink, entry.id))
                if fail:
                    extra.append(orjson.dumps({"op": "fail", "id": entry.id, "sink": sink,
                                               "attempts": fail[0], "first": fail[1]},
                                              option=_LINE))
                dead = self._dead.get((sink, entry.id))
                if dead:
                    extra.append(orjson.dumps({"op": "dead", "id": entry.id, "sink": sink,
                                               "reason": dead.reason, "time": dead.time},
                                              option=_LINE))
            snap.append((entry, extra))
        return snap

    def _compact(self, snap: list[tuple[_Entry, list[bytes]]], sinks: list[list[str]]) -> None:
        """(thread, under the io lock) Rewrite the file with only the live records."""
        tmp = self.path.with_suffix(".tmp")
        lines: list[tuple[bytes, _Entry | None]] = []
        for (entry, extra), live in zip(snap, sinks, strict=True):
            data = entry.data if entry.data is not None else self._read_data(entry)
            lines.append((_put_line(entry.id, entry.key, orjson.dumps(entry.at),
                                    orjson.dumps(live), data), entry))
            lines.extend((line, None) for line in extra)
        with open(tmp, "wb") as out:
            out.write(b"".join(line for line, _ in lines))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(self._fd)
        self._fd, self._size, self._lines = fd, 0, 0
        self._write(lines)

    # -- the Outbox protocol -----------------------------------------------------------------

    async def start(self) -> None:
        return None

    async def put(self, entries: list[tuple[bytes, str]],
                  sinks: Sequence[str] | None = None) -> None:
        self._put(entries, self.sinks if sinks is None else tuple(sinks))
        await self.flush()

    def _put(self, entries: list[tuple[bytes, str]], targets: tuple[str, ...]) -> None:
        """Queue records in memory and buffer their put lines; `flush()` makes them durable."""
        if not targets:
            return
        sinks = self._sinks_json if targets == self.sinks else orjson.dumps(targets)
        at = time.time()
        at_json = orjson.dumps(at)
        for data, key in entries:  # `data` is held as it is: the mirror's is right-sized
            rid, self._next_id = self._next_id, self._next_id + 1
            entry = _Entry(rid, key, data, -1, 0, set(targets), at)
            self._entries[rid] = entry
            self._resident += 1
            for sink in targets:
                self._pending[sink][rid] = None
                self._unclaimed[sink][rid] = None
            self._buffer.append((_put_line(rid, key, at_json, sinks, data), entry))

    async def claim(self, sink: str, n: int, consumer: str,
                    block_ms: int | None = None) -> list[OutboxItem]:
        unclaimed, claimed = self._unclaimed[sink], self._claimed[sink]
        entries, failures = self._entries, self._failures
        items: list[OutboxItem] = []
        while unclaimed and len(items) < n:
            rid, _ = unclaimed.popitem(False)
            entry = entries[rid]
            data = entry.data
            if data is None:
                try:
                    async with self._io:
                        data = await asyncio.to_thread(self._read_data, entry)
                except BaseException:
                    unclaimed[rid] = None  # still first in line
                    unclaimed.move_to_end(rid, False)
                    raise
            attempts, first = failures.get((sink, rid), (0, None)) if failures else (0, None)
            items.append(OutboxItem(str(rid), sink, entry.key, data, attempts, first))
            claimed.add(rid)
        return items

    async def ack(self, items: list[OutboxItem]) -> None:
        for sink, ids in ids_by_sink(items).items():
            rids = [int(rid) for rid in ids]
            claimed, pending, name = self._claimed[sink], self._pending[sink], self._sink_json[sink]
            acked = [rid for rid in rids if pending.pop(rid, 1) is None]
            claimed.difference_update(rids)
            # pending is claimed + unclaimed, unless some of these were acked unclaimed
            if len(claimed) + len(self._unclaimed[sink]) != len(pending):
                for rid in acked:
                    self._unclaimed[sink].pop(rid, None)
            self._forget(sink, acked)
            self._buffer.extend([(_ACK % (rid, name), None) for rid in acked])

    async def nack(self, item: OutboxItem, now: float | None = None) -> OutboxItem:
        first = item.first_failure or (time.time() if now is None else now)
        failed = OutboxItem(item.id, item.sink, item.key, item.data, item.attempts + 1, first)
        self._failures[(item.sink, int(item.id))] = (failed.attempts, first)
        self._log({"op": "fail", "id": int(item.id), "sink": item.sink,
                   "attempts": failed.attempts, "first": first})
        return failed

    async def touch(self, items: list[OutboxItem], consumer: str) -> None:
        return None

    async def release(self, items: list[OutboxItem], consumer: str) -> None:
        for item in items:
            self._claimed[item.sink].discard(int(item.id))
        for sink in {item.sink for item in items}:  # back in line, in their order
            claimed = self._claimed[sink]
            self._unclaimed[sink] = OrderedDict(
                (rid, None) for rid in self._pending[sink] if rid not in claimed)

    async def dead_letter(self, item: OutboxItem, reason: str) -> None:
        rid = int(item.id)
        self._claimed[item.sink].discard(rid)
        self._unclaimed[item.sink].pop(rid, None)
        if self._pending[item.sink].pop(rid, 1) is None:
            self._failures.pop((item.sink, rid), None)
            self._dead[(item.sink, rid)] = _Dead(reason, time.time(), item.attempts)
            self._log({"op": "dead", "id": rid, "sink": item.sink, "reason": reason,
                       "time": time.time()})
        await self.flush()

    async def list_dead(self) -> list[DeadLetter]:
        found = []
        for (sink, rid), dead in sorted(self._dead.items(), key=lambda kv: kv[0][1]):
            entry = self._entries[rid]
            data = entry.data
            if data is None:
                async with self._io:
                    data = await asyncio.to_thread(self._read_data, entry)
            found.append(DeadLetter(f"{sink}:{rid}", sink, entry.key, data, dead.reason,
                                    dead.time, dead.attempts))
        return found

    async def replay_dead(self, ids: list[str] | None = None) -> int:
        count = 0
        for sink, rid in sorted(self._dead, key=lambda k: k[1]):
            if ids is not None and f"{sink}:{rid}" not in ids:
                continue
            del self._dead[(sink, rid)]
            self._pending[sink][rid] = None
            self._unclaimed[sink][rid] = None
            self._log({"op": "replay", "id": rid, "sink": sink})
            count += 1
        await self.flush()
        return count

    async def depth(self) -> dict[str, int]:
        return {sink: len(self._pending[sink]) for sink in self.sinks}

    async def oldest_pending(self) -> dict[str, float | None]:
        entries = self._entries
        return {sink: min((at for rid in self._pending[sink]
                           if (at := entries[rid].at) is not None), default=None)
                for sink in self.sinks}

    async def close(self) -> None:
        await self.flush()
        if self._fd >= 0:
            os.close(self._fd)  # also drops the lock
            self._fd = -1
