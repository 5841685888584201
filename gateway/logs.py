"""structlog, configured once at start-up: JSON lines (or console), request ids from contextvars."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from contextvars import ContextVar
from typing import Any

import orjson
import structlog

# The current request's id: set once per request by the HTTP middleware (one ContextVar.set is
# cheaper than structlog's bind_contextvars on the hot path), added to every event below.
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)


def add_request_id(
    logger: Any, method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    request_id = REQUEST_ID.get()
    if request_id is not None:
        event.setdefault("request_id", request_id)
    return event


def configure_logging(level: str = "info", *, json: bool = True) -> None:
    """structlog's events and the standard library's records (uvicorn's among them) as one
    stream on stdout, in one format: a JSON object per line (or a console line)."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer(serializer=orjson.dumps)
        if json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        add_request_id,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.BytesLoggerFactory() if json else structlog.PrintLoggerFactory(),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info,
                    _text_renderer(renderer) if json else renderer]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)


def _text_renderer(renderer: structlog.typing.Processor) -> structlog.typing.Processor:
    """The JSON renderer's bytes as text, which a logging handler writes."""
    def render(logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
        out = renderer(logger, method, event)
        return out.decode() if isinstance(out, bytes) else str(out)
    return render
