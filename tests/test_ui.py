"""The seller dashboard in a real browser: Debian's chromium driven by Playwright against a real
``cancel-risk serve --live`` on loopback, with a simulated shop replayed into its book.

It logs in, filters to high risk, opens an order, switches the language, compares the what-if
numbers with ``/v1/whatif``, checks the pages with axe-core (no serious or critical violation),
watches the table refresh as the book changes and writes the three pages' screenshots under
``reports/ui/`` (the README shows them).
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from live_service import KEY, LiveService, run_cli

from live.book import OrderBook, iso_time, score_inputs

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="make test installs chromium; run through make"
)
SCREENSHOTS = Path(__file__).resolve().parents[1] / "reports" / "ui"
REFRESH_SECONDS = 1.0


@pytest.fixture(scope="module")
def service(
    simulated_history: Path, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveService]:
    """The live service with the whole simulated shop replayed and swept (the cause analysis
    computed): what a seller sees after switching the service on."""
    work = tmp_path_factory.mktemp("ui")
    live = LiveService(
        tiny_model_dir,
        f"sqlite:///{work / 'book.db'}",
        work,
        env={"CANCEL_RISK_UI_REFRESH_SECONDS": str(REFRESH_SECONDS)},
    )
    live.start()
    try:
        run_cli(
            "replay",
            "--history",
            str(simulated_history),
            "--url",
            live.url,
            "--speed",
            "0",
            "--api-key",
            KEY,
            cwd=work,
        )
        live.sweep()
        yield live
    finally:
        live.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Any, service: LiveService) -> Iterator[Any]:
    """A fresh browser context (no cookies), its console errors collected."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-US")
    opened = context.new_page()
    opened.errors = []
    opened.on("pageerror", lambda error: opened.errors.append(str(error)))
    opened.on("console", lambda m: opened.errors.append(m.text) if m.type == "error" else None)
    yield opened
    context.close()


def log_in(page: Any, service: LiveService, key: str = KEY) -> None:
    page.goto(f"{service.url}/ui")
    page.fill("#api_key", key)
    page.click("form.login button[type=submit]")


def serious_violations(page: Any) -> list[str]:
    """axe-core's violations of impact serious or critical, as "rule: first target"."""
    from axe_playwright_python.sync_playwright import Axe

    results = Axe().run(page)
    return [
        f"{v['id']}: {v['nodes'][0]['target'] if v['nodes'] else ''}"
        for v in results.response["violations"]
        if v["impact"] in ("serious", "critical")
    ]


def screenshot(page: Any, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 20_000
    return path


def api(service: LiveService) -> httpx.Client:
    return httpx.Client(base_url=service.url, headers={"X-API-Key": KEY}, timeout=60)


def what_if_request(service: LiveService, number: str, as_of: int, lang: str) -> dict:
    """The ``POST /v1/whatif`` body of a posting with the records the book holds."""
    book = OrderBook(service.db_url)
    try:
        with book.engine.connect() as connection:
            held = score_inputs(connection, [number])[number]
    finally:
        book.close()
    return {
        "posting": held.posting,
        "pushes": held.pushes,
        "prices": held.prices,
        "tracking": held.tracking,
        "as_of": iso_time(as_of),
        "lang": lang,
    }


def shown_what_if(page: Any) -> dict[str, tuple[float, float, str]]:
    rows = page.locator("table.what-if tbody tr")
    return {
        rows.nth(i).get_attribute("data-action"): (
            float(rows.nth(i).get_attribute("data-before")),
            float(rows.nth(i).get_attribute("data-after")),
            rows.nth(i).locator("td").first.inner_text(),
        )
        for i in range(rows.count())
    }


def answered_what_if(answer: dict) -> dict[str, tuple[float, float, str]]:
    return {
        a["action"]: (answer["probability"], a["probability_after"], a["title"])
        for a in answer["actions"]
    }


def assert_same_what_if(shown: dict, answered: dict) -> None:
    assert shown.keys() == answered.keys()
    for action, (before, after, title) in shown.items():
        assert before == pytest.approx(answered[action][0], abs=1e-12)
        assert after == pytest.approx(answered[action][1], abs=1e-12)
        assert title == answered[action][2]


# --- the browser ----------------------------------------------------------------------------------


def test_login_keeps_a_strict_http_only_session_that_expires(
    page: Any, service: LiveService
) -> None:
    page.goto(f"{service.url}/ui?risk=high")
    assert page.url.endswith("/ui/login?next=%2Fui%3Frisk%3Dhigh")
    assert serious_violations(page) == []
    page.fill("#api_key", "not-a-key")
    page.click("form.login button[type=submit]")
    assert page.locator("[role=alert]").is_visible()
    assert page.locator("#api_key").get_attribute("aria-invalid") == "true"
    page.fill("#api_key", KEY)
    started = time.time()
    page.click("form.login button[type=submit]")
    assert page.url == f"{service.url}/ui?risk=high"
    (cookie,) = [c for c in page.context.cookies() if c["name"] == "cancel_risk_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/ui"
    assert started + 11.9 * 3600 < cookie["expires"] < time.time() + 12 * 3600 + 5
    assert KEY not in cookie["value"]
    assert "cancel_risk_session" not in page.evaluate("document.cookie")
    page.click("form.logout button")
    assert "/ui/login" in page.url
    page.goto(f"{service.url}/ui")
    assert "/ui/login" in page.url


def test_filter_to_high_open_an_order_and_read_its_what_if(page: Any, service: LiveService) -> None:
    log_in(page, service)
    high = service.status()["open_by_risk"].get("high", 0)
    assert high > 0
    page.select_option("#f-risk", "high")
    page.click("form.filters button[type=submit]")
    assert "risk=high" in page.url
    rows = page.locator("table.orders tbody tr[data-posting]")
    assert rows.count() == min(50, high)
    assert {rows.nth(i).get_attribute("data-level") for i in range(rows.count())} == {"high"}
    assert page.locator('.counts [data-level="high"]').inner_text() == f"{high:,}"
    shown = [
        float(rows.nth(i).locator("td[data-probability]").get_attribute("data-probability"))
        for i in range(rows.count())
    ]
    assert shown == sorted(shown, reverse=True)
    assert serious_violations(page) == []
    screenshot(page, "orders.png")

    number = rows.first.get_attribute("data-posting")
    rows.first.locator("a").first.click()
    assert page.url.endswith(f"/ui/orders/{number}")
    assert page.locator("svg.timeline-chart").count() == 1
    assert page.locator("svg.timeline-chart .risk-point").count() >= 1
    assert page.locator("ol.reasons li").count() >= 1
    as_of = int(page.locator("#what-if").get_attribute("data-as-of"))
    shown_actions = shown_what_if(page)
    assert "confirm_with_buyer" in shown_actions
    with api(service) as client:
        live_answer = client.get(f"/v1/postings/{number}/whatif").raise_for_status().json()
        body = what_if_request(service, number, as_of, "en")
        posted = client.post("/v1/whatif", json=body).raise_for_status().json()
        view = client.get(f"/v1/postings/{number}").raise_for_status().json()
    assert_same_what_if(shown_actions, answered_what_if(live_answer))
    assert_same_what_if(shown_actions, answered_what_if(posted))
    assert posted["probability"] == pytest.approx(view["score"]["probability"], abs=1e-9)
    first_row = page.locator("table.what-if tbody tr").first.inner_text()
    assert re.search(r"\d+\.\d %\s*→\s*\d+\.\d %", first_row)
    assert serious_violations(page) == []
    screenshot(page, "order.png")
    assert page.errors == []


def test_the_language_is_switched_and_remembered(page: Any, service: LiveService) -> None:
    log_in(page, service)
    number = page.locator("table.orders tbody tr[data-posting]").first.get_attribute("data-posting")
    page.goto(f"{service.url}/ui/orders/{number}")
    page.click('nav.langs a[lang="zh"]')
    assert page.url.endswith(f"/ui/orders/{number}")
    assert page.locator("html").get_attribute("lang") == "zh"
    assert page.locator("h1").inner_text() == f"订单 {number}"
    with api(service) as client:
        answer = client.get(f"/v1/postings/{number}/whatif", params={"lang": "zh"}).json()
    assert_same_what_if(shown_what_if(page), answered_what_if(answer))
    page.goto(f"{service.url}/ui")
    assert page.locator("html").get_attribute("lang") == "zh"
    assert page.locator("h1").inner_text().startswith("在途订单")
    page.click('nav.langs a[lang="ru"]')
    assert page.locator("html").get_attribute("lang") == "ru"
    assert page.locator("h1").inner_text().startswith("Открытые заказы")
    assert serious_violations(page) == []


def test_the_causes_page_draws_the_shops_charts(page: Any, service: LiveService) -> None:
    log_in(page, service)
    page.click("text=Causes")
    assert page.url.endswith("/ui/causes")
    charts = page.locator("svg.chart")
    assert charts.count() == 8  # today's risk by cause, and the rates by seven dimensions
    for i in range(charts.count()):
        assert charts.nth(i).locator("rect").count() >= 1
        assert charts.nth(i).bounding_box()["width"] > 300
    assert serious_violations(page) == []
    screenshot(page, "causes.png")


def test_the_table_refreshes_as_the_book_changes(page: Any, service: LiveService) -> None:
    log_in(page, service)
    page.evaluate("window.stillTheSamePage = true")
    total = page.locator("table.orders caption").inner_text()
    with api(service) as client:
        found = client.get("/v1/postings", params={"limit": 1}).raise_for_status().json()
        number = found["postings"][0]["posting_number"]
        posting = client.get(f"/v1/postings/{number}").raise_for_status().json()
    assert posting["open"]
    book = OrderBook(service.db_url)
    try:
        with book.engine.connect() as connection:
            held = score_inputs(connection, [number])[number].posting
    finally:
        book.close()
    twin = orjson.loads(orjson.dumps(held))
    twin["posting_number"] = f"{number}-twin"
    with api(service) as client:
        stored = client.post("/v1/postings", json={"postings": [twin]}).raise_for_status()
    assert stored.json()["stored"] == 1
    page.wait_for_function(
        "(before) => document.querySelector('table.orders caption').innerText !== before",
        arg=total,
        timeout=60_000,
    )
    assert page.evaluate("window.stillTheSamePage") is True
    assert page.errors == []


def test_pages_fit_a_phone_screen(browser: Any, service: LiveService) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    phone = context.new_page()
    try:
        log_in(phone, service)
        number = phone.locator("table.orders tbody tr[data-posting]").first.get_attribute(
            "data-posting"
        )
        for path in ("/ui", f"/ui/orders/{number}", "/ui/causes"):
            phone.goto(f"{service.url}{path}")
            width = phone.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, f"{path} is {width} px wide on a 390 px screen"
    finally:
        context.close()


# --- plain HTTP -----------------------------------------------------------------------------------


@pytest.fixture
def session(service: LiveService) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.url, timeout=60) as client:
        answer = client.post("/ui/login", data={"api_key": KEY, "next": "/ui"})
        assert answer.status_code == 303
        yield client


def test_pages_forbid_inline_scripts_and_other_origins(session: httpx.Client) -> None:
    answer = session.get("/ui")
    assert answer.status_code == 200
    policy = answer.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert answer.headers["cache-control"] == "no-store"
    assert "<script>" not in answer.text and "http://" not in answer.text.replace(
        'xmlns="http://www.w3.org/2000/svg"', ""
    )


def test_the_refresh_fragment_needs_the_session_and_answers_304_when_unchanged(
    session: httpx.Client, service: LiveService
) -> None:
    with httpx.Client(base_url=service.url) as anonymous:
        assert anonymous.get("/ui/orders/rows").status_code == 401
        assert anonymous.get("/ui").status_code == 303
    first = session.get("/ui/orders/rows", params={"risk": "medium"})
    assert first.status_code == 200 and first.headers["etag"]
    again = session.get(
        "/ui/orders/rows",
        params={"risk": "medium"},
        headers={"If-None-Match": first.headers["etag"]},
    )
    assert again.status_code == 304


def test_login_never_redirects_elsewhere(service: LiveService) -> None:
    with httpx.Client(base_url=service.url) as client:
        for target in ("https://evil.example/", "//evil.example/ui", "/ui/../v1/model", "/v1"):
            answer = client.post("/ui/login", data={"api_key": KEY, "next": target})
            assert answer.headers["location"] == "/ui", target
        wrong = client.post("/ui/login", data={"api_key": "wrong", "next": "/ui"})
        assert wrong.status_code == 401 and "cancel_risk_session" not in wrong.headers.get(
            "set-cookie", ""
        )


def test_an_unknown_order_is_a_404_page(session: httpx.Client) -> None:
    answer = session.get("/ui/orders/no-such-posting")
    assert answer.status_code == 404
    assert "no-such-posting" in answer.text


def test_sorting_and_paging_follow_the_links(session: httpx.Client, service: LiveService) -> None:
    def probabilities(params: dict) -> list[float]:
        html = session.get("/ui", params=params).text
        return [
            float(v) for v in re.findall(r'<td class="num" data-probability="([0-9.e-]+)"', html)
        ]

    descending = probabilities({})
    ascending = probabilities({"dir": "asc"})
    assert descending == sorted(descending, reverse=True) and len(descending) == 50
    assert ascending == sorted(ascending)
    assert ascending[0] <= descending[-1]
    pages = -(-service.status()["open"] // 50)
    last = probabilities({"page": pages})
    assert 0 < len(last) <= 50
    assert probabilities({"page": pages + 1}) == []
    assert probabilities({"page": "abc", "sort": "nonsense", "risk": "extreme"}) == descending
