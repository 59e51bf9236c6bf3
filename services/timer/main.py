"""Composition root of the timer service: `aftersales run timer`."""

from __future__ import annotations

import logging
import threading
from dataclasses import fields
from datetime import UTC, datetime, timedelta
from datetime import time as dt_time
from functools import partial

from services.timer.loop import Timer
from shared import metrics
from shared.amqp import make_broker
from shared.bootstrap import build_database, build_domain, build_health, build_policy, ops_contacts
from shared.config import Settings
from shared.db.backlog import PeriodicBacklog, read_backlog
from shared.db.session import Database, db_now
from shared.db.uow import sql_unit_of_work
from shared.domain import WorkCalendar
from shared.domain.timeutil import CHINA_TZ
from shared.logs import setup_logging
from shared.publisher import ConfirmedPublisher
from shared.runtime import WorkerSpec, poll_loop, supervise

log = logging.getLogger(__name__)


def worker(settings: Settings) -> None:
    setup_logging("timer", settings.log_level)
    timer = Timer(
        sql_unit_of_work(build_database(settings, pool_size=2)),
        ConfirmedPublisher(make_broker(settings.amqp_url, settings.queue_type),
                           settings.queue_type),
        batch=settings.timer_batch,
        redispatch_after=settings.timer_redispatch_seconds,
        max_rate=settings.timer_max_rate,
        message_size=settings.resolver_batch,
        notifier_queue_max=settings.notifier_queue_max_messages,
    )

    def step() -> int:
        result = timer.tick()
        for purpose, lateness in result.latenesses:
            metrics.TIMER_LATENESS.observe(max(lateness, 0.0))
            metrics.TIMER_FIRED.labels(purpose=purpose).inc()
        return result.fired + result.redispatched

    poll_loop("timer tick", step, idle_seconds=settings.timer_poll_seconds,
              full=settings.timer_batch)


def calendar_coverage(settings: Settings) -> datetime:
    """End of the last day with holiday data; warns when next year's schedule is due."""
    last_day = WorkCalendar(settings.holidays).covered_until()
    end = datetime.combine(last_day + timedelta(days=1), dt_time(), tzinfo=CHINA_TZ)
    left = (end - datetime.now(UTC)).days
    if left < 60:
        log.warning("official holiday data ends %s (%d days left): working-day deadlines "
                    "past it are counted on an estimate; add next year's schedule to the "
                    "file named by AFTERSALES_HOLIDAYS", last_day, left)
    return end


def watch_running_switches(settings: Settings, db: Database, stop: threading.Event,
                           every: float = 60.0) -> None:
    """Rule versions that say they apply to running steps: give the running steps their
    rule at start, and again each time such a version has taken effect (checked once a
    minute against the database clock)."""
    from shared.recount import switch_running_steps

    engine, policy, contacts = build_domain(settings), build_policy(settings), \
        ops_contacts(settings)
    if not engine.rules.switch_moments:
        return
    done_until = None
    while not stop.is_set():
        try:
            with db.transaction() as s:
                now = db_now(s)
            passed = [m for m in engine.rules.switch_moments if m <= now]
            if passed and passed[-1] != done_until:
                summary = switch_running_steps(db, engine, policy, contacts)
                done_until = passed[-1]
                for line in summary.lines():
                    log.info("%s", line)
        except Exception:
            log.exception("applying rule versions to running steps failed (retried)")
        stop.wait(every)


def recount_estimated_deadlines(settings: Settings, db: Database) -> None:
    """Official holiday data may have arrived since the last start (a chinesecalendar
    upgrade, a year added to the holiday file): count again every pending deadline that
    stood on an estimate. A failure is logged, not fatal: `aftersales calendar recompute`
    does the same."""
    from shared.recount import recount_estimated

    try:
        summary = recount_estimated(db, build_domain(settings), build_policy(settings),
                                    ops_contacts(settings))
    except Exception:
        log.exception("recounting deadlines on estimated calendar data failed")
        return
    if summary.checked:
        for line in summary.lines():
            log.info("%s", line)


def recount_then_watch(settings: Settings, db: Database) -> None:
    recount_estimated_deadlines(settings, db)
    watch_running_switches(settings, db, threading.Event())


def backlog_snapshot(db: Database, covered_until: datetime) -> metrics.BacklogSnapshot:
    figures = read_backlog(db, covered_until)
    return metrics.BacklogSnapshot.from_rows(**{
        f.name: getattr(figures, f.name) for f in fields(figures)})


def run(settings: Settings) -> int:
    setup_logging("timer", settings.log_level)
    db = build_database(settings, pool_size=1)
    covered_until = calendar_coverage(settings)
    # Beside the firing, not before it: a long recount must not hold back due deadlines.
    threading.Thread(target=recount_then_watch, args=(settings, db), name="recounts",
                     daemon=True).start()
    server = metrics.start_metrics_server(
        settings.metrics_port_for("timer"), "timer", addr=settings.metrics_bind,
        collectors=[metrics.BacklogCollector(PeriodicBacklog(
            partial(backlog_snapshot, db, covered_until),
            settings.backlog_interval_seconds).start())],
    )
    log.info("timer: metrics on :%s, %d copy(ies)", server.port, settings.worker_processes)
    return supervise(
        [WorkerSpec("timer", partial(worker, settings), settings.worker_processes)],
        on_child_exit=metrics.mark_process_dead,
        grace_s=settings.shutdown_grace_seconds,
        health=build_health(settings),
    )
