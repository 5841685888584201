"""KeyAuthority: key parsing, hashes only, expiry, revocation across replicas, static keys."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway import auth
from gateway.auth import KeyAuthority, create_key, generate_key, hash_key, parse_duration
from gateway.config import GatewayConfig, parse_config
from gateway.errors import AuthenticationFailed
from gateway.stores.keys import (
    Invalidate,
    MemoryKeyStore,
    ModelLimit,
    RedisKeyStore,
    TeamRecord,
)
from gateway.stores.redis_base import RedisNamespace, connect
from tests.eventually import eventually

STATIC = "sk-static-test-key"


def config(tmp_path: Path, extra: str = "") -> GatewayConfig:
    text = textwrap.dedent(f"""
        keys:
          static:
            - {{id: ops, team: alpha, sha256: "{hashlib.sha256(STATIC.encode()).hexdigest()}",
                models: [qa], rpm: 7}}
        teams:
          alpha: {{rpm: 100, models: {{qa: {{tpm: 500}}}}}}
    """) + textwrap.dedent(extra)
    return parse_config(text, base_dir=tmp_path, env={})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_missing_or_malformed_header(tmp_path: Path) -> None:
    authority = KeyAuthority(config(tmp_path), MemoryKeyStore(None))
    for header in (None, "", "Basic abc", "Bearer "):
        with pytest.raises(AuthenticationFailed) as err:
            await authority.authenticate(header)
        assert "Authorization: Bearer <key>" in err.value.message
        assert err.value.status == 401 and err.value.code == "invalid_api_key"


async def test_generated_key_round_trip(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    store = MemoryKeyStore(tmp_path / "keys.json")
    issued = await create_key(cfg, store, team="alpha", name="ci", models=["qa"], rpm=3)
    assert issued.secret.startswith(f"gw-{issued.record.id}_")
    assert issued.record.hash == hashlib.sha256(issued.secret.encode()).hexdigest()
    principal = await KeyAuthority(cfg, store).authenticate(f"Bearer {issued.secret}")
    assert (principal.key_id, principal.team, principal.name, principal.rpm) == (
        issued.record.id, "alpha", "ci", 3)
    assert principal.allows("qa") and not principal.allows("rag")
    assert principal.team_limits.rpm == 100
    assert principal.team_limits.models == {"qa": ModelLimit(None, 500)}


async def test_unknown_wrong_and_revoked_keys_are_401(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    store = MemoryKeyStore(None)
    issued = await create_key(cfg, store, team="alpha")
    authority = KeyAuthority(cfg, store)
    wrong = issued.secret[:-2] + ("aa" if not issued.secret.endswith("aa") else "bb")
    for presented in ("gw-nope_secret", wrong, "sk-unknown", "gw-_x"):
        with pytest.raises(AuthenticationFailed, match="Incorrect API key"):
            await authority.authenticate(f"Bearer {presented}")
    await authority.authenticate(f"Bearer {issued.secret}")
    await store.revoke_key(issued.record.id)
    authority.invalidate(issued.record.id)
    with pytest.raises(AuthenticationFailed, match="Incorrect API key"):
        await authority.authenticate(f"Bearer {issued.secret}")


async def test_revocation_seen_after_the_cache_expires(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    clock = Clock()
    path = tmp_path / "keys.json"
    issued = await create_key(cfg, MemoryKeyStore(path), team="alpha")
    authority = KeyAuthority(cfg, MemoryKeyStore(path), clock=clock)
    await authority.authenticate(f"Bearer {issued.secret}")
    await MemoryKeyStore(path).revoke_key(issued.record.id)  # "another process": the CLI
    await authority.authenticate(f"Bearer {issued.secret}")  # still cached
    clock.now += 1.01
    with pytest.raises(AuthenticationFailed):
        await authority.authenticate(f"Bearer {issued.secret}")


class SlowStore(MemoryKeyStore):
    """A key store like a network store: a read's reply arrives when the test lets it
    (`reply`, open at first); `read` is set once a record has been read. Counts reads."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.reads = 0
        self.read = asyncio.Event()
        self.reply = asyncio.Event()
        self.reply.set()

    async def get_key(self, key_id: str) -> Any:
        self.reads += 1
        found = await super().get_key(key_id)
        self.read.set()
        await self.reply.wait()  # the reply is on its way
        return found


async def test_requests_in_flight_share_one_load_of_a_stale_key(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    clock = Clock()
    store = SlowStore(tmp_path / "keys.json")
    issued = await create_key(cfg, store, team="alpha")
    authority = KeyAuthority(cfg, store, clock=clock)
    header = f"Bearer {issued.secret}"
    for _ in range(2):  # cold, then expired
        store.read.clear()
        store.reply.clear()
        requests = [asyncio.ensure_future(authority.authenticate(header)) for _ in range(50)]
        await store.read.wait()  # all 50 are in flight, a load waits for its reply
        store.reply.set()
        principals = await asyncio.gather(*requests)
        assert {p.key_id for p in principals} == {issued.record.id}
        clock.now += 1.01
    assert store.reads == 2


async def test_a_revocation_during_a_load_is_not_undone_by_it(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    store = SlowStore(tmp_path / "keys.json")
    issued = await create_key(cfg, store, team="alpha")
    authority = KeyAuthority(cfg, store)
    header = f"Bearer {issued.secret}"
    store.reply.clear()
    loading = asyncio.ensure_future(authority.authenticate(header))
    await store.read.wait()  # the load has read the old record, its reply is on the way
    await store.revoke_key(issued.record.id)
    authority.invalidate(issued.record.id)  # as the store's change feed does
    store.reply.set()
    await loading  # admitted on what it read before the revocation
    with pytest.raises(AuthenticationFailed):
        await authority.authenticate(header)


async def test_expired_key_says_so(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    store = MemoryKeyStore(None)
    issued = generate_key(cfg, team="alpha", expires_in=60, now=0.0)
    await store.put_key(issued.record)
    with pytest.raises(AuthenticationFailed, match="expired on 1970-01-01 00:01 UTC") as err:
        await KeyAuthority(cfg, store).authenticate(f"Bearer {issued.secret}")
    assert err.value.code == "invalid_api_key"


async def test_static_key_from_config(tmp_path: Path) -> None:
    store = MemoryKeyStore(None)
    authority = KeyAuthority(config(tmp_path), store)
    principal = await authority.authenticate(f"Bearer {STATIC}")
    assert (principal.key_id, principal.team, principal.rpm) == ("ops", "alpha", 7)
    assert principal.models == frozenset({"qa"})
    assert principal.team_limits.rpm == 100
    # a team change made at run time applies to static keys too (after the cache)
    await store.put_team(TeamRecord("alpha", rpm=5, daily_token_budget=1000))
    authority.invalidate("*")
    changed = await authority.authenticate(f"bearer {STATIC}")
    assert changed.team_limits.rpm == 5 and changed.team_limits.daily_token_budget == 1000
    assert changed.team_limits.models == {"qa": ModelLimit(None, 500)}


async def test_pepper_uses_hmac(tmp_path: Path) -> None:
    cfg = config(tmp_path, "server: {}\n").model_copy(
        update={"keys": config(tmp_path, "").keys.model_copy(update={"pepper": _secret("pep")})})
    store = MemoryKeyStore(None)
    issued = await create_key(cfg, store, team="alpha")
    expected = hmac.new(b"pep", issued.secret.encode(), hashlib.sha256).hexdigest()
    assert issued.record.hash == expected == hash_key(issued.secret, "pep")
    await KeyAuthority(cfg, store).authenticate(f"Bearer {issued.secret}")
    with pytest.raises(AuthenticationFailed):  # same key, server without the pepper
        await KeyAuthority(config(tmp_path), store).authenticate(f"Bearer {issued.secret}")


def _secret(value: str) -> object:
    from pydantic import SecretStr

    return SecretStr(value)


async def test_hashes_compared_in_constant_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    cfg = config(tmp_path)
    store = MemoryKeyStore(None)
    issued = await create_key(cfg, store, team="alpha")
    await KeyAuthority(cfg, store).authenticate(f"Bearer {issued.secret}")
    assert calls == [(issued.record.hash, issued.record.hash)]


async def test_last_used_is_batched_off_the_hot_path(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    store = MemoryKeyStore(None)
    issued = await create_key(cfg, store, team="alpha")
    authority = KeyAuthority(cfg, store)
    for _ in range(20):
        await authority.authenticate(f"Bearer {issued.secret}")
    before = await store.get_key(issued.record.id)
    assert before is not None and before.last_used is None  # nothing written per request
    await authority.aclose()  # flushes
    after = await store.get_key(issued.record.id)
    assert after is not None and after.last_used is not None


def test_parse_duration() -> None:
    assert parse_duration("30d") == 30 * 86400
    assert parse_duration("12h") == 43200
    assert parse_duration("90") == 90
    for bad in ("", "abc", "-1d", "0"):
        with pytest.raises(ValueError):
            parse_duration(bad)


class SubscribedStore(RedisKeyStore):
    """A Redis key store whose `subscribed` is set once its change feed listens."""

    def __init__(self, ns: RedisNamespace) -> None:
        super().__init__(ns)
        self.subscribed = asyncio.Event()

    async def watch(self, invalidate: Invalidate) -> None:
        def seen(key_id: str) -> None:
            if key_id == "*":  # what a (re)subscription announces
                self.subscribed.set()
            invalidate(key_id)

        await super().watch(seen)


async def refuses(authority: KeyAuthority, secret: str) -> bool:
    try:
        await authority.authenticate(f"Bearer {secret}")
    except AuthenticationFailed:
        return True
    return False


@pytest.mark.redis
async def test_revocation_reaches_every_replica_within_a_second(
    redis_url: str, tmp_path: Path
) -> None:
    cfg = config(tmp_path).model_copy(update={"keys": config(tmp_path).keys.model_copy(
        update={"cache_seconds": 30.0})})  # a long cache: only the invalidation can help
    admin_ns = connect(redis_url, "gw")
    replicas = [connect(redis_url, "gw") for _ in range(3)]
    stores = [SubscribedStore(ns) for ns in replicas]
    authorities = [KeyAuthority(cfg, store) for store in stores]
    try:
        for authority in authorities:
            await authority.start()
        for store in stores:
            await asyncio.wait_for(store.subscribed.wait(), 5)
        issued = await create_key(cfg, RedisKeyStore(admin_ns), team="alpha")
        for authority in authorities:
            await authority.authenticate(f"Bearer {issued.secret}")
        await RedisKeyStore(admin_ns).revoke_key(issued.record.id)
        started = time.monotonic()
        for authority in authorities:
            await eventually(functools.partial(refuses, authority, issued.secret), within=1.0)
        assert time.monotonic() - started < 1.0
    finally:
        for authority in authorities:
            await authority.aclose()
        for ns in [admin_ns, *replicas]:
            await ns.client.aclose()


def _files(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in folder.iterdir())


@pytest.mark.redis
async def test_secret_appears_nowhere(redis_url: str, tmp_path: Path) -> None:
    """Hash-only storage: not in Redis, not in the key file, not in any log event."""
    cfg = config(tmp_path)
    ns = connect(redis_url, "gw")
    file_store = MemoryKeyStore(tmp_path / "keys.json")
    try:
        with capture_logs() as logs:
            secrets = []
            for store in (RedisKeyStore(ns), file_store):
                issued = await create_key(cfg, store, team="alpha", name="n")
                secrets.append(issued.secret)
                authority = KeyAuthority(cfg, store)
                await authority.authenticate(f"Bearer {issued.secret}")
                with pytest.raises(AuthenticationFailed) as err:
                    await authority.authenticate(f"Bearer {issued.secret}x")
                assert issued.secret not in err.value.message
                await authority.aclose()
        dump = []
        async for key in ns.client.scan_iter("*"):
            dump.append(key)
            kind = (await ns.client.type(key)).decode()
            if kind == "hash":
                dump.extend(str(v).encode() for v in (await ns.client.hgetall(key)).items())
            elif kind == "string":
                dump.append(await ns.client.get(key) or b"")
        blob = b"\n".join(dump) + b"\n" + _files(tmp_path)
        blob += repr(logs).encode()
        for secret in secrets:
            assert secret.encode() not in blob
            assert secret.partition("_")[2].encode() not in blob
    finally:
        await ns.client.aclose()
