#!/usr/bin/env python
"""Notifications per second through `NotificationSender` on one thread: the email channel
as the log transport and as SMTP to a local aiosmtpd server (the channel keeps one
connection per thread).

Two ways of calling the sender, each on fresh rows:
- `send_many`: what the actor does, one call per message of --batch ids (default 50; the
  timer's messages carry `AFTERSALES_RESOLVER_BATCH` ids, 200 by default);
- `send`: one id per call (claim and record each on its own: two commits per row).

    .venv/bin/python bench/notifier_profile.py [--count N] [--batch N]

Uses its own database (dropped at the end). Prints JSON: per mode and channel, rows/s,
outcomes, commits per notification and, for SMTP, the connections the server saw.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from sqlalchemy import create_engine, event, insert, select, text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.resources

from services.notifier.channels.log import LogChannel  # noqa: E402
from services.notifier.channels.smtp import SmtpEmailChannel  # noqa: E402
from services.notifier.delivery import QuietHours, RetryPolicy  # noqa: E402
from services.notifier.ratelimit import InMemoryRateLimiter  # noqa: E402
from services.notifier.sender import NotificationSender  # noqa: E402
from shared.db.migrate import upgrade  # noqa: E402
from shared.db.models import NotificationRow  # noqa: E402
from shared.db.notifications import NotificationStore  # noqa: E402
from shared.db.session import Database, make_engine  # noqa: E402
from shared.notifications.policy import NotificationPolicy  # noqa: E402
from tests.resources import free_port  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--count", type=int, default=1000)
ap.add_argument("--batch", type=int, default=50)
args = ap.parse_args()


class Sink:
    def __init__(self) -> None:
        self.peers: set[object] = set()

    async def handle_DATA(self, server: object, session: Any, envelope: object) -> str:
        self.peers.add(session.peer)
        return "250 OK"


admin_url = "postgresql+psycopg://postgres@127.0.0.1/postgres"
name = f"aftersales_bench_notify_{os.getpid()}"
admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
with admin.connect() as conn:
    conn.execute(text(f'CREATE DATABASE "{name}"'))
port = free_port()
sink = Sink()
controller = Controller(sink, hostname="127.0.0.1", port=port)
controller.start()
try:
    url = admin_url.rsplit("/", 1)[0] + f"/{name}"
    upgrade(url)
    db = Database(make_engine(url))
    commits = 0

    def count_commit(conn: object) -> None:
        global commits
        commits += 1

    event.listen(db.sql_engine, "commit", count_commit)
    policy = NotificationPolicy.load(None)
    results: dict[str, dict[str, object]] = {}
    for mode in ("send_many", "send"):
        for label in ("log", "smtp"):
            channel: Any = LogChannel("email") if label == "log" else SmtpEmailChannel(
                "127.0.0.1", port, "bench@example.com", timeout=5)
            with db.transaction() as s:
                s.execute(insert(NotificationRow), [{
                    "dedup_key": uuid.uuid4().hex, "case_id": f"NP-{i}",
                    "reason": "case.opened", "party": "merchant", "channel": "email",
                    "recipient": "shop@example.com", "template": "case_opened.merchant",
                    "params": {"case_id": f"NP-{i}"}, "urgent": True, "status": "queued"}
                    for i in range(args.count)])
                ids = list(s.execute(select(NotificationRow.id)
                                     .where(NotificationRow.status == "queued")).scalars())
            sender = NotificationSender(NotificationStore.transactions(db), policy,
                                        {"email": channel}, InMemoryRateLimiter(),
                                        QuietHours.parse("off"), (), RetryPolicy())
            sink.peers.clear()
            commits = 0
            started = time.perf_counter()
            if mode == "send_many":
                outcomes = [o.outcome for start in range(0, len(ids), args.batch)
                            for o in sender.send_many(ids[start:start + args.batch])]
            else:
                outcomes = [sender.send(i).outcome for i in ids]
            wall = time.perf_counter() - started
            sent = outcomes.count("sent")
            result: dict[str, object] = {
                "per_s": round(len(ids) / wall, 1), "sent": sent, "other": len(ids) - sent,
                "commits_per_row": round(commits / len(ids), 3)}
            if label == "smtp":
                result["connections"] = len(sink.peers)
                channel.close()
            results[f"{mode}/{label}"] = result
    print(json.dumps({"count": args.count, "batch": args.batch, "load": os.getloadavg(),
                      **results}))
finally:
    controller.stop()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
