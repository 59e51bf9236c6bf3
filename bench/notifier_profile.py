#!/usr/bin/env python
"""Notifications per second through `NotificationSender` on one thread: the email channel
as the log transport and as SMTP to a local aiosmtpd server (a new connection per message).

    .venv/bin/python bench/notifier_profile.py [--count N]

Uses its own database (dropped at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
import uuid

from aiosmtpd.controller import Controller
from sqlalchemy import create_engine, insert, select, text

from services.notifier.channels.log import LogChannel
from services.notifier.channels.smtp import SmtpEmailChannel
from services.notifier.delivery import QuietHours, RetryPolicy
from services.notifier.ratelimit import InMemoryRateLimiter
from services.notifier.sender import NotificationSender
from shared.db.migrate import upgrade
from shared.db.models import NotificationRow
from shared.db.session import Database, make_engine
from shared.notifications.policy import NotificationPolicy

ap = argparse.ArgumentParser()
ap.add_argument("--count", type=int, default=1000)
args = ap.parse_args()


class Sink:
    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        return "250 OK"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


admin_url = "postgresql+psycopg://postgres@127.0.0.1/postgres"
name = f"aftersales_bench_notify_{os.getpid()}"
admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
with admin.connect() as conn:
    conn.execute(text(f'CREATE DATABASE "{name}"'))
port = free_port()
controller = Controller(Sink(), hostname="127.0.0.1", port=port)
controller.start()
try:
    url = admin_url.rsplit("/", 1)[0] + f"/{name}"
    upgrade(url)
    db = Database(make_engine(url))
    policy = NotificationPolicy.load(None)
    results = {}
    for label, channel in (("log", LogChannel("email")),
                           ("smtp", SmtpEmailChannel("127.0.0.1", port, "bench@example.com",
                                                     timeout=5))):
        with db.transaction() as s:
            s.execute(insert(NotificationRow), [{
                "dedup_key": uuid.uuid4().hex, "case_id": f"NP-{i}", "reason": "case.opened",
                "party": "merchant", "channel": "email", "recipient": "shop@example.com",
                "template": "case_opened.merchant", "params": {"case_id": f"NP-{i}"},
                "urgent": True, "status": "queued"} for i in range(args.count)])
            ids = list(s.execute(select(NotificationRow.id)
                                 .where(NotificationRow.status == "queued")).scalars())
        sender = NotificationSender(db, policy, {"email": channel}, InMemoryRateLimiter(),
                                    QuietHours.parse("off"), (), RetryPolicy())
        started = time.perf_counter()
        outcomes = [sender.send(i).outcome for i in ids]
        wall = time.perf_counter() - started
        sent = outcomes.count("sent")
        results[label] = {"per_s": round(len(ids) / wall, 1), "sent": sent,
                          "other": len(ids) - sent}
    print(json.dumps(results))
finally:
    controller.stop()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
