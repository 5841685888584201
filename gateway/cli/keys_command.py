"""``gateway keys ...`` and ``gateway teams ...``: manage keys and team limits from a shell.

They act on Redis when the config's ``store`` is a Redis URL (every replica sees the change
within a second), else on the key file next to the config (``keys.file``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from gateway.auth import create_key, parse_duration
from gateway.cli.command import CONFIG_HELP, on_store, opt, table, when
from gateway.components import make_key_store
from gateway.config import GatewayConfig
from gateway.stores.keys import KeyRecord, KeyStore, TeamRecord
from gateway.stores.redis_base import RedisNamespace

KeyAction = Callable[[argparse.Namespace, GatewayConfig, KeyStore], Awaitable[int]]


def _run(action: KeyAction) -> Callable[[argparse.Namespace], int]:
    async def on_keys(args: argparse.Namespace, config: GatewayConfig,
                      ns: RedisNamespace | None) -> int:
        return await action(args, config, make_key_store(config, ns))

    return on_store(on_keys)


def _models(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [m.strip() for m in text.split(",") if m.strip()]


async def _create(args: argparse.Namespace, config: GatewayConfig, store: KeyStore) -> int:
    try:
        expires_in = parse_duration(args.expires) if args.expires else None
    except ValueError as exc:
        print(f"error: --expires: {exc}", file=sys.stderr)
        return 2
    issued = await create_key(
        config, store, team=args.team, name=args.name, models=_models(args.models),
        rpm=args.rpm, tpm=args.tpm, max_concurrent=args.max_concurrent, expires_in=expires_in)
    record = issued.record
    print(issued.secret)
    print(f"key id {record.id}, team {record.team}; expires {when(record.expires)}. "
          "The key is shown only this once: store it now.", file=sys.stderr)
    return 0


def _key_row(r: KeyRecord, now: float) -> tuple[str, ...]:
    if r.revoked:
        status = "revoked"
    elif r.expires is not None and r.expires <= now:
        status = "expired"
    else:
        status = "active"
    return (r.id, r.team, r.name or "-", ",".join(r.models) if r.models is not None else "*",
            opt(r.rpm), opt(r.tpm), opt(r.max_concurrent), when(r.created),
            when(r.expires), when(r.last_used), status)


async def _list(args: argparse.Namespace, config: GatewayConfig, store: KeyStore) -> int:
    records = await store.list_keys(args.team)
    now = datetime.now(UTC).timestamp()
    rows: list[tuple[str, ...]] = [("ID", "TEAM", "NAME", "MODELS", "RPM", "TPM", "CONC",
                                    "CREATED", "EXPIRES", "LAST USED", "STATUS")]
    rows += [_key_row(r, now) for r in records]
    static = [s for s in config.keys.static if args.team is None or s.team == args.team]
    rows += [(s.id, s.team, s.name or "-", ",".join(s.models) if s.models else "*",
              opt(s.rpm), opt(s.tpm), opt(s.max_concurrent), "-", "-", "-", "static")
             for s in static]
    print(table(rows))
    return 0


async def _revoke(args: argparse.Namespace, config: GatewayConfig, store: KeyStore) -> int:
    if not await store.revoke_key(args.id):
        print(f"error: there is no key '{args.id}'", file=sys.stderr)
        return 1
    print(f"revoked {args.id}")
    return 0


async def _teams(args: argparse.Namespace, config: GatewayConfig, store: KeyStore) -> int:
    stored = {t.name: t for t in await store.list_teams()}
    rows = [("TEAM", "RPM", "TPM", "DAILY TOKENS", "MONTHLY TOKENS", "MODELS", "SOURCE")]
    for name in sorted(set(stored) | set(config.teams)):
        team = stored.get(name)
        source = "store" if team is not None else "config"
        spec: Any = team if team is not None else config.teams[name]
        models = ",".join(f"{m}(rpm={opt(v.rpm)},tpm={opt(v.tpm)})"
                          for m, v in spec.models.items()) or "-"
        rows.append((name, opt(spec.rpm), opt(spec.tpm), opt(spec.daily_token_budget),
                     opt(spec.monthly_token_budget), models, source))
    print(table(rows))
    return 0


async def _team_set(args: argparse.Namespace, config: GatewayConfig, store: KeyStore) -> int:
    current = await store.get_team(args.team)
    base = current or TeamRecord(args.team)

    def pick(new: int | None, old: int | None) -> int | None:
        return old if new is None else (new or None)  # 0 clears a limit

    record = TeamRecord(
        name=args.team, rpm=pick(args.rpm, base.rpm), tpm=pick(args.tpm, base.tpm),
        daily_token_budget=pick(args.daily_tokens, base.daily_token_budget),
        monthly_token_budget=pick(args.monthly_tokens, base.monthly_token_budget),
        models=base.models,
    )
    await store.put_team(record)
    print(f"team {record.name}: rpm={opt(record.rpm)} tpm={opt(record.tpm)} "
          f"daily_tokens={opt(record.daily_token_budget)} "
          f"monthly_tokens={opt(record.monthly_token_budget)}")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be a positive number (0 clears it)")
    return value


def register(subparsers: Any) -> None:
    """Add ``keys`` and ``teams`` to the ``gateway`` command."""
    keys = subparsers.add_parser("keys", help="create, list and revoke gateway keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)

    create = keys_sub.add_parser("create", help="create a key (printed once)")
    create.add_argument("--team", required=True)
    create.add_argument("--name")
    create.add_argument("--models", help="comma-separated model names (default: all)")
    create.add_argument("--rpm", type=_positive)
    create.add_argument("--tpm", type=_positive)
    create.add_argument("--max-concurrent", type=_positive)
    create.add_argument("--expires", help="lifetime, e.g. 30d, 12h (default: never)")
    create.set_defaults(func=_run(_create))

    listing = keys_sub.add_parser("list", help="list keys")
    listing.add_argument("--team")
    listing.set_defaults(func=_run(_list))

    revoke = keys_sub.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("id")
    revoke.set_defaults(func=_run(_revoke))

    teams = subparsers.add_parser("teams", help="list and set team limits")
    teams_sub = teams.add_subparsers(dest="teams_command", required=True)
    teams_list = teams_sub.add_parser("list", help="list team limits (config and store)")
    teams_list.set_defaults(func=_run(_teams))
    team_set = teams_sub.add_parser("set", help="set a team's limits (0 clears one)")
    team_set.add_argument("team")
    team_set.add_argument("--rpm", type=_positive)
    team_set.add_argument("--tpm", type=_positive)
    team_set.add_argument("--daily-tokens", type=_positive)
    team_set.add_argument("--monthly-tokens", type=_positive)
    team_set.set_defaults(func=_run(_team_set))

    for parser in (create, listing, revoke, teams_list, team_set):
        parser.add_argument("--config", help=CONFIG_HELP)
