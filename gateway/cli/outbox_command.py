"""``gateway outbox``: the analytics outbox's depth per sink, its dead letters, and replay.

It acts on Redis when the config's ``store`` is a Redis URL (replay works live), else on the
spool files under ``analytics.outbox.spool_dir``: a file held by a running gateway can be read
(depth, list-dead) but not replayed; stop that gateway first. Spool dead-letter ids are
``<file number>/<sink>:<record>`` (e.g. ``0/inkeep:17``).
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from gateway.cli.command import CONFIG_HELP, on_store
from gateway.components import make_outbox
from gateway.config import GatewayConfig
from gateway.stores.outbox import DeadLetter
from gateway.stores.redis_base import RedisNamespace
from gateway.stores.spool import SpoolOutbox, spool_files


def _dead_line(prefix: str, dead: DeadLetter) -> str:
    at = datetime.fromtimestamp(dead.time, UTC).strftime("%Y-%m-%d %H:%M:%S")
    try:
        request_id = orjson.loads(dead.data).get("request_id", "?")
    except orjson.JSONDecodeError:
        request_id = "?"
    return (f"{prefix}{dead.id}  sink={dead.sink}  request={request_id}  at={at}  "
            f"attempts={dead.attempts}  reason={dead.reason}")


def _print_depth(depth: dict[str, int]) -> None:
    for sink, n in depth.items():
        print(f"{sink}  {n}")


async def _on_redis(args: argparse.Namespace, config: GatewayConfig,
                    ns: RedisNamespace) -> int:
    box = make_outbox(config, ns, fallback=False)
    if args.action == "depth":
        _print_depth(await box.depth())
    elif args.action == "list-dead":
        for dead in await box.list_dead():
            print(_dead_line("", dead))
    else:
        print(f"replayed {await box.replay_dead(args.ids or None)} dead letter(s)")
    return 0


def _prefix(path: Path) -> str:
    return path.stem.removeprefix("outbox-") + "/"


async def _read_files(args: argparse.Namespace, directory: Path, sinks: list[str]) -> int:
    """depth (summed over the files) or list-dead; works beside a running gateway."""
    totals = dict.fromkeys(sinks, 0)
    for path in spool_files(directory):
        box = SpoolOutbox(directory, sinks, path=path, readonly=True)
        if args.action == "depth":
            for sink, n in (await box.depth()).items():
                totals[sink] += n
        else:
            for dead in await box.list_dead():
                print(_dead_line(_prefix(path), dead))
        await box.close()
    if args.action == "depth":
        _print_depth(totals)
    return 0


async def _replay_files(args: argparse.Namespace, directory: Path, sinks: list[str]) -> int:
    replayed, busy = 0, []
    for path in spool_files(directory):
        prefix = _prefix(path)
        wanted = None if not args.ids else [i.removeprefix(prefix) for i in args.ids
                                            if i.startswith(prefix)]
        if wanted == []:
            continue
        try:
            box = SpoolOutbox(directory, sinks, path=path)
        except BlockingIOError:
            busy.append(path.name)
            continue
        replayed += await box.replay_dead(wanted)
        await box.close()
    print(f"replayed {replayed} dead letter(s)")
    if busy:
        print(f"error: in use by a running gateway (stop it first): {', '.join(busy)}",
              file=sys.stderr)
        return 1
    return 0


async def _outbox(args: argparse.Namespace, config: GatewayConfig,
                  ns: RedisNamespace | None) -> int:
    if not config.analytics.sinks:
        print("no analytics sinks are configured (analytics.sinks): the outbox is not used")
        return 0
    if ns is not None:
        return await _on_redis(args, config, ns)
    sinks = [s.name for s in config.analytics.sinks]
    directory = config.resolve(config.analytics.outbox.spool_dir)
    if args.action == "replay":
        return await _replay_files(args, directory, sinks)
    return await _read_files(args, directory, sinks)


def register(subparsers: Any) -> None:
    outbox = subparsers.add_parser("outbox", help="analytics outbox: depth, dead letters")
    outbox.add_argument("action", nargs="?", choices=("depth", "list-dead", "replay"),
                        default="depth")
    outbox.add_argument("ids", nargs="*", help="dead letter ids to replay (default: all)")
    outbox.add_argument("--config", help=CONFIG_HELP)
    outbox.set_defaults(func=on_store(_outbox))
