"""One pooled HTTP client per upstream, with transport errors translated at the boundary.

Built on aiohttp's client rather than httpx: a passthrough over httpx (with its own transport or
httpx-aiohttp's) fell well short of the gateway's target throughput, and aiohttp directly met
it. The seam stays injectable: tests may pass their own connector.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp

from gateway.config import BackendConfig
from gateway.errors import UpstreamProtocolError, UpstreamTimeout, UpstreamUnavailable
from gateway.tracing import NO_TRACING, Tracing


class UpstreamResponse:
    """An upstream response whose status and headers are known; the body is read on demand.

    Whoever opened it closes it (`aclose`), also when the client went away mid-stream.
    """

    __slots__ = ("_resp", "_backend", "status", "headers")

    def __init__(self, resp: aiohttp.ClientResponse, backend: str) -> None:
        self._resp = resp
        self._backend = backend
        self.status = resp.status
        self.headers = resp.headers

    @property
    def content_type(self) -> str:
        return self._resp.content_type

    async def read(self) -> bytes:
        try:
            return await self._resp.read()
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"The upstream '{self._backend}' timed out while sending its answer.",
                backend=self._backend,
            ) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamProtocolError(
                f"The upstream '{self._backend}' broke off its answer ({type(exc).__name__}).",
                backend=self._backend,
            ) from exc
        finally:
            self._resp.release()

    async def iter_bytes(self) -> AsyncIterator[bytes]:
        try:
            async for data in self._resp.content.iter_any():
                yield data
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"The upstream '{self._backend}' stopped sending data (read timeout).",
                backend=self._backend,
            ) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamProtocolError(
                f"The upstream '{self._backend}' broke off the stream ({type(exc).__name__}).",
                backend=self._backend,
            ) from exc

    async def aclose(self) -> None:
        # close() (not release()) drops a connection whose body was not read to its end,
        # which cancels the upstream request promptly.
        if not self._resp.closed:
            self._resp.close()


class UpstreamClient:
    def __init__(
        self,
        name: str,
        config: BackendConfig,
        *,
        connector: aiohttp.BaseConnector | None = None,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self.name = name
        self._tracing = tracing  # adds the current attempt's traceparent to each request
        self.base_url = config.base_url
        timeouts = config.timeouts
        # Streams are bounded by the silence between reads, not by a total: a long answer
        # that keeps flowing is fine. Whole (non-streamed) answers also get the total.
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=timeouts.connect, sock_read=timeouts.read
        )
        self.whole_timeout = aiohttp.ClientTimeout(
            total=timeouts.total, sock_connect=timeouts.connect, sock_read=timeouts.read
        )
        self._connector = connector
        self._limit = config.max_connections
        self._session: aiohttp.ClientSession | None = None

    def _open_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = self._connector or aiohttp.TCPConnector(
                limit=self._limit, ttl_dns_cache=300, enable_cleanup_closed=True
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                auto_decompress=True,
                cookie_jar=aiohttp.DummyCookieJar(),  # upstream cookies are never kept
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    async def post(
        self, path: str, data: bytes, headers: Mapping[str, str], **kw: Any
    ) -> UpstreamResponse:
        session = self._open_session()
        url = self.base_url + path
        sent = dict(headers)
        self._tracing.inject(sent)
        try:
            resp = await session.post(url, data=data, headers=sent, **kw)
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"The upstream '{self.name}' did not answer in time.", backend=self.name
            ) from exc
        except aiohttp.ClientConnectionError as exc:
            raise UpstreamUnavailable(
                f"The upstream '{self.name}' could not be reached ({type(exc).__name__}).",
                backend=self.name,
            ) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamProtocolError(
                f"The upstream '{self.name}' answered with something unreadable "
                f"({type(exc).__name__}).",
                backend=self.name,
            ) from exc
        return UpstreamResponse(resp, self.name)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
