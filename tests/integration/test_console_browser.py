"""The ops console in a real headless Chromium (Debian's `chromium`, driven by Playwright;
Playwright never downloads a browser of its own here): `aftersales run console` as a
process on the test's database and vhost, intake running beside it."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from services.intake.consumer import IntakeConsumer
from services.intake.processor import IntakeProcessor
from shared.amqp import REJECTED_QUEUE
from shared.db.models import CaseRow
from shared.db.session import Database
from shared.domain import Engine, RuleBook, WorkCalendar
from shared.notifications.policy import NotificationPolicy
from tests.conftest import wait_for
from tests.harness import publish_events
from tests.resources import free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def console(database_url: str, amqp_url: str, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[str]:
    port = free_port()
    log = open(tmp_path_factory.mktemp("console") / "console.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "aftersales_cli.cli", "run", "console"], cwd=ROOT,
        env={**os.environ, "AFTERSALES_DATABASE_URL": database_url,
             "AFTERSALES_AMQP_URL": amqp_url, "AFTERSALES_CONSOLE_PORT": str(port)},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, Path(log.name).read_text()
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    wait_for(up, timeout=60, what="the console to answer")
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Debian's chromium is needed (scripts/setup.sh installs it)"
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                     headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    tab = context.new_page()
    tab.set_default_timeout(30_000)
    yield tab
    context.close()


@pytest.fixture
def processor(db: Database) -> IntakeProcessor:
    return IntakeProcessor(db, Engine(RuleBook.load(None), WorkCalendar(None)),
                           NotificationPolicy.load(None), {"emails": [], "phones": []},
                           max_event_bytes=1024)


def opened(case: str, at: datetime, shop: str = "SHOP-1", platform: str = "kuaishou",
           pad: int = 0, kind: str = "exchange") -> dict[str, Any]:
    return {"event_id": f"{case}-open", "type": "case.opened", "occurred_at": at.isoformat(),
            "platform": platform, "shop_id": shop, "order_id": f"O-{case}", "case_id": case,
            "data": {"kind": kind, "amount_fen": 990, "reason": "x" * pad,
                     "merchant": {"email": "merchant.wang@example.com", "phone": "13912345678"}}}


def apply(processor: IntakeProcessor, *events: dict[str, Any]) -> None:
    result = processor.process([json.dumps(e).encode() for e in events])
    assert not result.rejected and all(h.outcome == "accepted" for h in result.handled)


def depth(amqp: Any, queue: str) -> int:
    return int(amqp.queue_declare(queue, passive=True).method.message_count)


def figure(page: Any, ident: str) -> str:
    return str(page.inner_text(f"#{ident} b")).strip()


def test_the_overview_shows_live_figures(
    console: str, page: Any, db: Database, processor: IntakeProcessor, amqp: Any,
    amqp_url: str, running_intake: IntakeConsumer
) -> None:
    now = datetime.now(UTC)
    apply(processor, opened("AS-OV-1", now - timedelta(days=3)),
          opened("AS-OV-2", now - timedelta(hours=1), platform="kuaishou"),
          opened("AS-OV-3", now - timedelta(hours=1), kind="refund_only"))
    publish_events(amqp_url, [b"{broken", b'{"type": "case.opened"}'])
    wait_for(lambda: depth(amqp, REJECTED_QUEUE) == 2, what="2 rejected messages")

    page.goto(console + "/")
    assert figure(page, "open-cases") == "3"
    assert figure(page, "overdue") == "1"  # opened 3 days ago: past its 48 h
    assert figure(page, "rejected") == "2"
    assert figure(page, "unrouted") == "0"
    backlog = page.inner_text("#backlog")
    assert "kuaishou" in backlog and "refund_only" in backlog
    if os.environ.get("AFTERSALES_CONSOLE_SCREENSHOT"):
        page.screenshot(path=os.environ["AFTERSALES_CONSOLE_SCREENSHOT"], full_page=True)

    apply(processor, opened("AS-OV-4", now))
    page.reload()
    assert figure(page, "open-cases") == "4"  # live, not cached
    page.click("#overdue a")
    assert "overdue=yes" in page.url
    assert page.locator("#results tr").count() == 1 + 1
    assert "AS-OV-1" in page.inner_text("#results")


def test_a_search_finds_a_case_and_its_page_explains_it(
    console: str, page: Any, db: Database, processor: IntakeProcessor
) -> None:
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
    apply(processor, opened("AS-FIND-1", t0, shop="SHOP-FIND"),
          opened("AS-OTHER-1", t0, shop="SHOP-ELSE"))
    page.goto(console + "/cases")
    page.fill("input[name=shop]", "SHOP-FIND")
    page.select_option("select[name=status]", "open")
    page.click("form.filters button")
    page.wait_for_url("**/cases?*shop=SHOP-FIND*")
    results = page.inner_text("#results")
    assert "AS-FIND-1" in results and "AS-OTHER-1" not in results
    assert "status=open" in page.url  # the filters are in the link

    page.click("text=AS-FIND-1")
    page.wait_for_url("**/cases/AS-FIND-1")
    timeline = page.inner_text("#timeline")
    assert "case.opened" in timeline and "[applied]" in timeline
    deadlines = page.inner_text("#deadlines")
    assert "merchant_response" in deadlines and "48h = 48 h from the step's start" in deadlines
    assert "the rule gives" in deadlines
    recipients = page.locator(".recipient").all_inner_texts()
    assert recipients and all("***" in r for r in recipients)
    assert "merchant.wang@example.com" not in page.content()
    assert "13912345678" not in page.content()


def test_an_ops_pause_from_the_case_page_goes_through_intake(
    console: str, page: Any, db: Database, processor: IntakeProcessor,
    running_intake: IntakeConsumer
) -> None:
    apply(processor, opened("AS-WEB-OPS", datetime.now(UTC) - timedelta(hours=1)))
    page.goto(console + "/cases/AS-WEB-OPS")
    form = page.locator("#action-pause")
    form.locator("input[name=reason]").fill("merchant asked for time")
    form.locator("input[name=by]").fill("dora")
    form.locator("button").click()
    page.wait_for_selector("#done")
    assert "intervention.requested: applied" in page.inner_text("#done")
    assert "ops, by dora: merchant asked for time" in page.inner_text("#timeline")
    assert "intervention by dora" in page.inner_text("#pauses")
    with db.transaction() as s:
        assert s.execute(select(CaseRow.step).where(
            CaseRow.case_id == "AS-WEB-OPS")).scalar_one() == "intervention"


def test_a_replay_from_the_rejected_page_puts_messages_back_through_intake(
    console: str, page: Any, db: Database, processor: IntakeProcessor, amqp: Any,
    amqp_url: str, running_intake: IntakeConsumer
) -> None:
    now = datetime.now(UTC)
    big = [opened(f"AS-RP-{n}", now, pad=1500) for n in range(3)]  # over intake's limit
    publish_events(amqp_url, [*big, b"{still broken"])
    wait_for(lambda: depth(amqp, REJECTED_QUEUE) == 4, what="4 rejected messages")
    # upstream fixed: now they fit
    processor.limits = dataclasses.replace(processor.limits, max_bytes=64 * 1024)

    page.goto(console + "/held/rejected?reason=oversized")
    assert page.locator("#held tr").count() == 1 + 3
    page.click("#replay-all")
    page.wait_for_selector("#to-replay")
    assert page.locator("#to-replay tr").count() == 1 + 3
    assert depth(amqp, REJECTED_QUEUE) == 4  # nothing happens before the confirmation
    page.click("#confirm")
    page.wait_for_selector("#replayed")
    assert "Replayed 3 rejected messages" in page.inner_text("#replayed")

    def cases() -> set[str]:
        with db.transaction() as s:
            return set(s.execute(select(CaseRow.case_id)).scalars())

    wait_for(lambda: {e["case_id"] for e in big} <= cases(), what="the replayed cases")
    assert depth(amqp, REJECTED_QUEUE) == 1  # the broken one stays
