"""The Redis connection seam: namespaced keys with cluster hash tags, and packaged Lua scripts.

Every key is ``{prefix}:{<tag>}:...`` so all keys one script touches share a hash tag and
therefore one Redis Cluster slot.
"""

from __future__ import annotations

from importlib import resources

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from gateway.errors import ServiceUnavailable


class RedisNamespace:
    def __init__(self, client: aioredis.Redis, prefix: str = "gw") -> None:
        self.client = client
        self.prefix = prefix
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


def connect(url: str, prefix: str = "gw", *, max_connections: int = 64) -> RedisNamespace:
    client = aioredis.Redis.from_url(
        url,
        max_connections=max_connections,
        socket_connect_timeout=1.0,
        socket_timeout=2.0,
        health_check_interval=10,
        retry_on_timeout=False,
    )
    return RedisNamespace(client, prefix)


def unavailable(exc: BaseException) -> ServiceUnavailable:
    """Translate a redis error at the boundary (never with the URL: it may hold a password)."""
    return ServiceUnavailable(
        f"The gateway's shared store is unreachable ({type(exc).__name__}).",
        code="store_unavailable",
    )
