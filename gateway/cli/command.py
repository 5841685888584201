"""What the subcommands share: running an action on the store the config names (Redis or
the local files), and the small text helpers of their output. `gateway.cli.main` turns a
config error into exit code 2 and a store error into 1, each with a one-line message."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from gateway.components import connect_store
from gateway.config import GatewayConfig, load_config
from gateway.stores.redis_base import RedisNamespace

Action = Callable[[argparse.Namespace, GatewayConfig, RedisNamespace | None], Awaitable[int]]
CONFIG_HELP = "YAML file (default: $GATEWAY_CONFIG or config/gateway.yaml)"


def on_store(action: Action) -> Callable[[argparse.Namespace], int]:
    """A subcommand that runs `action` with the config and its store connection (None: the
    in-process files)."""

    async def run(args: argparse.Namespace, config: GatewayConfig) -> int:
        ns = connect_store(config)
        try:
            return await action(args, config, ns)
        finally:
            if ns is not None:
                await ns.aclose()

    def command(args: argparse.Namespace) -> int:
        return asyncio.run(run(args, load_config(args.config)))

    return command


def when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M") if ts else "-"


def table(rows: Sequence[tuple[str, ...]]) -> str:
    """Left-aligned columns, two spaces apart."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def opt(value: Any) -> str:
    return "-" if value is None else str(value)
