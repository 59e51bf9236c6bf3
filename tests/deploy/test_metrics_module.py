"""shared/metrics/: the metric table, the backlog collector, the /metrics server and
multi-process mode (in a subprocess: prometheus_client picks its value class per process)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import pytest
from deploy_helpers import REPO
from prometheus_client import CollectorRegistry, generate_latest

from shared import metrics

FORBIDDEN_LABELS = {
    "case_id", "order_id", "shop_id", "event_id", "decision_id", "notification_id",
    "deadline_id", "buyer", "merchant", "phone", "email",
}  # fmt: skip


def test_metric_table() -> None:
    names = [s.name for s in metrics.SPECS]
    assert len(names) == len(set(names))
    for spec in metrics.SPECS:
        assert spec.name.startswith("aftersales_"), spec.name
        assert not set(spec.labels) & FORBIDDEN_LABELS, spec.name
        assert spec.doc and spec.services
    assert metrics.DEADLINE_BUCKETS[:-1] == (
        3600, 7200, 86400, 172800, 259200, 604800, 864000, 1296000, 2592000,
    )  # fmt: skip


def test_every_metric_is_documented() -> None:
    doc = (REPO / "docs" / "metrics.md").read_text(encoding="utf-8")
    for name in metrics.all_metric_names():
        assert f"`{name}`" in doc, name
    assert "15692" in doc and "rabbitmq_queue_messages_ready" in doc


def test_lazy_metrics_have_the_declared_labels() -> None:
    for spec in metrics.SPECS:
        if spec.attr:
            metric = getattr(metrics, spec.attr)
            assert metric._labelnames == spec.labels, spec.attr


def test_helpers_bound_label_values() -> None:
    metrics.record_event_received("{bad json", "rejected", "Kuai Shou!")
    metrics.record_event_received("case.opened", "accepted", "kuaishou")
    text = generate_latest().decode()
    assert 'outcome="rejected",platform="invalid",type="invalid"' in text
    with pytest.raises(ValueError):
        metrics.record_event_received("case.opened", "weird", "kuaishou")
    with pytest.raises(ValueError):
        metrics.record_event_rejected("because")
    metrics.record_sla_step("merchant_response", "merchant", False, "kuaishou", "exchange")
    assert 'result="missed"' in generate_latest().decode()


def _collect(collector: metrics.BacklogCollector) -> str:
    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode()


def test_backlog_collector() -> None:
    opened = datetime(2026, 11, 1, tzinfo=UTC)
    snap = metrics.BacklogSnapshot.from_rows(
        open_cases=[("kuaishou", "exchange", "merchant_response", 3)],
        pending_deadlines=[
            ("merchant_response", "deadline", 3),
            ("merchant_response", "reminder", 2),
        ],
        notifications_pending=[("sms", 4)],
        oldest_open_case_at=opened,
        outbox_unpublished=7,
        overdue_deadlines=0,
    )
    text = _collect(metrics.BacklogCollector(lambda: snap))
    assert (
        'aftersales_open_cases{kind="exchange",platform="kuaishou",step="merchant_response"} 3.0'
        in text
    )
    assert 'aftersales_pending_deadlines{purpose="reminder",step="merchant_response"} 2.0' in text
    (line,) = [x for x in text.splitlines() if x.startswith("aftersales_oldest_open_case_")]
    assert float(line.split()[1]) == opened.timestamp()
    assert "aftersales_outbox_unpublished 7.0" in text
    assert 'aftersales_notifications_pending{channel="sms"} 4.0' in text
    assert "aftersales_backlog_query_ok 1.0" in text
    # no overdue deadline -> the timestamp gauge has no sample (alerts stay quiet)
    assert "\naftersales_oldest_overdue_deadline_timestamp_seconds " not in text


def test_backlog_collector_accepts_a_mapping_and_survives_errors() -> None:
    text = _collect(metrics.BacklogCollector(lambda: {"outbox_unpublished": 2}))
    assert "aftersales_outbox_unpublished 2.0" in text

    def broken() -> metrics.BacklogSnapshot:
        raise RuntimeError("db down")

    text = _collect(metrics.BacklogCollector(broken))
    assert "aftersales_backlog_query_ok 0.0" in text
    assert "aftersales_open_cases{" not in text


def test_server_serves_metrics_and_healthz() -> None:
    server = metrics.start_metrics_server(
        0, "timer", addr="127.0.0.1", version="9.9.9",
        collectors=[metrics.BacklogCollector(lambda: metrics.BacklogSnapshot())],
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{server.port}"
        with urllib.request.urlopen(base + "/healthz", timeout=5) as r:
            assert r.status == 200
        with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
            body = r.read().decode()
        assert 'aftersales_build_info{version="9.9.9"} 1.0' in body
        assert "aftersales_outbox_unpublished 0.0" in body
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(base + "/nope", timeout=5)
    finally:
        server.close()


MULTIPROC_SCRIPT = textwrap.dedent(
    """
    import multiprocessing, sys, urllib.request
    import prometheus_client  # imported before the env var is set, on purpose
    from shared import metrics

    metrics.prepare_multiproc_dir(sys.argv[1])
    server = metrics.start_metrics_server(0, "resolver", addr="127.0.0.1", version="t")

    def work(i):
        metrics.DECISIONS.labels(type="decision.auto_approved", platform="kuaishou",
                                 kind="exchange").inc()
        metrics.TIMER_LATENESS.observe(0.02)

    procs = [multiprocessing.get_context("fork").Process(target=work, args=(i,))
             for i in range(3)]
    for p in procs: p.start()
    for p in procs: p.join()
    for p in procs: metrics.mark_process_dead(p.pid)
    url = "http://127.0.0.1:%d/metrics" % server.port
    print(urllib.request.urlopen(url, timeout=5).read().decode())
    server.close()
    """
)


def test_multiprocess_mode_merges_worker_processes(tmp_path: Path) -> None:
    mpdir = tmp_path / "mp"
    mpdir.mkdir()
    (mpdir / "counter_99999.db").write_bytes(b"stale file of a previous run")
    proc = subprocess.run(
        [sys.executable, "-c", MULTIPROC_SCRIPT, str(mpdir)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert (
        'aftersales_decisions_total{kind="exchange",platform="kuaishou",'
        'type="decision.auto_approved"} 3.0' in out
    )
    assert "aftersales_timer_lateness_seconds_count 3.0" in out
    assert 'aftersales_build_info{version="t"} 1.0' in out
    assert "process_resident_memory_bytes" in out
    assert 'aftersales_service_processes{service="resolver"}' in out
    assert not (mpdir / "counter_99999.db").exists()


def test_prepare_after_use_is_refused(tmp_path: Path) -> None:
    metrics.TIMER_STALE.inc()
    with pytest.raises(RuntimeError):
        metrics.prepare_multiproc_dir(tmp_path / "late")


def test_actor_metrics_middleware() -> None:
    dramatiq = pytest.importorskip("dramatiq")
    from dramatiq.brokers.stub import StubBroker

    from shared.metrics.actors import ActorMetrics, install_actor_metrics

    broker = StubBroker()
    middleware = install_actor_metrics(broker, "notifier")
    names = [type(m).__name__ for m in broker.middleware]
    assert names.index("ActorMetrics") < names.index("Retries")
    assert isinstance(middleware, ActorMetrics)

    @dramatiq.actor(broker=broker, max_retries=1, min_backoff=1, max_backoff=5)
    def flaky_test_actor(fail: bool) -> None:
        if fail:
            raise ValueError("boom")

    flaky_test_actor.send(False)
    flaky_test_actor.send(True)
    worker = dramatiq.Worker(broker, worker_timeout=50)
    worker.start()
    try:
        broker.join(flaky_test_actor.queue_name, fail_fast=False)
        worker.join()
    finally:
        worker.stop()
    text = generate_latest().decode()
    for outcome in ("ok", "retry", "error"):
        assert (
            f'aftersales_actor_messages_total{{actor="flaky_test_actor",outcome="{outcome}",'
            f'service="notifier"}} 1.0' in text
        ), outcome
    assert (
        'aftersales_actor_duration_seconds_count{actor="flaky_test_actor",service="notifier"} 3.0'
        in text
    )
