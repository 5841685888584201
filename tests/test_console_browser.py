"""The console in a real browser: headless Chromium (Debian's package, driven by Playwright)
against a real ``gateway serve --demo``. It signs in, sees charts of requests it made,
creates a key and uses it through the openai SDK, revokes it, downloads the usage CSV and
compares it with ``gateway usage --format csv``, replays dead letters, and checks that a
change without the session cookie or the CSRF token changes nothing. Every page is kept as
a screenshot at 1280 and 390 px wide under ``artifacts/console/``."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import openai
import pytest
import yaml
from playwright.sync_api import (
    Browser,
    ConsoleMessage,
    Page,
    Response,
    Route,
    expect,
    sync_playwright,
)

from gateway.demo import DEMO_KEY
from gateway.testing.fake_analytics import AnalyticsState, create_fake_analytics_app
from gateway.testing.process import GatewayProcess, gateway_env, run_gateway
from gateway.testing.server import run_server_in_thread

pytestmark = pytest.mark.slow

ADMIN_KEY = "browser-test-admin-key"
CHROMIUM = "/usr/bin/chromium"
# Debian's Chromium as it must run here: no sandbox (root in a container), nothing fetched
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts" / "console"
WIDTHS = (1280, 390)
HELLO = [{"role": "user", "content": "hello"}]
T = TypeVar("T")


def until(probe: Callable[[], T | None], within: float = 15.0) -> T:
    """The first truthy result of `probe`, polled: the gateway writes its figures to the
    store every second, in another process."""
    deadline = time.monotonic() + within
    while True:
        found = probe()
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out after {within} s"
        time.sleep(0.1)


class Setup:
    def __init__(self, gateway: GatewayProcess, config: Path, sink: AnalyticsState) -> None:
        self.gateway = gateway
        self.config = config
        self.sink = sink
        self.console = f"{gateway.url}/console"

    def client(self, key: str = DEMO_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.gateway.url}/v1", api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    assert shutil.which("chromium"), "make test installs Debian's chromium (apt-get)"
    folder = tmp_path_factory.mktemp("console")
    sink = create_fake_analytics_app()
    with run_server_in_thread(sink) as hook:
        config = folder / "gateway.yaml"
        config.write_text(yaml.safe_dump({
            "server": {"admin_key": ADMIN_KEY, "drain_delay": 0, "log_level": "warning"},
            # a backend nobody listens on: its model's requests fail, as an operator sees it
            "backends": {"broken": {"kind": "openai", "base_url": "http://127.0.0.1:9",
                                    "requires_key": False}},
            "models": {"broken-model": {"backend": "broken"}},
            "analytics": {"sinks": [{"name": "hook", "kind": "webhook",
                                     "url": f"{hook}/hook"}],
                          "outbox": {"spool_dir": str(folder / "outbox")}},
        }))
        with run_gateway(config, args=["--demo"]) as gateway:
            yield Setup(gateway, config, sink.state.analytics)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        found = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield found
        found.close()


@pytest.fixture
def page(browser: Browser, setup: Setup) -> Iterator[Page]:
    """A signed-in page, 1280 px wide, that fails the test on a script error, a console error
or a file (style sheet, script) that does not load."""
    context = browser.new_context(viewport={"width": 1280, "height": 900},
                                  accept_downloads=True)
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    opened = context.new_page()
    problems: list[str] = []
    opened.on("pageerror", lambda exc: problems.append(str(exc)))

    def console_error(message: ConsoleMessage) -> None:  # e.g. a CSP violation
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            problems.append(message.text)

    def failed_file(response: Response) -> None:  # a page's status is the test's business
        if response.status >= 400 and response.request.resource_type != "document":
            problems.append(f"{response.status} {response.url}")

    opened.on("console", console_error)
    opened.on("response", failed_file)
    sign_in(opened, setup)
    yield opened
    context.close()
    assert problems == []


def sign_in(page: Page, setup: Setup) -> None:
    page.goto(f"{setup.console}/")
    assert page.url.startswith(f"{setup.console}/login")  # no session: the sign-in page
    page.fill("#admin-key", ADMIN_KEY)
    page.click("button[type=submit]")
    page.wait_for_url(f"{setup.console}/")


def ask(setup: Setup, model: str, n: int = 1, **kw: Any) -> None:
    client = setup.client()
    for _ in range(n):
        client.chat.completions.create(model=model, messages=HELLO, **kw)


def charted(page: Page, setup: Setup) -> int:
    """The requests of the last hour that the overview shows."""
    page.goto(f"{setup.console}/?window=hour&by=model")
    return int(page.inner_text("#total-requests").replace(",", ""))


def ask_and_wait(page: Page, setup: Setup, model: str, n: int, **kw: Any) -> None:
    """Send `n` requests and wait until the console shows them (they are in the store)."""
    before = charted(page, setup)
    ask(setup, model, n, **kw)
    until(lambda: charted(page, setup) >= before + n)


def test_the_overview_charts_the_requests_it_was_sent(page: Page, setup: Setup) -> None:
    ask(setup, "demo-inkeep-qa", 3)
    ask(setup, "demo-nuclia", 2, stream=True)
    with pytest.raises(openai.APIStatusError):
        ask(setup, "broken-model")
    until(lambda: charted(page, setup) >= 6)
    requests = page.locator("figure.chart").filter(has_text="Requests by model")
    assert requests.get_attribute("data-has-data") == "true"
    for model in ("demo-inkeep-qa", "demo-nuclia", "broken-model"):
        assert requests.locator(f'path[data-series="{model}"]').count() >= 1, model
        assert requests.locator(f'.legend li[data-series="{model}"]').count() == 1
    errors = page.locator("figure.chart").filter(has_text="Errors by model")
    assert errors.locator('.legend li[data-series="broken-model"] .figure').inner_text() == "1"
    assert "Backend broken" in page.inner_text(".attention")  # is anything failing? yes
    page.click("text=Backends")
    row = page.locator('tr[data-backend="broken"]')
    assert "100.0 %" in row.inner_text()
    # its circuit: one request made three attempts (two retries), short of opening it
    circuit = page.locator('section[aria-labelledby="circuits"] tbody tr',
                           has=page.locator('th:text-is("broken")'))
    assert circuit.locator("td").nth(1).inner_text() == "closed"
    assert circuit.locator("td").nth(2).inner_text() == "3"


def create_key(page: Page, setup: Setup, team: str, **fields: str) -> str:
    """Create a key with the form; its id (the page shows its secret)."""
    page.goto(f"{setup.console}/keys")
    page.fill("#nk-team", team)
    for field, value in fields.items():
        page.fill(f"#nk-{field}", value)
    page.click("text=Create key")
    return page.inner_text("#new-secret").strip().removeprefix("gw-").split("_")[0]


def test_a_key_made_in_the_browser_works_until_it_is_revoked(page: Page, setup: Setup) -> None:
    key_id = create_key(page, setup, "browser-team", name="made in chromium",
                        models="demo-inkeep-qa")
    secret = page.inner_text("#new-secret").strip()
    assert secret.startswith("gw-")
    page.click("button[data-copy=new-secret]")
    expect(page.locator("#new-secret-copied")).to_contain_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == secret

    reply = setup.client(secret).chat.completions.create(model="demo-inkeep-qa", messages=HELLO)
    assert "sample" in (reply.choices[0].message.content or "").lower()

    page.goto(f"{setup.console}/keys")
    assert secret not in page.content()  # shown once: never again
    row = page.locator(f'tr[data-key="{key_id}"]')
    page.once("dialog", lambda dialog: dialog.accept())
    row.locator("text=Revoke").click()
    page.wait_for_url(f"{setup.console}/keys/{key_id}")
    assert page.inner_text("#key-state") == "revoked"
    with pytest.raises(openai.AuthenticationError):
        setup.client(secret).chat.completions.create(model="demo-inkeep-qa", messages=HELLO)


def test_no_change_without_the_session_cookie_or_the_csrf_token(
        page: Page, setup: Setup, browser: Browser) -> None:
    key_id = create_key(page, setup, "csrf-team")
    secret = page.inner_text("#new-secret").strip()
    revoke = f"{setup.console}/keys/{key_id}/revoke"
    token = page.locator("input[name=csrf]").first.get_attribute("value") or ""
    form = f'<form method="post" action="{revoke}"><input name="csrf" value="{token}"></form>'

    # the cookie without the token
    assert page.request.post(revoke, form={"csrf": ""}).status == 403
    with page.expect_navigation():
        page.evaluate("""revoke => { const f = document.createElement('form');
            f.method = 'post'; f.action = revoke; document.body.appendChild(f); f.submit(); }""",
                      revoke)
    assert "form has expired" in page.inner_text("main")
    # the token without the cookie
    stranger = browser.new_context()
    try:
        assert stranger.request.post(revoke, form={"csrf": token}).status == 403
    finally:
        stranger.close()
    # another site's page in the signed-in browser posts the whole form: SameSite=Strict
    # keeps the cookie home, and the Origin is foreign
    evil = page.context.new_page()

    def attacker(route: Route) -> None:
        route.fulfill(body=form, content_type="text/html")

    evil.route("http://attacker.test/", attacker)
    evil.goto("http://attacker.test/")
    with evil.expect_navigation():
        evil.evaluate("document.forms[0].submit()")
    assert "session has ended" in evil.inner_text("main")
    evil.close()

    reply = setup.client(secret).chat.completions.create(model="demo-nuclia", messages=HELLO)
    assert reply.choices[0].message.content  # the key still works
    page.goto(f"{setup.console}/keys/{key_id}")
    assert page.inner_text("#key-state") == "active"


def test_the_usage_csv_is_the_one_the_cli_writes(page: Page, setup: Setup) -> None:
    ask_and_wait(page, setup, "demo-inkeep-agents", 2)
    page.goto(f"{setup.console}/usage")
    page.select_option("#u-team", "demo")
    page.click("#usage-filter button[type=submit]")
    assert "team=demo" in page.url
    assert "demo-inkeep-agents" in page.inner_text("#usage-table")
    with page.expect_download() as download:
        page.click("#csv-download")
    got = Path(download.value.path()).read_bytes()
    cli = subprocess.run([sys.executable, "-m", "gateway", "usage", "--config",
                          str(setup.config), "--team", "demo", "--format", "csv"],
                         capture_output=True, env=gateway_env(), timeout=60, check=True)
    assert got == cli.stdout and got.startswith(b"day,team,key_id,model,requests")


def test_dead_letters_show_their_error_and_come_back_on_replay(
        page: Page, setup: Setup) -> None:
    setup.sink.faults.fail_next(2, status=400)  # refused outright: dead-lettered at once
    delivered = len(setup.sink.on("/hook"))
    ask(setup, "demo-inkeep-qa", 2)

    def listed() -> bool:
        page.goto(f"{setup.console}/delivery")
        return page.locator("#dead-table tbody tr form").count() == 2

    until(listed)
    assert "400" in page.inner_text("#dead-table")
    assert page.locator('tr[data-sink="hook"] td.bad').inner_text() == "2"
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#replay-all")
    assert "Replayed 2 dead letter(s)" in page.inner_text("main")
    until(lambda: len(setup.sink.on("/hook")) >= delivered + 2)
    page.goto(f"{setup.console}/delivery")
    assert "No dead letters." in page.inner_text("#dead-table")


PAGES = {"login": "/login", "overview": "/", "overview-30-days": "/?window=month&by=model",
         "keys": "/keys", "team": "/teams/demo", "usage": "/usage", "delivery": "/delivery",
         "backends": "/backends"}


def test_every_page_looks_clean_at_desktop_and_phone_widths(
        page: Page, setup: Setup, browser: Browser) -> None:
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    key_id = create_key(page, setup, "docs-team")
    ask(setup, "demo-inkeep-qa", 1)
    pages = {**PAGES, "key": f"/keys/{key_id}"}
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 900})
        for name, path in pages.items():
            shown = page
            if name == "login":  # as a browser without a session sees it
                shown = browser.new_context(viewport={"width": width, "height": 900}).new_page()
            shown.goto(f"{setup.console}{path}")
            assert shown.locator(".notice.bad").count() == 0, path
            shoot(shown, name, width)
            if shown is not page:
                shown.context.close()


def shoot(page: Page, name: str, width: int) -> None:
    """Keep a full-page screenshot; the page must not be wider than the window (wide
    tables scroll in their own box)."""
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"{name} at {width} px is {overflow} px too wide"
    page.screenshot(path=str(ARTIFACTS / f"{name}-{width}.png"), full_page=True)
