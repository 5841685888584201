"""``gateway usage``: per-team usage (requests, tokens, errors) as a table, JSON or CSV.

It reads Redis when the config's ``store`` is a Redis URL, else the usage file
``usage.jsonl`` beside ``analytics.outbox.spool_dir``.
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from typing import Any

import orjson

from gateway.analytics.reports import COLUMNS, default_range, usage_csv, usage_report
from gateway.cli.command import CONFIG_HELP, on_store, table
from gateway.components import make_usage_store
from gateway.config import GatewayConfig
from gateway.stores.redis_base import RedisNamespace
from gateway.stores.usage import COUNTERS

_SUMMED = (*COUNTERS, "total_tokens")


def render(rows: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "json":
        return orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode()
    if fmt == "csv":
        return usage_csv(rows).rstrip("\n")
    if not rows:
        return "no usage in this range"
    totals = {c: sum(int(r[c]) for r in rows) for c in _SUMMED}
    return table([COLUMNS, *(tuple(str(r[c]) for c in COLUMNS) for r in rows),
                  ("total", "", "", "", *(str(totals[c]) for c in _SUMMED))])


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


async def _usage(args: argparse.Namespace, config: GatewayConfig,
                 ns: RedisNamespace | None) -> int:
    since, until = default_range()
    since, until = args.since or since, args.until or until
    if since > until:
        print("error: --since is after --until", file=sys.stderr)
        return 2
    rows = await usage_report(make_usage_store(config, ns), args.team, since, until,
                              args.model)
    print(render(rows, args.format))
    return 0


def register(subparsers: Any) -> None:
    usage = subparsers.add_parser("usage", help="per-team usage (requests, tokens, errors)")
    usage.add_argument("--team")
    usage.add_argument("--model")
    usage.add_argument("--since", type=_day, help="first day, YYYY-MM-DD (default: the 1st "
                                                  "of this month, UTC)")
    usage.add_argument("--until", type=_day, help="last day, YYYY-MM-DD (default: today)")
    usage.add_argument("--format", choices=("table", "json", "csv"), default="table")
    usage.add_argument("--config", help=CONFIG_HELP)
    usage.set_defaults(func=on_store(_usage))
