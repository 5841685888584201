"""``gateway usage`` and ``gateway outbox`` on the local files and on Redis."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from datetime import date
from pathlib import Path

import pytest

from gateway.analytics.reports import default_range, usage_report
from gateway.cli.main import main
from gateway.cli.usage_command import render
from gateway.components import make_outbox, make_usage_store, usage_file
from gateway.config import load_config
from gateway.stores.redis_base import connect
from gateway.stores.spool import SpoolOutbox
from gateway.stores.usage import MemoryUsageStore, UsageDelta

D1, D2 = date(2026, 11, 1), date(2026, 11, 2)
ROWS = [UsageDelta(D1, "alpha", "k1", "qa", requests=3, prompt_tokens=30, completion_tokens=9),
        UsageDelta(D2, "alpha", "k2", "rag", requests=1, prompt_tokens=5, errors=1),
        UsageDelta(D2, "beta", "k3", "qa", requests=2, completion_tokens=4, cached=2)]


def write_config(tmp_path: Path, store: str = "memory") -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(
        f"store: {store}\nstore_prefix: clitest\n"
        "analytics:\n  sinks:\n    - {name: ink, kind: inkeep, url: 'http://127.0.0.1:9'}\n"
        "  outbox: {spool_dir: var/outbox}\n")
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


async def test_usage_report_is_json_ready() -> None:
    store = MemoryUsageStore()
    await store.add(ROWS)
    report = await usage_report(store, "alpha", D1, D2)
    assert report[0] == {"day": "2026-11-01", "team": "alpha", "key_id": "k1", "model": "qa",
                         "requests": 3, "prompt_tokens": 30, "completion_tokens": 9,
                         "errors": 0, "cached": 0, "estimated": 0, "total_tokens": 39}
    assert len(report) == 2
    json.dumps(report)


def test_render_formats() -> None:
    rows = [{"day": "2026-11-01", "team": "a", "key_id": "k", "model": "m", "requests": 1,
             "prompt_tokens": 2, "completion_tokens": 3, "errors": 0, "cached": 0,
             "estimated": 0, "total_tokens": 5}]
    table = render(rows, "table").splitlines()
    assert table[0].split()[:4] == ["day", "team", "key_id", "model"]
    assert table[-1].split() == ["total", "1", "2", "3", "0", "0", "0", "5"]
    assert list(csv.DictReader(io.StringIO(render(rows, "csv"))))[0]["total_tokens"] == "5"
    assert render([], "table") == "no usage in this range"
    assert default_range(date(2026, 11, 17)) == (date(2026, 11, 1), date(2026, 11, 17))


def test_usage_on_the_local_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path)
    config = load_config(cfg)
    assert usage_file(config) == tmp_path / "var" / "usage.jsonl"
    asyncio.run(make_usage_store(config, None).add(ROWS))
    code, out, _ = run(capsys, "usage", "--config", str(cfg), "--since", "2026-11-01",
                       "--until", "2026-11-30", "--format", "json")
    assert code == 0
    assert [(r["team"], r["requests"]) for r in json.loads(out)] == [
        ("alpha", 3), ("alpha", 1), ("beta", 2)]
    code, out, _ = run(capsys, "usage", "--config", str(cfg), "--team", "beta", "--since",
                       "2026-11-01", "--until", "2026-11-30", "--format", "csv")
    assert [r["team"] for r in csv.DictReader(io.StringIO(out))] == ["beta"]
    code, out, _ = run(capsys, "usage", "--config", str(cfg), "--model", "qa", "--since",
                       "2026-11-01", "--until", "2026-11-30", "--format", "csv")
    assert [(r["team"], r["model"]) for r in csv.DictReader(io.StringIO(out))] == [
        ("alpha", "qa"), ("beta", "qa")]
    code, out, _ = run(capsys, "usage", "--config", str(cfg), "--since", "2026-11-01",
                       "--until", "2026-11-30")
    assert out.splitlines()[-1].split()[:2] == ["total", "6"]
    code, _, err = run(capsys, "usage", "--config", str(cfg), "--since", "2026-11-05",
                       "--until", "2026-11-01")
    assert code == 2 and "--since" in err


def test_outbox_on_the_spool(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path)
    config = load_config(cfg)

    async def fill() -> SpoolOutbox:
        box = make_outbox(config, None)
        assert isinstance(box, SpoolOutbox)
        await box.put([(b'{"request_id":"r%d"}' % i, f"k{i}") for i in range(3)])
        items = await box.claim("ink", 3, "c")
        await box.dead_letter(items[0], "HTTP 400")
        return box

    box = asyncio.run(fill())  # still open: like a running gateway holding the file
    code, out, _ = run(capsys, "outbox", "depth", "--config", str(cfg))
    assert (code, out.split()) == (0, ["ink", "2"])
    code, out, _ = run(capsys, "outbox", "list-dead", "--config", str(cfg))
    assert out.startswith("0/ink:1  sink=ink  request=r0") and "reason=HTTP 400" in out
    code, _, err = run(capsys, "outbox", "replay", "--config", str(cfg))
    assert code == 1 and "running gateway" in err
    asyncio.run(box.close())
    code, out, _ = run(capsys, "outbox", "replay", "0/ink:1", "--config", str(cfg))
    assert (code, out.strip()) == (0, "replayed 1 dead letter(s)")
    code, out, _ = run(capsys, "outbox", "--config", str(cfg))
    assert out.split() == ["ink", "3"]
    code, out, _ = run(capsys, "outbox", "list-dead", "--config", str(cfg))
    assert out == ""


@pytest.mark.redis
def test_usage_and_outbox_on_redis(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   redis_proc: object) -> None:
    url = redis_proc.url  # type: ignore[attr-defined]
    cfg = write_config(tmp_path, url)
    config = load_config(cfg)

    async def fill() -> None:
        ns = connect(url, "clitest")
        await ns.client.flushall()
        await make_usage_store(config, ns).add(ROWS)
        box = make_outbox(config, ns)
        await box.put([(b'{"request_id":"r1"}', "k1"), (b'{"request_id":"r2"}', "k2")])
        [item, _] = await box.claim("ink", 2, "c")
        await box.dead_letter(item, "refused")
        await ns.client.aclose()

    asyncio.run(fill())
    code, out, _ = run(capsys, "usage", "--config", str(cfg), "--since", "2026-11-02",
                       "--until", "2026-11-02", "--format", "json")
    assert [(r["team"], r["key_id"]) for r in json.loads(out)] == [("alpha", "k2"),
                                                                   ("beta", "k3")]
    code, out, _ = run(capsys, "outbox", "depth", "--config", str(cfg))
    assert out.split() == ["ink", "1"]
    code, out, _ = run(capsys, "outbox", "list-dead", "--config", str(cfg))
    dead_id = out.split()[0]
    assert "request=r1" in out
    code, out, _ = run(capsys, "outbox", "replay", dead_id, "--config", str(cfg))
    assert out.strip() == "replayed 1 dead letter(s)"
    code, out, _ = run(capsys, "outbox", "depth", "--config", str(cfg))
    assert out.split() == ["ink", "2"]


def test_outbox_without_sinks_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("store: memory\n")
    code, out, _ = run(capsys, "outbox", "depth", "--config", str(config))
    assert code == 0 and "no analytics sinks are configured" in out
