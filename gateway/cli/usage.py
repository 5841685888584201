"""``gateway usage`` (per-team usage report) and ``gateway outbox`` (analytics outbox: depth,
dead letters, replay).

Both act on Redis when the config's ``store`` is a Redis URL, else on the local files: the
usage file ``usage.jsonl`` beside ``analytics.outbox.spool_dir`` and the spool files in it.
A spool file held by a running gateway can be read (depth, list-dead) but not replayed:
stop that gateway first (on Redis, replay works live).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import sys
from datetime import UTC, date, datetime
from typing import Any

import orjson

from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.errors import GatewayError
from gateway.stores.outbox import DeadLetter, make_outbox
from gateway.stores.redis_base import RedisNamespace
from gateway.stores.spool import SpoolOutbox, spool_files
from gateway.stores.usage import COUNTERS, UsageStore, make_usage_store

COLUMNS = ("day", "team", "key_id", "model", *COUNTERS, "total_tokens")


async def usage_report(store: UsageStore, team: str | None, since: date,
                       until: date) -> list[dict[str, Any]]:
    """Usage rows as JSON-ready dicts (the admin API serves the same), sorted by day, team."""
    rows = await store.query(team, since, until)
    return [{"day": r.day.isoformat(), "team": r.team, "key_id": r.key_id, "model": r.model,
             **r.counts(), "total_tokens": r.prompt_tokens + r.completion_tokens}
            for r in rows]


def default_range(today: date | None = None) -> tuple[date, date]:
    """From the first day of the current (UTC) month to today."""
    day = today or datetime.now(UTC).date()
    return day.replace(day=1), day


def render(rows: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "json":
        return orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode()
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue().rstrip("\n")
    if not rows:
        return "no usage in this range"
    table = [COLUMNS, *(tuple(str(r[c]) for c in COLUMNS) for r in rows)]
    totals = {c: sum(int(r[c]) for r in rows) for c in (*COUNTERS, "total_tokens")}
    table.append(("total", "", "", "", *(str(totals[c]) for c in (*COUNTERS, "total_tokens"))))
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                     .rstrip() for row in table)


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def _connect(config: GatewayConfig) -> RedisNamespace | None:
    if not config.redis_url:
        return None
    from gateway.stores.redis_base import connect

    return connect(config.redis_url, config.store_prefix)


async def _usage(args: argparse.Namespace, config: GatewayConfig) -> int:
    since, until = default_range()
    since, until = args.since or since, args.until or until
    if since > until:
        print("error: --since is after --until", file=sys.stderr)
        return 2
    ns = _connect(config)
    try:
        rows = await usage_report(make_usage_store(config, ns), args.team, since, until)
    finally:
        if ns is not None:
            await ns.client.aclose()
    print(render(rows, args.format))
    return 0


def _dead_line(prefix: str, dead: DeadLetter) -> str:
    when = datetime.fromtimestamp(dead.time, UTC).strftime("%Y-%m-%d %H:%M:%S")
    try:
        request_id = orjson.loads(dead.data).get("request_id", "?")
    except orjson.JSONDecodeError:
        request_id = "?"
    return (f"{prefix}{dead.id}  sink={dead.sink}  request={request_id}  at={when}  "
            f"attempts={dead.attempts}  reason={dead.reason}")


async def _outbox_redis(args: argparse.Namespace, config: GatewayConfig,
                        ns: RedisNamespace) -> int:
    box = make_outbox(config, ns)
    if args.action == "depth":
        for sink, n in (await box.depth()).items():
            print(f"{sink}  {n}")
    elif args.action == "list-dead":
        for dead in await box.list_dead():
            print(_dead_line("", dead))
    else:
        count = await box.replay_dead(args.ids or None)
        print(f"replayed {count} dead letter(s)")
    return 0


async def _outbox_files(args: argparse.Namespace, config: GatewayConfig) -> int:
    """Spool files: ids are ``<file number>/<sink>:<record>`` (e.g. ``0/inkeep:17``)."""
    sinks = [s.name for s in config.analytics.sinks]
    directory = config.resolve(config.analytics.outbox.spool_dir)
    totals = dict.fromkeys(sinks, 0)
    replayed, busy = 0, []
    for path in spool_files(directory):
        prefix = path.stem.removeprefix("outbox-") + "/"
        if args.action == "replay":
            try:
                box = SpoolOutbox(directory, sinks, path=path)
            except BlockingIOError:
                busy.append(path.name)
                continue
            wanted = None if not args.ids else [i.removeprefix(prefix) for i in args.ids
                                                if i.startswith(prefix)]
            if wanted == []:
                await box.close()
                continue
            replayed += await box.replay_dead(wanted)
        else:
            box = SpoolOutbox(directory, sinks, path=path, readonly=True)
            if args.action == "depth":
                for sink, n in (await box.depth()).items():
                    totals[sink] += n
            else:
                for dead in await box.list_dead():
                    print(_dead_line(prefix, dead))
        await box.close()
    if args.action == "depth":
        for sink, n in totals.items():
            print(f"{sink}  {n}")
    elif args.action == "replay":
        print(f"replayed {replayed} dead letter(s)")
        if busy:
            print(f"error: in use by a running gateway (stop it first): {', '.join(busy)}",
                  file=sys.stderr)
            return 1
    return 0


async def _outbox(args: argparse.Namespace, config: GatewayConfig) -> int:
    ns = _connect(config)
    if ns is None:
        return await _outbox_files(args, config)
    try:
        return await _outbox_redis(args, config, ns)
    finally:
        await ns.client.aclose()


def _runner(action: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        try:
            result: int = asyncio.run(action(args, config))
        except GatewayError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            return 1
        return result

    return run


def register(subparsers: Any) -> None:
    usage = subparsers.add_parser("usage", help="per-team usage (requests, tokens, errors)")
    usage.add_argument("--team")
    usage.add_argument("--since", type=_day, help="first day, YYYY-MM-DD (default: the 1st "
                                                  "of this month, UTC)")
    usage.add_argument("--until", type=_day, help="last day, YYYY-MM-DD (default: today)")
    usage.add_argument("--format", choices=("table", "json", "csv"), default="table")
    usage.add_argument("--config")
    usage.set_defaults(func=_runner(_usage))

    outbox = subparsers.add_parser("outbox", help="analytics outbox: depth, dead letters")
    outbox.add_argument("action", nargs="?", choices=("depth", "list-dead", "replay"),
                        default="depth")
    outbox.add_argument("ids", nargs="*", help="dead letter ids to replay (default: all)")
    outbox.add_argument("--config")
    outbox.set_defaults(func=_runner(_outbox))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


__all__ = ["default_range", "register", "render", "usage_report"]
