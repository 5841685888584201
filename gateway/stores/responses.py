"""Stored Responses API responses (``store: true``), for ``GET``/``DELETE /v1/responses/{id}``
and for continuing a conversation with ``previous_response_id``.

An entry is the response object and the conversation that led to it, as chat messages, kept
for a TTL under its team: another team's lookups find nothing. In process for one replica
(bounded, oldest dropped first); on Redis (``SET PX``) every replica sees it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
import redis.exceptions

from gateway.stores.redis_base import RedisNamespace, unavailable


@dataclass(frozen=True, slots=True)
class StoredResponse:
    id: str
    team: str
    response: dict[str, Any]  # the response object, as `GET /v1/responses/{id}` returns it
    # the chat messages of the conversation, this response's answer included (instructions
    # left out: a continuation gives its own)
    conversation: list[dict[str, Any]]

    def encode(self) -> bytes:
        return orjson.dumps({"id": self.id, "team": self.team, "response": self.response,
                             "conversation": self.conversation})

    @classmethod
    def decode(cls, raw: bytes | str) -> StoredResponse:
        data = orjson.loads(raw)
        return cls(data["id"], data["team"], data["response"], data["conversation"])


class ResponseStore(Protocol):
    async def put(self, stored: StoredResponse) -> None:
        """Keep `stored` for the store's TTL."""
        ...

    async def get(self, team: str, response_id: str) -> StoredResponse | None:
        """The team's response, or None (unknown, expired, deleted or another team's)."""
        ...

    async def delete(self, team: str, response_id: str) -> bool:
        """Forget the team's response; False when there was none."""
        ...


class MemoryResponseStore:
    def __init__(self, ttl: float, max_entries: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.clock = clock
        self._entries: OrderedDict[tuple[str, str], tuple[float, StoredResponse]] = \
            OrderedDict()

    async def put(self, stored: StoredResponse) -> None:
        key = (stored.team, stored.id)
        self._entries[key] = (self.clock() + self.ttl, stored)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def get(self, team: str, response_id: str) -> StoredResponse | None:
        found = self._entries.get((team, response_id))
        if found is None:
            return None
        expires, stored = found
        if expires <= self.clock():
            del self._entries[(team, response_id)]
            return None
        return stored

    async def delete(self, team: str, response_id: str) -> bool:
        found = await self.get(team, response_id)
        if found is None:
            return False
        del self._entries[(team, response_id)]
        return True


class RedisResponseStore:
    """``{prefix}:{<response id>}:response:<team>``: the team is part of the key, so that
    another team's lookup is an ordinary miss."""

    def __init__(self, ns: RedisNamespace, ttl: float) -> None:
        self.ns = ns
        self.ttl_ms = max(1, int(ttl * 1000))

    def _key(self, team: str, response_id: str) -> str:
        return self.ns.key(response_id, "response", team)

    async def put(self, stored: StoredResponse) -> None:
        try:
            await self.ns.client.set(self._key(stored.team, stored.id), stored.encode(),
                                     px=self.ttl_ms)
        except (redis.exceptions.RedisError, OSError) as exc:
            raise unavailable(exc) from exc

    async def get(self, team: str, response_id: str) -> StoredResponse | None:
        try:
            raw = await self.ns.client.get(self._key(team, response_id))
        except (redis.exceptions.RedisError, OSError) as exc:
            raise unavailable(exc) from exc
        return None if raw is None else StoredResponse.decode(raw)

    async def delete(self, team: str, response_id: str) -> bool:
        try:
            removed = await self.ns.client.delete(self._key(team, response_id))
        except (redis.exceptions.RedisError, OSError) as exc:
            raise unavailable(exc) from exc
        return bool(removed)
