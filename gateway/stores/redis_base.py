"""The Redis connection seam: namespaced keys with cluster hash tags, packaged Lua scripts,
and the connection pool every store shares.

Every key is ``{prefix}:{<tag>}:...`` so all keys one script touches share a hash tag and
therefore one Redis Cluster slot.

The pool blocks when all its connections are busy (up to the socket timeout) instead of
failing at once: redis-py's default pool raises ``MaxConnectionsError`` the moment a 65th
command is in flight, which under a burst of requests made the limiter fail open. Commands
are packed by hiredis (as redis-py's sync client does; its asyncio client packs in Python,
which was half of the CPU of a 50-command pipeline).
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import hiredis
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript

from gateway.errors import ServiceUnavailable
from gateway.stores.redis_batch import Batcher


class HiredisPacking:
    """Mixin for redis-py's asyncio connections: pack commands with hiredis, in C."""

    def pack_command(self, *args: Any) -> list[bytes]:
        first = args[0]
        if isinstance(first, str):  # "SCRIPT LOAD" and the like go as separate words
            args = (*first.encode().split(), *args[1:])
        elif b" " in first:
            args = (*first.split(), *args[1:])
        return [hiredis.pack_command(args)]


class PackedConnection(HiredisPacking, Connection):
    pass


class PackedSSLConnection(HiredisPacking, SSLConnection):
    pass


class PackedUnixConnection(HiredisPacking, UnixDomainSocketConnection):
    pass


_PACKED: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: PackedConnection,
    SSLConnection: PackedSSLConnection,
    UnixDomainSocketConnection: PackedUnixConnection,
}


class RedisNamespace:
    def __init__(self, client: aioredis.Redis, prefix: str = "gw") -> None:
        self.client = client
        self.prefix = prefix
        self.batch = Batcher(client)
        self._scripts: dict[str, AsyncScript] = {}

    def key(self, tag: str, *parts: str) -> str:
        """``prefix:{tag}:part:part`` — keys with the same tag land in the same cluster slot."""
        return ":".join((self.prefix, "{" + tag + "}", *parts))

    def script(self, name: str) -> AsyncScript:
        """A Lua script from gateway/stores/lua/<name>.lua, registered once (EVALSHA after)."""
        found = self._scripts.get(name)
        if found is None:
            source = resources.files("gateway.stores").joinpath("lua", f"{name}.lua").read_text()
            found = self.client.register_script(source)
            self._scripts[name] = found
        return found


    async def aclose(self) -> None:
        await self.batch.drain()
        await self.client.aclose()


def connect(url: str, prefix: str = "gw", *, max_connections: int = 64,
            timeout: float = 2.0) -> RedisNamespace:
    """A client on a blocking pool of `max_connections`; a command waits at most `timeout`
    for a free connection, then for each reply."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout,
        socket_connect_timeout=1.0,
        socket_timeout=timeout,
        health_check_interval=10,
        # A connection pooled before Redis restarted is dead, and redis-py retries nothing by
        # default: each one failed the request that drew it (a 503 on a key load). One retry
        # on a new connection, for connection errors only: a timeout may mean the command ran,
        # and waiting twice as long helps nobody. (A reply lost after the command ran would
        # reserve twice: limits err on the side of refusing, never of admitting.)
        retry=Retry(NoBackoff(), 1),
        retry_on_error=[redis.exceptions.ConnectionError],
        retry_on_timeout=False,
    )
    pool.connection_class = _PACKED.get(pool.connection_class, pool.connection_class)
    return RedisNamespace(aioredis.Redis.from_pool(pool), prefix)


def unavailable(exc: BaseException) -> ServiceUnavailable:
    """Translate a redis error at the boundary (never with the URL: it may hold a password)."""
    return ServiceUnavailable(
        f"The gateway's shared store is unreachable ({type(exc).__name__}).",
        code="store_unavailable",
    )
