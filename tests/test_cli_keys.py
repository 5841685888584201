"""``gateway keys`` / ``gateway teams`` on the local key file and on Redis."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from gateway.auth import KeyAuthority
from gateway.cli.main import main
from gateway.components import make_key_store
from gateway.config import load_config
from gateway.stores.redis_base import connect


def write_config(tmp_path: Path, store: str = "memory") -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(f"store: {store}\nteams:\n  alpha: {{rpm: 100}}\n")
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_keys_on_the_local_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(write_config(tmp_path))
    code, out, err = run(capsys, "keys", "create", "--team", "alpha", "--name", "ci",
                         "--models", "qa,rag", "--rpm", "5", "--expires", "30d",
                         "--config", cfg)
    assert code == 0
    secret = out.strip()
    assert secret.startswith("gw-") and "shown only this once" in err
    data = json.loads((tmp_path / "keys.json").read_text())
    (key_id,) = data["keys"]
    assert secret not in (tmp_path / "keys.json").read_text()
    assert data["keys"][key_id]["models"] == ["qa", "rag"]

    code, out, _ = run(capsys, "keys", "list", "--team", "alpha", "--config", cfg)
    assert code == 0 and key_id in out and "qa,rag" in out and "active" in out
    assert secret not in out
    code, out, _ = run(capsys, "keys", "list", "--team", "beta", "--config", cfg)
    assert key_id not in out

    # a running gateway sees it, and then sees the revocation
    config = load_config(cfg)
    principal = asyncio.run(KeyAuthority(config, make_key_store(config, None))
                            .authenticate(f"Bearer {secret}"))
    assert principal.key_id == key_id and principal.rpm == 5
    code, out, _ = run(capsys, "keys", "revoke", key_id, "--config", cfg)
    assert code == 0 and "revoked" in out
    code, out, _ = run(capsys, "keys", "list", "--config", cfg)
    assert "revoked" in out
    code, _, err = run(capsys, "keys", "revoke", "nope", "--config", cfg)
    assert code == 1 and "no key 'nope'" in err


def test_teams(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(write_config(tmp_path))
    code, out, _ = run(capsys, "teams", "set", "beta", "--tpm", "1000", "--daily-tokens",
                       "50000", "--config", cfg)
    assert code == 0 and "tpm=1000" in out
    run(capsys, "teams", "set", "beta", "--rpm", "9", "--config", cfg)
    code, out, _ = run(capsys, "teams", "list", "--config", cfg)
    lines = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert lines["alpha"][1] == "100" and lines["alpha"][-1] == "config"
    assert lines["beta"][1:4] == ["9", "1000", "50000"] and lines["beta"][-1] == "store"


def test_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(write_config(tmp_path))
    code, _, err = run(capsys, "keys", "create", "--team", "a", "--expires", "soon",
                       "--config", cfg)
    assert code == 2 and "--expires" in err
    code, _, err = run(capsys, "keys", "list", "--config", str(tmp_path / "missing.yaml"))
    assert code == 2 and "no such configuration file" in err


@pytest.mark.redis
def test_keys_on_redis(redis_proc: object, tmp_path: Path,
                       capsys: pytest.CaptureFixture[str]) -> None:
    url = redis_proc.url  # type: ignore[attr-defined]
    cfg = str(write_config(tmp_path, url))
    code, out, _ = run(capsys, "keys", "create", "--team", "alpha", "--config", cfg)
    assert code == 0
    secret = out.strip()
    key_id = secret[3:].partition("_")[0]
    assert not (tmp_path / "keys.json").exists()

    async def check() -> None:
        ns = connect(url, "gw")
        try:
            assert await ns.client.hexists("gw:{keys}:records", key_id)
        finally:
            await ns.client.aclose()

    asyncio.run(check())
    code, out, _ = run(capsys, "keys", "list", "--config", cfg)
    assert key_id in out
    code, out, _ = run(capsys, "keys", "revoke", key_id, "--config", cfg)
    assert code == 0
