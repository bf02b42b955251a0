"""The web console at `/ui/` (README "Console"), in a real browser: Playwright driving Debian's Chromium against
the whole service on the simulator. Also the live feed's resume and the console's headers over plain HTTP.

Chromium comes from Debian (`make tools`), never downloaded. Without it these browser tests skip on a
workstation and fail under CI (`CI=true`), so a CI image that lost the browser cannot pass silently.
Screenshots of each page go to `$HL_TEST_SCREENSHOTS` (CI artefacts; default `test-artifacts/screenshots/`, git-
ignored); the README's pictures in `docs/console-*.png` are rewritten only with `HL_UPDATE_SCREENSHOTS=1`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import aiohttp
import pytest
from playwright.async_api import ViewportSize, async_playwright, expect

from hl_monitor.chaos.relay import TcpRelay
from hl_monitor.config import HttpConfig, Secret, UiConfig
from hl_monitor.domain.publication import Publication
from hl_monitor.metrics import Metrics
from hl_monitor.ops.console import ConsoleDeps, LiveFeed
from hl_monitor.ops.console.routes import CSP
from hl_monitor.ops.http import HttpServer, create_app
from hl_monitor.sim.server import SimConfig, SimServer
from hl_monitor.storage.migrate import upgrade
from tests.support.http_fakes import FakeView, MemoryAdmin
from tests.support.nats import NatsServer
from tests.support.service import W1, W2, live, running, service_config
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(120)

TOKEN: Final = "console-token-1"
XSS_LABEL: Final = "<img src=x onerror=alert(1)>"
NEW_WHALE: Final = "0x" + "c3" * 20
DISCOVERED_ETH: Final = 100  # a whale-sized buy (ETH): it ranks first among the sim's few candidates in `/discovery`
LIVE_WITHIN_MS: Final = 1000  # a signal the sim makes shows in the open live feed within a second
PHONE: Final[ViewportSize] = {"width": 390, "height": 844}  # a common phone viewport
DESKTOP: Final[ViewportSize] = {"width": 1280, "height": 800}  # a small laptop screen
REPO: Final = Path(__file__).resolve().parents[1]
# Not `docs/`: a test run must not rewrite tracked files (the README's pictures change only when asked).
SCREENSHOTS: Final = Path(os.environ.get("HL_TEST_SCREENSHOTS", REPO / "test-artifacts" / "screenshots"))
UPDATE_DOCS: Final = os.environ.get("HL_UPDATE_SCREENSHOTS") == "1"
CHROMIUM_CANDIDATES: Final = ("/usr/bin/chromium", "/usr/bin/chromium-browser")


def chromium_path() -> str:
    """Debian's Chromium; skip without it, except under CI where a missing browser is a failure."""
    configured = os.environ.get("HL_TEST_CHROMIUM")
    for candidate in (configured, *CHROMIUM_CANDIDATES, shutil.which("chromium")):
        if candidate and Path(candidate).exists():
            return candidate
    why = "Chromium not found: run `make tools` (installs Debian's chromium) or set HL_TEST_CHROMIUM"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(why)
    pytest.skip(why)


@contextlib.asynccontextmanager
async def browser_page(viewport: ViewportSize = DESKTOP) -> AsyncIterator[Any]:
    executable = chromium_path()
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            context = await browser.new_context(viewport=viewport)
            page = await context.new_page()
            page.set_default_timeout(10_000)
            yield page
        finally:
            await browser.close()


def watch_for_script_problems(page: Any) -> list[str]:
    """Dialogs (an injected `alert`), CSP violations and page errors, as they happen."""
    problems: list[str] = []

    async def dismiss(dialog: Any) -> None:
        if dialog.type == "confirm":  # the remove button asks; the operator agrees
            await dialog.accept()
            return
        problems.append(f"dialog {dialog.type}: {dialog.message}")
        await dialog.dismiss()

    page.on("dialog", dismiss)
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    # Error answers the tests provoke (401, 400, a missing /discovery) are logged by the browser as failed
    # loads; anything else at error level (a CSP violation, a script error) is a problem.
    page.on(
        "console",
        lambda msg: (
            problems.append(f"console {msg.type}: {msg.text}")
            if msg.type == "error" and not msg.text.startswith("Failed to load resource")
            else None
        ),
    )
    return problems


async def shot(page: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"console-{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    if UPDATE_DOCS:
        shutil.copyfile(path, REPO / "docs" / path.name)


@contextlib.asynccontextmanager
async def service_on_sim(tmp_path: Path, nats_url: str, **extra: str) -> AsyncIterator[tuple[Any, SimServer]]:
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'hl.db'}"
    await upgrade(db_url)
    async with SimServer(SimConfig(clearinghouse_push_interval=0.2)) as sim:
        cfg = service_config(sim, nats_url, db_url, tmp_path / "data", HYPERLIQUID__USER_SLOTS="1", **extra)
        async with running(cfg) as service:
            await live(service, W1)
            yield service, sim


async def test_pages_render_the_sims_whales_and_a_signal_reaches_the_live_feed_within_a_second(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    async with service_on_sim(tmp_path, nats_server.url) as (service, sim):
        base = f"http://{service.components.cfg.http.listen}"
        keeper = service.components.positions
        assert keeper is not None
        whale = sim.exchange.whale(W1)
        await whale.market_order("BTC", True, "2", "80000")
        await sim.exchange.whale(W2).market_order("ETH", False, "30", "2400")
        await wait_until(lambda: keeper.keeper.portfolio(W1) is not None, within=10)

        async with browser_page() as page:
            problems = watch_for_script_problems(page)
            await page.goto(f"{base}/ui/")
            rows = page.locator("#whales tbody tr")
            await wait_until_count(rows, 2)
            assert set(await rows.evaluate_all("rs => rs.map(r => r.dataset.address)")) == {W1, W2}
            await page.locator(f'#whales tr[data-address="{W1}"] td:nth-child(6)', has_text="BTC").wait_for()
            await page.fill("#whale-symbol", "ETH")
            await wait_until_count(rows, 1)
            assert await rows.first.get_attribute("data-address") == W2
            await page.fill("#whale-symbol", "")
            await shot(page, "whales")

            await page.click(f'#whales tr[data-address="{W1}"] a')
            await page.locator("#positions tbody tr", has_text="BTC").wait_for()
            await page.locator("#size-chart svg path").first.wait_for()
            await shot(page, "address")

            await page.goto(f"{base}/ui/#/market")
            await page.locator("#summary tbody tr", has_text="BTC").wait_for()
            await page.locator("#bias-chart svg rect").first.wait_for()
            # Discovery is a separate feature; without it the tab says so instead of failing.
            await page.locator("#discovery-off, #discovery").first.wait_for()
            await shot(page, "market")

            await page.goto(f"{base}/ui/#/live")
            await page.locator("#stream.green").wait_for()
            started = time.monotonic()
            await whale.market_order("BTC", False, "1", "80100")
            await page.locator("#feed li[data-signal-id]", has_text="Close Long").wait_for(timeout=LIVE_WITHIN_MS * 5)
            assert (time.monotonic() - started) * 1000 < LIVE_WITHIN_MS
            await page.locator("#feed li[data-fill-id]", has_text="Close Long").wait_for()  # fills are enabled
            await shot(page, "live")

            # Without a configured admin token the console is read-only and the admin API does not exist.
            await page.goto(f"{base}/ui/#/admin")
            await page.locator("#read-only").wait_for()
            assert await page.locator("#token").count() == 0
            status = await page.evaluate(
                "(a) => fetch('/admin/addresses', {method: 'POST', headers: {'Content-Type': 'application/json'},"
                " body: JSON.stringify({address: a})}).then(r => r.status)",
                NEW_WHALE,
            )
            assert status == 404
            assert NEW_WHALE not in service.components.book.entries()

            await page.set_viewport_size(PHONE)
            await page.goto(f"{base}/ui/#/whales")
            await wait_until_count(rows, 2)
            width = await page.evaluate("document.documentElement.scrollWidth")
            assert width <= PHONE["width"], "the page itself must not scroll sideways on a phone"
            await shot(page, "phone")
            assert problems == []


async def test_admin_in_the_page_needs_the_token_adds_a_tracked_address_and_shows_labels_as_text(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    async with service_on_sim(tmp_path, nats_server.url, HTTP__ADMIN_TOKEN=TOKEN) as (service, _):
        base = f"http://{service.components.cfg.http.listen}"
        async with browser_page() as page:
            problems = watch_for_script_problems(page)
            await page.goto(f"{base}/ui/#/admin")
            await page.fill("#token", "wrong-token")
            await page.click("form button[type=submit]")
            await page.locator(".msg.error", has_text="missing or invalid bearer token").wait_for()
            assert await page.locator("#add-form").count() == 0
            assert await page.evaluate("sessionStorage.length") == 0

            await page.fill("#token", TOKEN)
            await page.click("form button[type=submit]")
            await page.locator("#admin-table").wait_for()
            assert await page.evaluate("localStorage.length") == 0
            assert TOKEN not in page.url

            # The API's own validation message is shown.
            await page.fill("#new-address", "0x1234")
            await page.click("#add-button")
            await page.locator(".msg.error", has_text="$.address").wait_for()

            await page.fill("#new-address", NEW_WHALE)
            await page.fill("#new-label", XSS_LABEL)
            await page.click("#add-button")
            await page.locator(f'#admin-table tr[data-address="{NEW_WHALE}"]').wait_for()
            await wait_until(lambda: NEW_WHALE in service.components.book.entries(), within=5)
            await shot(page, "admin")

            await page.goto(f"{base}/ui/#/whales")
            row = page.locator(f'#whales tr[data-address="{NEW_WHALE}"]')
            await row.wait_for()
            assert await row.locator("td:nth-child(2) a").inner_text() == XSS_LABEL
            assert await page.locator("#whales img").count() == 0

            # A change made elsewhere shows up without a reload (the live feed announces it).
            async with (
                aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http,
                http.patch(f"{base}/admin/addresses/{NEW_WHALE}", json={"label": "renamed"}) as resp,
            ):
                assert resp.status == 200
            await row.locator("td:nth-child(2) a", has_text="renamed").wait_for()

            # Locking forgets the token: the page asks again, and the API refuses calls without it.
            await page.goto(f"{base}/ui/#/admin")
            await page.click("text=Lock")
            await page.locator("#token").wait_for()
            status = await page.evaluate(
                "(a) => fetch('/admin/addresses/' + a, {method: 'DELETE'}).then(r => r.status)", NEW_WHALE
            )
            assert status == 401
            assert NEW_WHALE in service.components.book.entries()
            assert problems == []


async def test_the_live_feed_in_the_page_resumes_after_a_network_drop_and_positions_update_live(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    async with service_on_sim(tmp_path, nats_server.url) as (service, sim):
        port = int(service.components.cfg.http.listen.rsplit(":", 1)[1])
        whale = sim.exchange.whale(W1)
        async with TcpRelay(port) as relay, browser_page() as page:
            problems = watch_for_script_problems(page)
            base = f"http://127.0.0.1:{relay.port}"
            await page.goto(f"{base}/ui/#/live")
            await page.locator("#stream.green").wait_for()
            signals = page.locator("#feed li[data-signal-id]")
            await whale.market_order("BTC", True, "2", "80000")
            await signals.filter(has_text="Open Long").wait_for()

            await relay.stop()  # the network drops: the stream ends and reconnecting fails until it is back
            await page.locator("#stream.amber").wait_for()
            await whale.market_order("BTC", False, "2", "80100")  # acknowledged while the page is cut off
            await wait_until(lambda: signal_acked(service, "Close Long"), within=10)
            await relay.start()
            await signals.filter(has_text="Close Long").wait_for()
            await page.locator("#stream.green").wait_for()
            ids = await signals.evaluate_all("items => items.map(i => i.dataset.signalId)")
            assert len(ids) == len(set(ids)) == 2, ids
            fills = await page.locator("#feed li[data-fill-id]").evaluate_all(
                "items => items.map(i => i.dataset.fillId)"
            )
            assert len(fills) == len(set(fills)) == 2, fills

            # The address page follows position changes as they are acknowledged (no 30 s re-read needed).
            await page.goto(f"{base}/ui/#/address/{W1}")
            await page.locator("#value-chart svg path").first.wait_for()
            assert await page.locator("#positions").count() == 0
            await whale.market_order("ETH", False, "10", "2400")
            await page.locator("#positions tbody tr", has_text="ETH").wait_for(timeout=5_000)
            await page.locator("#fills tbody tr", has_text="Open Short").wait_for(timeout=5_000)
            assert problems == []


async def signal_acked(service: Any, direction: str) -> bool:
    """A signal in `direction` was stored and acknowledged by JetStream (so the live feed has it)."""
    stored = await service.components.repo.list_signals(limit=10)
    return any(s.signal.dir == direction and s.published for s in stored)


async def test_bulk_import_edit_remove_and_the_discovery_watch_button_show_up_live_in_other_pages(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    first, second, found = ("0x" + ch * 40 for ch in "def")
    # No removal grace: a removed or deactivated address leaves the book at once.
    extra = {"HTTP__ADMIN_TOKEN": TOKEN, "ADDRESSES__REMOVE_GRACE": "0"}
    async with service_on_sim(tmp_path, nats_server.url, **extra) as (service, sim):
        base = f"http://{service.components.cfg.http.listen}"
        book = service.components.book
        await trade_on_the_tape(service, sim, found)
        async with browser_page() as admin:
            problems = watch_for_script_problems(admin)
            viewer = await admin.context.new_page()  # another tab, without the token, left open on the whales
            await viewer.goto(f"{base}/ui/#/market")
            await viewer.locator("#discovery tbody tr", has_text=found).wait_for()
            assert await viewer.locator("#discovery button").count() == 0  # no token, no watch button
            await viewer.goto(f"{base}/ui/#/whales")
            await wait_until_count(viewer.locator("#whales tbody tr"), 2)

            await admin.goto(f"{base}/ui/#/admin")
            await admin.fill("#token", TOKEN)
            await admin.click("form button[type=submit]")
            await admin.fill("#bulk", f"{first}, first whale\n{second.upper().replace('0X', '0x')},second")
            await admin.click("button:text-is('Import')")
            await admin.locator(".msg.ok", has_text="Imported 2").wait_for()
            await admin.locator(f'#admin-table tr[data-address="{second}"]').wait_for()
            await wait_until(lambda: {first, second} <= book.entries().keys(), within=5)
            await viewer.locator(f'#whales tr[data-address="{first}"]', has_text="first whale").wait_for()

            row = admin.locator(f'#admin-table tr[data-address="{first}"]')
            await row.locator("input[aria-label=label]").fill("edited")
            await row.locator("select[aria-label=tier]").select_option("wide")
            await row.locator("input[aria-label=priority]").fill("7")
            await row.locator("input[aria-label='min notional']").fill("2500")
            await row.locator("button:text-is('Save')").click()
            await admin.locator(".msg.ok", has_text=f"Updated {first}").wait_for()
            edited = viewer.locator(f'#whales tr[data-address="{first}"]', has_text="edited")
            await edited.locator("td:nth-child(3)", has_text="wide").wait_for()  # the viewer was not reloaded
            entry = book.entries()[first]
            assert (entry.label, entry.tier, entry.priority, entry.min_notional_usd) == ("edited", "wide", 7, 2500)

            await row.locator("input[aria-label=active]").uncheck()
            await row.locator("button:text-is('Save')").click()
            await wait_until(lambda: first not in book.entries(), within=5)  # inactive: no longer watched
            await wait_until_count(viewer.locator(f'#whales tr[data-address="{first}"]'), 0)

            await admin.locator(f'#admin-table tr[data-address="{second}"]').locator("button:text-is('Remove')").click()
            await admin.locator(".msg.ok", has_text=f"Removed {second}").wait_for()
            removed = admin.locator(f'#admin-table tr[data-address="{second}"] input[aria-label=active]')
            await expect(removed).not_to_be_checked()  # kept in the table as inactive, as the admin API does
            await wait_until(lambda: second not in book.entries(), within=5)
            await wait_until_count(viewer.locator(f'#whales tr[data-address="{second}"]'), 0)

            await admin.goto(f"{base}/ui/#/market")
            candidate = admin.locator("#discovery tbody tr", has_text=found)
            await candidate.locator("button", has_text="Watch").click()
            await candidate.locator("td", has_text="watching").wait_for()
            await wait_until(lambda: found in book.entries(), within=5)
            entry = book.entries()[found]
            assert entry.label.startswith("discovered:"), entry.label  # the discovery route's tag, not /admin/addresses
            assert entry.tier == "wide"
            await viewer.locator(f'#whales tr[data-address="{found}"]', has_text="discovered:").wait_for()

            # Watching it again is refused, and the page shows the API's reason.
            await admin.reload()
            await candidate.locator("button", has_text="Watch").click()
            await candidate.locator("[role=alert]", has_text=f"{found} is already watched").wait_for()
            assert book.entries()[found].label == entry.label
            assert problems == []


async def trade_on_the_tape(service: Any, sim: SimServer, address: str) -> None:
    """`address` buys on the sim once the wide tier's tape is live, and discovery has counted it."""
    wide, part = service.components.wide_tier, service.components.discovery
    assert wide is not None, "the wide tier's tape is on by default"
    assert part is not None, "discovery is on by default with the tape"
    await wait_until(lambda: wide.tape.continuous_since_ms() is not None, what="tape live")
    ex = sim.exchange
    ex.market_order(address, "ETH", True, DISCOVERED_ETH, ex.mids["ETH"])
    await wait_until(lambda: part.label_of(address) is not None, within=5, what="a discovery candidate")


async def wait_until_count(locator: Any, count: int) -> None:
    await expect(locator).to_have_count(count)


# ---------------------------------------------------------------- over plain HTTP


@contextlib.asynccontextmanager
async def console_app(feed: LiveFeed, ui: UiConfig | None = None) -> AsyncIterator[aiohttp.ClientSession]:
    cfg = HttpConfig(listen="127.0.0.1:0", admin_token=Secret(TOKEN))
    app = create_app(FakeView(), Metrics(), MemoryAdmin(), cfg, console=ConsoleDeps(feed=feed), ui=ui)
    async with (
        HttpServer(app, cfg.listen) as server,
        aiohttp.ClientSession(base_url=f"http://127.0.0.1:{server.port}") as session,
    ):
        yield session


async def read_events(resp: aiohttp.ClientResponse, count: int) -> list[tuple[str, str, str]]:
    """`count` (id, event, data) triples from an open SSE response."""
    events: list[tuple[str, str, str]] = []
    current: dict[str, str] = {}
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if not line:
            if "id" in current:
                events.append((current["id"], current["event"], current["data"]))
                if len(events) == count:
                    return events
            current = {}
            continue
        key, _, value = line.partition(": ")
        current[key] = value
    raise AssertionError(f"stream ended after {events}")


async def test_the_live_feed_resumes_after_a_drop_without_repeating_an_event() -> None:
    feed = LiveFeed()
    async with console_app(feed) as http:
        async with http.get("/ui/events") as resp:
            assert resp.headers["Content-Type"] == "text/event-stream"
            assert (await resp.content.readline()).startswith(b"retry:")  # written after subscribing
            feed.publish("signal", {"signal_id": "s1"})
            feed.publish("signal", {"signal_id": "s2"})
            first = await read_events(resp, 2)
        # Dropped; meanwhile two more are published. The browser reconnects with the last id it saw.
        feed.publish("signal", {"signal_id": "s3"})
        feed.publish("signal", {"signal_id": "s4"})
        async with http.get("/ui/events", headers={"Last-Event-ID": first[-1][0]}) as resp:
            assert (await resp.content.readline()).startswith(b"retry:")
            feed.publish("signal", {"signal_id": "s5"})
            resumed = await read_events(resp, 3)
    assert [data for _, _, data in first + resumed] == [f'{{"signal_id":"s{i}"}}' for i in range(1, 6)]


async def test_acknowledged_fills_and_position_events_go_live_as_published() -> None:
    feed = LiveFeed()

    def publication(kind: Any, msg_id: str) -> Publication:
        return Publication(
            msg_id=msg_id, kind=kind, subject="hl.x", payload=f'{{"id":"{msg_id}"}}'.encode(), created_at=1
        )

    async with console_app(feed) as http, http.get("/ui/events") as resp:
        assert (await resp.content.readline()).startswith(b"retry:")
        feed.publication(publication("fill", "f1"))
        feed.publication(publication("alert", "a1"))  # alerts have their own stream, not the console's feed
        feed.publication(publication("position_event", "p1"))
        feed.publish("signal", {"signal_id": "s1"})
        events = await read_events(resp, 3)
    assert [(kind, data) for _, kind, data in events] == [
        ("fill", '{"id":"f1"}'),
        ("position", '{"id":"p1"}'),
        ("signal", '{"signal_id":"s1"}'),
    ]


async def test_console_pages_carry_a_strict_csp_and_ui_enabled_false_removes_them() -> None:
    async with console_app(LiveFeed()) as http:
        async with http.get("/ui/") as resp:
            assert resp.status == 200
            html = await resp.text()
            assert resp.headers["Content-Security-Policy"] == CSP
        # Nothing inline, nothing from elsewhere.
        assert "<script>" not in html
        assert "http://" not in html
        assert "https://" not in html
        async with http.get("/ui/config.json") as resp:
            assert (await resp.json())["admin"] is True
    async with console_app(LiveFeed(), UiConfig(read_only=True)) as http, http.get("/ui/config.json") as resp:
        assert (await resp.json())["admin"] is False
    async with console_app(LiveFeed(), UiConfig(enabled=False)) as http:
        async with http.get("/ui/") as resp:
            assert resp.status == 404
        async with http.get("/ui/events") as resp:
            assert resp.status == 404


def test_a_slow_browser_loses_events_counted_and_never_blocks_the_publisher() -> None:
    drops: list[int] = []
    feed = LiveFeed(on_drop=lambda: drops.append(1))
    queue = feed.subscribe()
    for i in range(queue.maxsize + 3):
        feed.publish("signal", {"n": i})
    assert queue.qsize() == queue.maxsize
    assert feed.dropped == len(drops) == 3
