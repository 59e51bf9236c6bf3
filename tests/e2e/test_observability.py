"""Observability on the real services (issue 6, "What must show it").

1. Every service's ``/metrics`` is scraped before and after a burst of real traffic
   (cases whose platform deadline passes, a duplicate, a malformed message, an
   out-of-state event, notifications sent and deferred, a poisoned resolver message): the
   counters move by exactly what happened, the timer's backlog gauges equal what
   PostgreSQL holds, and no label value carries a case, order or shop id, a phone number
   or an email address.
2. A real Prometheus (``/usr/bin/prometheus``) scrapes the four services (and RabbitMQ's
   plugin when it answers) with the job names of ``deploy/prometheus/prometheus.yml`` and
   the rules of ``alerts.yml``; every query of every Grafana panel
   (``deploy/grafana/queries.py``) must be valid and return data. The few panels that no
   traffic can fill are listed in :data:`EXPECTED_EMPTY` with the reason, strictly: a
   listed panel that does return data fails the test, so the list cannot rot.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import time
import urllib.error
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import dramatiq
import httpx
import pika
import pytest
import yaml
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Connection, text

from shared.amqp import FIRE_DEADLINE_ACTOR, RESOLVER_QUEUE
from shared.db.session import Database
from tests.conftest import wait_for
from tests.harness import ROOT, Gateway, System, publish_events
from tests.resources import free_port

pytestmark = pytest.mark.e2e

SERVICES = ("intake", "timer", "resolver", "notifier")
PROMETHEUS = Path("/usr/bin/prometheus")
RABBITMQ_METRICS = "http://127.0.0.1:15692/metrics/per-object"
DUE_IN = 3.0  # seconds until the platform deadline of the cases meant to be auto-approved
N_AUTO = 3  # such cases per burst

# (dashboard, panel title, refId) -> why it is empty after any traffic a test can send.
# Strict: if one of these returns data, the test fails and asks for the entry's removal.
EXPECTED_EMPTY: dict[tuple[str, str, str], str] = {
    # Every panel gets data from the test's traffic; add an entry only with its reason.
}


# ----------------------------------------------------------------------------- scraping
Scrape = dict[str, list[Metric]]


# A known bug outside this test: in multi-process mode a worker creating its .db file
# (its first metric of a type) leaves it empty for an instant (prometheus_client 0.26
# MmapedDict opens, then truncates), and a scrape reading it then fails with this error
# (HTTP 500, "metrics collection failed" in the service log). The fix belongs in
# shared.metrics.build_registry (skip empty files). Until then a scrape failing with this
# signature, and only this one, is retried here, counted and printed.
EMPTY_FILE_RACE = "actual buffer size is 0"
failed_scrapes: list[str] = []


def metrics_text(system: System, service: str) -> str:
    for attempt in range(3):
        try:
            return system.metrics(service)
        except urllib.error.HTTPError as exc:
            known = system.log(service).count(EMPTY_FILE_RACE) > failed_scrapes.count(service)
            if exc.code != 500 or not known or attempt == 2:
                raise
            failed_scrapes.append(service)
    raise AssertionError("unreachable")


def scrape(system: System) -> Scrape:
    return {s: list(text_string_to_metric_families(metrics_text(system, s))) for s in SERVICES}


def total(scraped: Scrape, name: str, service: str | None = None, /, **labels: str) -> float:
    """Sum of the samples called `name` (of one `service`, or all) whose labels include
    `labels`."""
    return sum(
        sample.value
        for svc, families in scraped.items() if service in (None, svc)
        for family in families
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def by_labels(scraped: Scrape, service: str, name: str, *keys: str) -> dict[tuple[str, ...], int]:
    out: dict[tuple[str, ...], int] = {}
    for family in scraped[service]:
        for sample in family.samples:
            if sample.name == name and sample.value:
                key = tuple(sample.labels[k] for k in keys)
                out[key] = out.get(key, 0) + int(sample.value)
    return out


def label_values(scraped: Scrape) -> Iterator[tuple[str, str, str, str]]:
    """(service, sample name, label, value) of every label of every sample."""
    for service, families in scraped.items():
        for family in families:
            for sample in family.samples:
                for label, value in sample.labels.items():
                    yield service, sample.name, label, value


# ----------------------------------------------------------------------------- traffic
def zone_at_local_hour(hour: int) -> str:
    """A fixed-offset IANA zone in which it is now `hour` o'clock: recipients there are
    outside (hour=13) or inside (hour=3) the notifier's quiet hours (22:00-08:00),
    whenever the test runs."""
    offset = (hour - datetime.now(UTC).hour + 12) % 24 - 12  # -12 .. +11
    return "Etc/GMT" if offset == 0 else f"Etc/GMT{-offset:+d}"  # POSIX sign: GMT-8 = UTC+8


@dataclass
class Traffic:
    """One burst of upstream traffic, its ids made unique by `token`."""

    token: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    first: list[dict[str, Any] | bytes] = field(default_factory=list)
    second: list[dict[str, Any]] = field(default_factory=list)  # events on cases of `first`
    opened: list[str] = field(default_factory=list)
    auto: list[str] = field(default_factory=list)  # deadline passes in DUE_IN s
    phones: list[str] = field(default_factory=list)
    emails: list[str] = field(default_factory=list)
    accepted: int = 0
    duplicate: int = 0
    rejected: int = 0
    out_of_state: int = 0
    _phone_base: int = field(default_factory=lambda: 10**9 + uuid.uuid4().int % (8 * 10**9))

    def case_id(self, name: str) -> str:
        return f"OBS{self.token}-{name}"

    def event(self, case_id: str, type_: str, *, due_in: float | None = None,
              data: dict[str, Any] | None = None) -> dict[str, Any]:
        now = datetime.now(UTC)
        doc: dict[str, Any] = {
            "event_id": f"{case_id}-{type_}", "type": type_, "occurred_at": now.isoformat(),
            "platform": "kuaishou", "shop_id": f"SHOP{self.token}",
            "order_id": f"ORD{self.token}-{case_id}", "case_id": case_id, "data": data or {},
        }
        if due_in is not None:
            doc["due_at"] = (now + timedelta(seconds=due_in)).isoformat()
        return doc

    def contact(self, case_id: str, party: str, tz: str) -> dict[str, str]:
        phone = f"1{self._phone_base + len(self.phones):010d}"
        email = f"{party}.{case_id.lower()}@example.com"
        self.phones.append(phone)
        self.emails.append(email)
        return {"phone": phone, "email": email, "tz": tz}

    def open(self, name: str, *, kind: str = "exchange", due_in: float | None = None,
             night: bool = False) -> str:
        """case.opened; the merchant hears of it by SMS and email (deferred at night)."""
        case_id = self.case_id(name)
        tz = zone_at_local_hour(3 if night else 13)
        self.first.append(self.event(case_id, "case.opened", due_in=due_in, data={
            "kind": kind, "amount_fen": 5000, "reason": "质量问题",
            "buyer": self.contact(case_id, "buyer", tz),
            "merchant": self.contact(case_id, "merchant", tz),
        }))
        self.opened.append(case_id)
        self.accepted += 1
        return case_id

    @classmethod
    def standard(cls, n_auto: int = N_AUTO) -> Traffic:
        t = cls()
        for i in range(n_auto):
            t.auto.append(t.open(f"auto{i}", due_in=DUE_IN))  # -> decision.auto_approved
        t.open("repair", kind="repair")  # stays open: repair share, pending deadlines
        idle = t.open("idle")
        answered = t.open("answered")
        cancelled = t.open("cancelled")
        t.open("night", night=True)  # its notifications are deferred (quiet hours)
        t.first.append(dict(t.first[0]))  # the same event_id again
        t.duplicate += 1
        t.first.append(b"{not json")
        t.rejected += 1
        # Second wave, once the cases exist (one intake batch is ordered by case id, not
        # arrival: an event before its case.opened would be parked, not applied).
        t.second.append(t.event(answered, "merchant.approved"))  # buyer hears of it
        t.accepted += 1
        t.second.append(t.event(cancelled, "buyer.cancelled"))  # closes: time to resolution
        t.accepted += 1
        t.second.append(t.event(idle, "merchant.received"))  # nothing was shipped back
        t.out_of_state += 1
        return t

    def secrets(self) -> list[str]:
        """Strings no label value may contain."""
        return [self.token.lower(), *self.phones, *self.emails]


def poison_resolver(amqp_url: str, retries: int = 1) -> None:
    """A message the resolver cannot decode (fire_deadlines("poison")): `retries` times
    counted as `retry`, then once as `error` (and dead-lettered)."""
    message = dramatiq.Message(
        queue_name=RESOLVER_QUEUE, actor_name=FIRE_DEADLINE_ACTOR, args=("poison",),
        kwargs={}, options={"max_retries": retries, "min_backoff": 10, "max_backoff": 50},
    )
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish("", RESOLVER_QUEUE, message.encode(),
                              pika.BasicProperties(delivery_mode=2), mandatory=True)
    finally:
        connection.close()


def rows(db: Database, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    with db.transaction() as s:
        return [tuple(r) for r in s.execute(text(sql), params)]


def send(traffic: Traffic, db: Database, amqp_url: str) -> None:
    """Both waves; the second once intake has opened every case of the first."""
    publish_events(amqp_url, traffic.first)
    wait_for(lambda: rows(db, "SELECT count(*) FROM cases WHERE case_id = ANY(:ids)",
                          ids=traffic.opened)[0][0] == len(traffic.opened),
             timeout=30, interval=0.1, what="intake to open the burst's cases")
    publish_events(amqp_url, traffic.second)


def settle(check: Callable[[], list[str]], timeout: float, what: str) -> None:
    """Poll `check()` (a list of unmet expectations) until it is empty; fail with the
    last list after `timeout` s."""
    last: list[str] = []

    def done() -> bool:
        nonlocal last
        last = check()
        return not last

    try:
        wait_for(done, timeout=timeout, interval=0.25, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; still unmet:\n  " + "\n  ".join(last)) from None


# ------------------------------------------------------------------ 1. /metrics moves
def test_metrics_move_as_work_flows(system: System, db: Database, amqp_url: str) -> None:
    started = time.monotonic()
    before = scrape(system)
    traffic = Traffic.standard()
    send(traffic, db, amqp_url)
    poison_resolver(amqp_url)

    n = len(traffic.auto)
    after: Scrape = {}

    def d(name: str, service: str | None = None, /, **labels: str) -> float:
        return total(after, name, service, **labels) - total(before, name, service, **labels)

    def unmet() -> list[str]:
        nonlocal after
        after = scrape(system)
        problems: list[str] = []

        def expect(what: str, got: float, want: float, at_least: bool = False) -> None:
            if (got < want) if at_least else (got != want):
                problems.append(f"{what}: {got:g}, want {'>= ' if at_least else ''}{want:g}")

        received = "aftersales_events_received_total"
        for outcome in ("accepted", "duplicate", "rejected", "out_of_state"):
            expect(f"{received}{{outcome={outcome}}} delta",
                   d(received, "intake", outcome=outcome), getattr(traffic, outcome))
        expect("aftersales_events_rejected_total{reason=invalid_json} delta",
               d("aftersales_events_rejected_total", "intake", reason="invalid_json"), 1)
        expect("aftersales_decisions_total{type=decision.auto_approved} delta",
               d("aftersales_decisions_total", "resolver", type="decision.auto_approved"), n)
        expect("aftersales_decisions_published_total delta",
               d("aftersales_decisions_published_total", "resolver"), n, at_least=True)
        expect("aftersales_timer_fired_total{purpose=deadline} delta",
               d("aftersales_timer_fired_total", "timer", purpose="deadline"), n, True)
        expect("aftersales_timer_lateness_seconds_count delta",
               d("aftersales_timer_lateness_seconds_count", "timer"), n, True)
        expect("aftersales_sla_steps_total{result=missed} delta",
               d("aftersales_sla_steps_total", result="missed"), n)
        expect("aftersales_sla_steps_total{result=met} delta (approved in time)",
               d("aftersales_sla_steps_total", result="met"), 1)
        expect("aftersales_time_to_first_response_seconds_count delta",
               d("aftersales_time_to_first_response_seconds_count"), n + 1)
        expect("aftersales_time_to_resolution_seconds_count delta (the cancelled case)",
               d("aftersales_time_to_resolution_seconds_count"), 1)
        actor = "aftersales_actor_messages_total"
        # The timer hands several due deadlines over in one message: at least one.
        expect("resolver fire_deadlines ok delta",
               d(actor, "resolver", service="resolver", actor=FIRE_DEADLINE_ACTOR,
                 outcome="ok"), 1, True)
        expect("resolver fire_deadlines retry delta (poisoned message)",
               d(actor, "resolver", service="resolver", actor=FIRE_DEADLINE_ACTOR,
                 outcome="retry"), 1)
        expect("resolver fire_deadlines error delta (poisoned message)",
               d(actor, "resolver", service="resolver", actor=FIRE_DEADLINE_ACTOR,
                 outcome="error"), 1)

        # Notifications: every row handled, and the counters say exactly how.
        status = {(c, s): int(k) for c, s, k in rows(
            db, "SELECT channel, status, count(*) FROM notifications GROUP BY 1, 2")}
        busy = {k: v for k, v in status.items() if k[1] in ("pending", "sending")}
        if busy:
            problems.append(f"notifications not handled yet: {busy}")
        for channel in ("sms", "email"):
            sent, deferred = status.get((channel, "sent"), 0), status.get((channel, "deferred"), 0)
            if not sent or not deferred:
                problems.append(f"{channel}: want some sent and some deferred rows, "
                                f"have {sent} sent, {deferred} deferred")
            for outcome, rows_ in (("sent", sent), ("deferred", deferred)):
                expect(f"aftersales_notifications_total{{channel={channel},outcome={outcome}}}"
                       " delta", d("aftersales_notifications_total", "notifier",
                                   channel=channel, outcome=outcome), rows_)
        # The timer hands notifications over several per message: at least one.
        expect("notifier send_notifications ok delta",
               d(actor, "notifier", service="notifier", outcome="ok"), 1, True)

        # The timer's backlog gauges are PostgreSQL's numbers.
        open_db = {(p, k, s): int(c) for p, k, s, c in rows(db, (
            "SELECT platform, kind, step, count(*) FROM cases WHERE status = 'open' "
            "GROUP BY 1, 2, 3"))}
        open_metric = by_labels(after, "timer", "aftersales_open_cases",
                                "platform", "kind", "step")
        if open_metric != open_db:
            problems.append(f"aftersales_open_cases {open_metric} != database {open_db}")
        pending_db = {(s, p): int(c) for s, p, c in rows(db, (
            "SELECT step, purpose, count(*) FROM deadlines WHERE status = 'pending' "
            "GROUP BY 1, 2"))}
        pending_metric = by_labels(after, "timer", "aftersales_pending_deadlines",
                                   "step", "purpose")
        if pending_metric != pending_db:
            problems.append(f"aftersales_pending_deadlines {pending_metric} "
                            f"!= database {pending_db}")
        waiting_db = {(c,): int(k) for c, k in rows(db, (
            "SELECT channel, count(*) FROM notifications "
            "WHERE status IN ('new', 'queued', 'pending', 'deferred') GROUP BY 1"))}
        waiting_metric = by_labels(after, "timer", "aftersales_notifications_pending", "channel")
        if waiting_metric != waiting_db:
            problems.append(f"aftersales_notifications_pending {waiting_metric} "
                            f"!= database {waiting_db}")
        outbox_db = rows(db, "SELECT count(*) FROM outbox")[0][0]
        expect("aftersales_outbox_unpublished", total(after, "aftersales_outbox_unpublished",
                                                      "timer"), outbox_db)
        expect("aftersales_backlog_query_ok", total(after, "aftersales_backlog_query_ok",
                                                    "timer"), 1)
        return problems

    settle(unmet, timeout=max(20.0, 55 - (time.monotonic() - started)),
           what="the metrics to show the burst")

    # The backlog is not empty, so the equality above compared something.
    assert total(after, "aftersales_open_cases", "timer") >= len(traffic.opened) - n
    assert total(after, "aftersales_pending_deadlines", "timer", purpose="reminder") > 0

    # No label anywhere carries an id or a person: every sample of every family, before
    # and after, of all four services.
    secrets = traffic.secrets()
    leaks = [
        f"{service}: {name}{{{label}={value!r}}}"
        for scraped in (before, after)
        for service, name, label, value in label_values(scraped)
        if any(secret in value.lower() for secret in secrets) or "@" in value
    ]
    assert leaks == [], "label values carrying ids or contacts:\n" + "\n".join(leaks)
    samples = sum(1 for _ in label_values(after))
    assert samples > 100, f"only {samples} labelled samples scraped: the check proved nothing"
    print(f"\n[observability] burst of {len(traffic.first) + len(traffic.second) + 1} messages, "
          f"{len(traffic.opened)} cases, {samples} labelled samples checked, "
          f"{time.monotonic() - started:.1f}s; scrapes failed by the empty-file race: "
          f"{len(failed_scrapes)} {sorted(set(failed_scrapes))}")


# ------------------------------------------------- 2. dashboards on a real Prometheus
def load_queries_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "grafana_queries", ROOT / "deploy" / "grafana" / "queries.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rabbitmq_metrics_answer() -> bool:
    try:
        return httpx.get(RABBITMQ_METRICS, timeout=3).status_code == 200
    except httpx.HTTPError:
        return False


def prometheus_config(system: System, gateway: Gateway, with_rabbitmq: bool
                      ) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with only the targets changed (and 1 s intervals)."""
    shipped_dir = ROOT / "deploy" / "prometheus"
    shipped = yaml.safe_load((shipped_dir / "prometheus.yml").read_text(encoding="utf-8"))
    jobs = []
    for job in shipped["scrape_configs"]:
        name = job["job_name"]
        if name == "aftersales-gateway":
            targets = [f"127.0.0.1:{gateway.port}"]
        elif name.startswith("aftersales-"):
            targets = [f"127.0.0.1:{system.ports[name.removeprefix('aftersales-')]}"]
        elif name == "rabbitmq":
            if not with_rabbitmq:
                continue
            targets = ["127.0.0.1:15692"]
        else:
            raise AssertionError(f"prometheus.yml has a job this test cannot target: {name}")
        jobs.append({**job, "static_configs": [
            {**static, "targets": targets} for static in job["static_configs"]]})
    names = {job["job_name"] for job in jobs}
    assert {f"aftersales-{s}" for s in SERVICES} <= names, names
    return {
        "global": {**shipped.get("global", {}), "scrape_interval": "1s",
                   "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(shipped_dir / f) for f in shipped.get("rule_files", [])],
        "scrape_configs": jobs,
    }


class Prometheus:
    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "prometheus.log"
        config_path = workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        self.http = httpx.Client(base_url=self.url, timeout=5)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [str(PROMETHEUS), f"--config.file={config_path}",
                 f"--storage.tsdb.path={workdir / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def get(self, path: str, **params: str) -> Any:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited ({self.proc.returncode}):\n{self.log()}")
        return self.http.get(path, params=params)

    def ready(self) -> bool:
        try:
            return self.get("/-/ready").status_code == 200
        except httpx.HTTPError:
            return False

    def target_health(self) -> dict[str, str]:
        targets = self.get("/api/v1/targets").json()["data"]["activeTargets"]
        return {t["labels"]["job"]: t["health"] for t in targets}

    def query(self, expr: str) -> dict[str, Any]:
        return dict(self.get("/api/v1/query", query=expr).json())

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def has_data(answer: dict[str, Any]) -> bool:
    """A series with a number: NaN (histogram_quantile or a ratio over a window where
    nothing happened) is what Grafana shows as no data too."""
    data = answer["data"]
    if data["resultType"] == "vector":
        values = [r["value"][1] for r in data["result"]]
    elif data["resultType"] == "matrix":
        values = [v[1] for r in data["result"] for v in r["values"]]
    else:  # scalar / string
        values = [data["result"][1]]
    return any(v != "NaN" for v in values)


def hold_overdue_deadline(db: Database, case_id: str) -> Connection:
    """Lock the case's pending deadline row before it comes due, so the timer (which
    claims with SKIP LOCKED) cannot fire it: it becomes overdue, as behind a stuck
    transaction. Returns the connection holding the lock: roll it back to release."""
    pending = (
        "SELECT id FROM deadlines WHERE case_id = :c AND status = 'pending' "
        "AND purpose = 'deadline'"
    )
    wait_for(lambda: rows(db, pending, c=case_id), timeout=20, interval=0.05,
             what=f"the pending deadline of {case_id}")
    conn = db.sql_engine.connect()
    conn.begin()
    locked = conn.execute(text(pending + " FOR UPDATE"), {"c": case_id}).all()
    if not locked:
        conn.rollback()
        conn.close()
        raise AssertionError(f"{case_id}'s deadline fired before the test could hold it")
    return conn


def test_every_dashboard_query_is_valid_and_returns_data(
    system: System, db: Database, amqp_url: str, tmp_path: Path
) -> None:
    if not PROMETHEUS.exists():
        message = f"{PROMETHEUS} missing: scripts/install_prometheus.sh installs it"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    started = time.monotonic()
    module = load_queries_module()
    queries = module.all_queries()
    keys = {(q.dashboard, q.panel, q.ref_id) for q in queries}
    assert set(EXPECTED_EMPTY) <= keys, f"allow-list names no panel: {set(EXPECTED_EMPTY) - keys}"

    with_rabbitmq = rabbitmq_metrics_answer()
    allowed = dict(EXPECTED_EMPTY)
    if not with_rabbitmq:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"RabbitMQ's Prometheus plugin does not answer on {RABBITMQ_METRICS}: "
                        "scripts/setup.sh enables it (rabbitmq-plugins enable "
                        "rabbitmq_prometheus)")
        for q in queries:
            if "rabbitmq_" in q.expr:
                allowed[(q.dashboard, q.panel, q.ref_id)] = (
                    "RabbitMQ's Prometheus plugin is not enabled on this machine")

    gateway = Gateway(system.env, tmp_path)
    gateway.start()
    prometheus = Prometheus(prometheus_config(system, gateway, with_rabbitmq), tmp_path)
    overdue: Connection | None = None
    try:
        wait_for(prometheus.ready, timeout=30, interval=0.2, what="prometheus to be ready")
        jobs = {f"aftersales-{s}" for s in (*SERVICES, "gateway")} \
            | ({"rabbitmq"} if with_rabbitmq else set())
        wait_for(lambda: all(prometheus.target_health().get(j) == "up" for j in jobs),
                 timeout=30, interval=0.2, what=f"prometheus to scrape {sorted(jobs)}")

        # The burst of test 1, twice: a series born in a scrape shows its first value
        # there, and rate() sees only what it gains afterwards, so the second burst comes
        # once Prometheus holds the series of the first.
        send(Traffic.standard(), db, amqp_url)
        poison_resolver(amqp_url)
        wait_for(lambda: has_data(prometheus.query(
            f"sum(aftersales_decisions_total) >= {N_AUTO}"
            f" and on() sum(aftersales_actor_messages_total{{outcome='error'}}) > 0")),
            timeout=30, interval=0.25, what="prometheus to scrape the first burst's effects")
        traffic = Traffic.standard()
        stuck = traffic.open("stuck", due_in=DUE_IN + 5)  # a deadline the timer cannot claim
        send(traffic, db, amqp_url)
        poison_resolver(amqp_url)
        overdue = hold_overdue_deadline(db, stuck)

        # Poll every query until it returns data (rate() needs two samples of a series
        # in its window, so new counters take a couple of scrape intervals).
        invalid: dict[Any, str] = {}
        empty = {q: "" for q in queries}
        deadline = time.monotonic() + max(25.0, 58 - (time.monotonic() - started))
        while True:
            for q in list(empty):
                answer = prometheus.query(q.expr)
                if answer.get("status") != "success":
                    invalid[q] = f"{answer.get('errorType')}: {answer.get('error')}"
                    del empty[q]
                elif has_data(answer):
                    del empty[q]
            waiting = [q for q in empty if (q.dashboard, q.panel, q.ref_id) not in allowed]
            if not waiting or time.monotonic() > deadline:
                break
            time.sleep(0.5)  # one half scrape interval between polls
        # The listed ones had the whole wait to (unexpectedly) show data.
        health = prometheus.target_health()
        # The dashboards' variables (label_values(selector, label)) must offer values too,
        # or every panel that uses them is empty.
        variables: dict[str, Any] = {}
        for dashboard, name, query in module.variable_queries():
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query.strip())
            if m is None:
                variables[f"{dashboard} ${name}"] = f"not label_values(selector, label): {query}"
                continue
            answer = prometheus.get(f"/api/v1/label/{m.group(2)}/values",
                                    **{"match[]": module.substitute(m.group(1))}).json()
            if answer.get("status") != "success" or not answer.get("data"):
                variables[f"{dashboard} ${name}"] = f"{query} -> {answer}"
    finally:
        gateway.kill(signal.SIGTERM)
        if overdue is not None:
            overdue.rollback()
            overdue.close()
        prometheus.stop()

    def show(q: Any) -> str:
        return f"{q.dashboard} / {q.panel} / {q.ref_id}: {q.expr}"

    assert not invalid, "invalid PromQL:\n" + "\n".join(
        f"{show(q)}\n    {err}" for q, err in invalid.items())
    missing = [q for q in empty if (q.dashboard, q.panel, q.ref_id) not in allowed]
    assert not missing, (f"panels without data after {time.monotonic() - started:.0f}s "
                         f"(targets: {health}):\n" + "\n".join(show(q) for q in missing))
    assert not variables, "dashboard variables without values:\n" + "\n".join(
        f"{k}: {v}" for k, v in variables.items())
    filled = [q for q in queries if (q.dashboard, q.panel, q.ref_id) in EXPECTED_EMPTY
              and q not in empty]
    assert not filled, ("listed in EXPECTED_EMPTY but returned data: remove them from the "
                        "list:\n" + "\n".join(show(q) for q in filled))
    print(f"\n[observability] {len(queries)} dashboard queries: "
          f"{len(queries) - len(empty)} with data, {len(empty)} empty as allowed "
          f"({time.monotonic() - started:.1f}s)")
